//! `reference.json`, written by the trainer beside `model.onnx`: rows as a
//! feature matrix carries them, and the raw output the trainer's
//! onnxruntime gave each. The one definition of the file: the registry checks
//! it when a model is registered, and the ranker re-scores its rows when it
//! loads the model. The ranker refuses the model unless its own binding gives
//! the same outputs (see [`Reference::agrees`]). So a skewed binding,
//! another ONNX Runtime, or an execution provider that changes the numbers is
//! caught before a request is.

use std::path::Path;

use crate::{InputDtype, ModelManifest};

/// File name of a model's [`Reference`].
pub const REFERENCE_FILE: &str = "reference.json";

/// A model's reference rows and outputs.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// The model the rows were scored with.
    pub model_version: String,
    /// Its `model.onnx` hash: a reference for another file is refused.
    pub onnx_sha256: String,
    /// Number of rows.
    pub rows: u32,
    /// Dense column names and `rows × names` values.
    pub feature_names: Vec<String>,
    /// See `feature_names`.
    pub values: Vec<f32>,
    /// Categorical column names and `rows × names` ids.
    #[serde(default)]
    pub categorical_names: Vec<String>,
    /// See `categorical_names`.
    #[serde(default)]
    pub categorical_ids: Vec<i64>,
    /// The trainer's raw output per row.
    pub raw: Vec<f32>,
}

/// How a session computes, next to the trainer's float32 run on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arithmetic {
    /// float32 throughout (ONNX Runtime's CPU provider): only summation
    /// order differs.
    Float32,
    /// Reduced precision somewhere (a GPU provider: TF32 matrix products on
    /// CUDA, FP16 engines on TensorRT), ~1e-3 relative per product.
    Reduced,
}

impl Reference {
    /// Largest difference from the trainer's output accepted in
    /// [`Arithmetic::Float32`]: float32 summation order differs between
    /// thread counts.
    pub const TOLERANCE: f32 = 1e-5;

    /// Largest difference in log-odds accepted in [`Arithmetic::Reduced`]
    /// (0.05: the odds within ~5 %). FP16 rounding moves a pCTR of 0.04 by
    /// a few 1e-4, far past [`Self::TOLERANCE`] but well inside this; a
    /// column bound to the wrong input, a stale engine or a broken kernel
    /// moves some of the reference rows by far more.
    pub const REDUCED_LOGIT_TOLERANCE: f64 = 0.05;

    /// Whether a session's output `got` for a reference row agrees with the
    /// trainer's `want`, for a session computing in `arithmetic`. A NaN
    /// agrees with nothing.
    pub fn agrees(got: f32, want: f32, arithmetic: Arithmetic) -> bool {
        if (got - want).abs() <= Self::TOLERANCE {
            return true;
        }
        match arithmetic {
            Arithmetic::Float32 => false,
            Arithmetic::Reduced => {
                // Outputs are probabilities; clamped so 0 and 1 stay finite.
                let logit = |p: f32| {
                    let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
                    (p / (1.0 - p)).ln()
                };
                (logit(got) - logit(want)).abs() <= Self::REDUCED_LOGIT_TOLERANCE
            }
        }
    }

    /// `dir/reference.json` if there is one, checked against `manifest`
    /// without running the model. The reference must be for this
    /// `model.onnx`, with one finite output per row and blocks as wide as
    /// their names. It must also hold every column the manifest's inputs
    /// take. The error says why not.
    pub fn read(dir: &Path, manifest: &ModelManifest) -> Result<Option<Self>, String> {
        let path = dir.join(REFERENCE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let reference: Self =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a reference: {e}", path.display()))?;
        reference.check(manifest)?;
        Ok(Some(reference))
    }

    fn check(&self, manifest: &ModelManifest) -> Result<(), String> {
        if !self.onnx_sha256.eq_ignore_ascii_case(&manifest.onnx_sha256) {
            return Err(format!(
                "scored model.onnx {} ({}), the manifest's is {}: a stale or torn copy",
                self.onnx_sha256, self.model_version, manifest.onnx_sha256
            ));
        }
        let rows = self.rows as usize;
        if self.raw.len() != rows || rows == 0 {
            return Err(format!("{} outputs for {} rows", self.raw.len(), self.rows));
        }
        if let Some(i) = self.raw.iter().position(|v| !v.is_finite()) {
            return Err(format!("output {i} is {}, not a number a model gives", self.raw[i]));
        }
        let block = |what: &str, names: usize, len: usize| {
            if names.checked_mul(rows) == Some(len) {
                Ok(())
            } else {
                Err(format!("{len} {what} for {rows} rows of {names} columns"))
            }
        };
        block("values", self.feature_names.len(), self.values.len())?;
        block("categorical_ids", self.categorical_names.len(), self.categorical_ids.len())?;
        let missing = |input: &str, wanted: &[String], have: &[String]| match wanted.iter().find(|f| !have.contains(f))
        {
            Some(f) => Err(format!("the manifest's input {input} takes {f}, which the reference rows lack")),
            None => Ok(()),
        };
        missing(&manifest.input_name, &manifest.feature_order, &self.feature_names)?;
        for input in &manifest.typed_inputs {
            match input.dtype {
                InputDtype::Int64 => missing(&input.name, &input.features, &self.categorical_names)?,
                // The file has no embedding block: such a model's rows cannot be re-scored.
                InputDtype::Float32 => missing(&input.name, &input.features, &[])?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-dcnv2-typed")
    }

    /// The committed typed model's reference, edited, beside its manifest.
    fn edited(edit: impl Fn(&mut serde_json::Value)) -> Result<Option<Reference>, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = crate::read_manifest(&typed_dir().join("manifest.json")).expect("manifest");
        let mut r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(typed_dir().join(REFERENCE_FILE)).expect("read")).expect("json");
        edit(&mut r);
        std::fs::write(dir.path().join(REFERENCE_FILE), serde_json::to_vec(&r).expect("json")).expect("write");
        Reference::read(dir.path(), &manifest)
    }

    #[test]
    fn reduced_arithmetic_accepts_fp16_rounding_and_float32_does_not() {
        use Arithmetic::{Float32, Reduced};
        // FP16-sized drift on a typical pCTR: refused on CPU, accepted on a GPU.
        assert!(!Reference::agrees(0.0405, 0.04, Float32));
        assert!(Reference::agrees(0.0405, 0.04, Reduced));
        // Within float32 summation noise: accepted either way.
        assert!(Reference::agrees(0.040_005, 0.04, Float32));
        assert!(Reference::agrees(0.040_005, 0.04, Reduced));
        // A wrongly bound column moves the odds by far more: refused either way.
        for (got, want) in [(0.06, 0.04), (0.02, 0.04), (0.9, 0.95), (0.5, 0.4)] {
            assert!(!Reference::agrees(got, want, Reduced), "{got} vs {want}");
            assert!(!Reference::agrees(got, want, Float32), "{got} vs {want}");
        }
        // Near 0 the odds are relative: 2e-4 for 1e-4 is a doubling, though
        // only 1e-4 apart.
        assert!(!Reference::agrees(2e-4, 1e-4, Reduced));
        assert!(!Reference::agrees(0.5, 1e-3, Reduced));
        // The ends stay finite; NaN agrees with nothing.
        assert!(Reference::agrees(1.0, 1.0, Reduced) && Reference::agrees(0.0, 0.0, Reduced));
        assert!(!Reference::agrees(f32::NAN, 0.04, Reduced) && !Reference::agrees(f32::NAN, 0.04, Float32));
        assert!(!Reference::agrees(f32::NAN, f32::NAN, Reduced));
    }

    #[test]
    fn the_committed_reference_reads_and_an_absent_one_is_none() {
        let r = edited(|_| {}).expect("reads").expect("present");
        assert_eq!(r.raw.len(), r.rows as usize);
        let manifest = crate::read_manifest(&typed_dir().join("manifest.json")).expect("manifest");
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(Reference::read(empty.path(), &manifest).expect("absent is fine").is_none());
    }

    #[test]
    fn a_reference_that_cannot_serve_its_model_is_refused_naming_why() {
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| edited(edit).expect_err("refused");
        assert!(refused(&|r| r["onnx_sha256"] = "0".repeat(64).into()).contains("stale or torn"));
        assert!(refused(&|r| r["raw"].as_array_mut().unwrap().truncate(3)).contains("3 outputs for 16 rows"));
        let e = refused(&|r| {
            r["values"].as_array_mut().unwrap().pop();
        });
        assert!(e.contains("values for 16 rows of 29 columns"), "{e}");
        assert!(refused(&|r| r["categorical_ids"] = serde_json::json!([1])).contains("1 categorical_ids for 16 rows"));
        let e = refused(&|r| {
            r["feature_names"][0] = "renamed".into();
        });
        assert!(e.contains("takes") && e.contains("which the reference rows lack"), "{e}");
        let e = refused(&|r| r["categorical_names"][1] = "other".into());
        assert!(e.contains("categorical"), "{e}");
        assert!(refused(&|r| *r = serde_json::json!({"rows": "many"})).contains("not a reference"));
        assert!(refused(&|r| r["raw"][2] = serde_json::Value::Null).contains("not a reference"));
    }
}
