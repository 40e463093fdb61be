//! `manifest.json`, written by the trainer next to `model.onnx`: the one
//! definition read by the ranker (to load and check a model) and by the
//! registry (to register it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A model's manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelManifest {
    /// Unique model version, logged with every impression.
    pub model_version: String,
    /// Name of the `[N, F]` float32 input of dense features.
    pub input_name: String,
    /// Name of the `[N, 1]` (or `[N]`) float32 output.
    pub output_name: String,
    /// Dense feature names, in the model's column order.
    pub feature_order: Vec<String>,
    /// The model's other inputs, each bound by name and dtype and fed the
    /// typed columns it lists: categorical ids (`int64 [N, C]`, exact for any
    /// bucket count, which a float column is not above 2^24) or embeddings
    /// (`float32 [N, sum(dims)]`). Absent: the model takes dense features only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub typed_inputs: Vec<TypedInput>,
    /// Hex SHA-256 of `model.onnx`; a file that does not match is refused.
    pub onnx_sha256: String,
    /// How the model's raw output becomes the probability the auction
    /// prices with. Absent: the raw output is served as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// Anything else the trainer recorded (metrics, data, timestamps).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A model input fed typed columns of the feature matrix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TypedInput {
    /// The ONNX graph input's name.
    pub name: String,
    /// Its element type: `int64` takes categorical features (bucket ids),
    /// `float32` embedding features (each `dim` values wide).
    pub dtype: InputDtype,
    /// Registry features of that type, in the input's column order.
    pub features: Vec<String>,
}

/// The element type of a [`TypedInput`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputDtype {
    /// Categorical bucket ids.
    Int64,
    /// Embedding vectors.
    Float32,
}

impl InputDtype {
    /// As the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Int64 => "int64",
            Self::Float32 => "float32",
        }
    }
}

impl TypedInput {
    /// Values per row: one per categorical, `dim` per embedding (from the
    /// registry; a checked manifest names only features it knows).
    pub fn width(&self) -> usize {
        self.width_in(adserve_features::registry())
    }

    /// [`Self::width`] against another registry than the compiled-in one.
    pub fn width_in(&self, registry: &adserve_features::FeatureRegistry) -> usize {
        match self.dtype {
            InputDtype::Int64 => self.features.len(),
            InputDtype::Float32 => self
                .features
                .iter()
                .map(|n| registry.embeddings.iter().find(|f| &f.name == n).and_then(|f| f.dim).unwrap_or(0) as usize)
                .sum(),
        }
    }
}

/// Why a manifest or its model file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest cannot be read or is malformed.
    #[error("model manifest {path}: {why}")]
    Invalid {
        /// Manifest path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `model.onnx` cannot be read.
    #[error("model file {path}: {source}")]
    File {
        /// Model path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `model.onnx` is not the file the manifest describes.
    #[error("model.onnx has sha256 {got}, its manifest says {want}: a torn copy or a swapped file")]
    Checksum {
        /// The manifest's `onnx_sha256`.
        want: String,
        /// The file's.
        got: String,
    },
}

/// Maps a model's raw output to a calibrated probability: first the
/// negative-downsampling correction `p / (p + (1 - p) / keep_rate)` (the
/// trainer kept each negative with probability `keep_rate`, so the raw
/// output over-predicts by that factor in the odds), then an optional fitted
/// mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Share of negatives kept in training, in (0, 1]; 1 = no downsampling.
    #[serde(default = "one")]
    pub keep_rate: f64,
    /// Fitted on a holdout after the correction.
    #[serde(default)]
    pub mapping: Mapping,
}

fn one() -> f64 {
    1.0
}

/// A fitted calibration mapping.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum Mapping {
    /// None.
    #[default]
    None,
    /// Platt scaling: `sigmoid(a * logit(p) + b)`, `a > 0` (monotone).
    Platt {
        /// Slope on the logit.
        a: f64,
        /// Intercept.
        b: f64,
    },
    /// Isotonic regression as a piecewise-linear function through
    /// `(x[i], y[i])`: `x` strictly increasing in [0, 1], `y` non-decreasing
    /// in [0, 1]; flat outside the first and last point.
    Isotonic {
        /// Raw (corrected) probabilities.
        x: Vec<f64>,
        /// Calibrated probabilities.
        y: Vec<f64>,
    },
}

impl Calibration {
    /// Why this calibration cannot be served, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(self.keep_rate > 0.0 && self.keep_rate <= 1.0) {
            return Err(format!("calibration.keep_rate {} is not in (0, 1]", self.keep_rate));
        }
        match &self.mapping {
            Mapping::None => Ok(()),
            Mapping::Platt { a, b } => {
                if !(a.is_finite() && *a > 0.0 && b.is_finite()) {
                    return Err(format!("calibration platt a = {a}, b = {b}: a must be > 0 and both finite"));
                }
                Ok(())
            }
            Mapping::Isotonic { x, y } => {
                if x.len() < 2 || x.len() != y.len() {
                    return Err(format!(
                        "calibration isotonic needs x and y of equal length >= 2, got {} and {}",
                        x.len(),
                        y.len()
                    ));
                }
                let unit = |v: &f64| v.is_finite() && (0.0..=1.0).contains(v);
                if !x.iter().all(unit) || !y.iter().all(unit) {
                    return Err("calibration isotonic x and y must be in [0, 1]".into());
                }
                if !x.windows(2).all(|w| w[0] < w[1]) {
                    return Err("calibration isotonic x must be strictly increasing".into());
                }
                if !y.windows(2).all(|w| w[0] <= w[1]) {
                    return Err("calibration isotonic y must be non-decreasing".into());
                }
                Ok(())
            }
        }
    }

    /// The calibrated probability of raw output `p` (in [0, 1]).
    pub fn apply(&self, p: f32) -> f32 {
        let mut q = f64::from(p);
        if self.keep_rate < 1.0 {
            q = q / (q + (1.0 - q) / self.keep_rate);
        }
        let q = match &self.mapping {
            Mapping::None => q,
            Mapping::Platt { a, b } => {
                let q = q.clamp(1e-12, 1.0 - 1e-12);
                let z = a * (q / (1.0 - q)).ln() + b;
                1.0 / (1.0 + (-z).exp())
            }
            Mapping::Isotonic { x, y } => {
                let i = x.partition_point(|&xi| xi < q);
                if i == 0 {
                    y[0]
                } else if i == x.len() {
                    y[x.len() - 1]
                } else {
                    let t = (q - x[i - 1]) / (x[i] - x[i - 1]);
                    y[i - 1] + t * (y[i] - y[i - 1])
                }
            }
        };
        q as f32
    }
}

impl ModelManifest {
    /// The trainer's offline metrics (`metrics` object), if any.
    pub fn metrics(&self) -> serde_json::Value {
        self.extra.get("metrics").cloned().unwrap_or_else(|| serde_json::json!({}))
    }
}

/// Reads and checks `path`: a version, registry features each named once,
/// a 64-hex-digit `onnx_sha256`.
pub fn read_manifest(path: &Path) -> Result<ModelManifest, ManifestError> {
    let bad = |why: String| ManifestError::Invalid { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let manifest: ModelManifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.model_version.is_empty() || manifest.model_version.len() > 128 {
        return Err(bad("model_version must be 1 to 128 bytes".into()));
    }
    if manifest.feature_order.is_empty() {
        return Err(bad("feature_order is empty".into()));
    }
    if manifest.onnx_sha256.len() != 64 || !manifest.onnx_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("onnx_sha256 {:?} is not 64 hex digits", manifest.onnx_sha256)));
    }
    if let Some(c) = &manifest.calibration {
        c.check().map_err(bad)?;
    }
    let registry = adserve_features::registry();
    for (i, name) in manifest.feature_order.iter().enumerate() {
        if registry.index_of(name).is_none() {
            return Err(bad(format!("feature {name:?} is not in the feature registry")));
        }
        if manifest.feature_order[..i].contains(name) {
            return Err(bad(format!("feature {name:?} is listed twice")));
        }
    }
    check_typed_inputs(&manifest).map_err(bad)?;
    Ok(manifest)
}

/// Each typed input has a name no other input or the output has, at least
/// one feature, and only registry features of its dtype's type, none of
/// them fed to the model twice.
fn check_typed_inputs(m: &ModelManifest) -> Result<(), String> {
    let registry = adserve_features::registry();
    let mut names = vec![m.input_name.as_str(), m.output_name.as_str()];
    let mut fed: Vec<&str> = Vec::new();
    for (i, input) in m.typed_inputs.iter().enumerate() {
        let at = format!("typed_inputs[{i}]");
        if input.name.is_empty() || names.contains(&input.name.as_str()) {
            return Err(format!("{at}.name {:?} is empty or names another input or the output", input.name));
        }
        names.push(&input.name);
        if input.features.is_empty() {
            return Err(format!("{at} ({:?}) lists no features", input.name));
        }
        let (kind, of_kind) = match input.dtype {
            InputDtype::Int64 => ("categorical", &registry.categorical),
            InputDtype::Float32 => ("embedding", &registry.embeddings),
        };
        for name in &input.features {
            if !of_kind.iter().any(|f| &f.name == name) {
                return Err(format!(
                    "{at} ({:?}, {}): feature {name:?} is not a registry {kind} feature",
                    input.name,
                    input.dtype.as_str()
                ));
            }
            if fed.contains(&name.as_str()) {
                return Err(format!("{at} ({:?}): feature {name:?} is listed twice", input.name));
            }
            fed.push(name);
        }
    }
    Ok(())
}

/// Reads `dir/manifest.json` and `dir/model.onnx` and checks that the file
/// hashes to the manifest's `onnx_sha256`. Returns both, so the caller loads
/// exactly the bytes that were checked.
pub fn read_model_dir(dir: &Path) -> Result<(ModelManifest, Vec<u8>), ManifestError> {
    let manifest = read_manifest(&dir.join("manifest.json"))?;
    let path = dir.join("model.onnx");
    let bytes = std::fs::read(&path).map_err(|source| ManifestError::File { path, source })?;
    let got = hex::encode(Sha256::digest(&bytes));
    if !got.eq_ignore_ascii_case(&manifest.onnx_sha256) {
        return Err(ManifestError::Checksum { want: manifest.onnx_sha256.clone(), got });
    }
    Ok((manifest, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json() -> String {
        format!(
            r#"{{"model_version":"v","input_name":"features","output_name":"pctr","feature_order":["user_ctr_30d"],
            "onnx_sha256":"{}","metrics":{{"auc":0.7}}}}"#,
            "ab".repeat(32)
        )
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manifest.json");
        for (from, to, want) in [
            (r#"["user_ctr_30d"]"#, r#"["nope"]"#, "\"nope\" is not in the feature registry"),
            (r#"["user_ctr_30d"]"#, r#"["user_ctr_30d","user_ctr_30d"]"#, "listed twice"),
            (&"ab".repeat(32), "xyz", "not 64 hex digits"),
            (r#""model_version":"v""#, r#""model_version":"""#, "model_version"),
            (r#""onnx_sha256""#, r#""other""#, "onnx_sha256"),
        ] {
            std::fs::write(&path, manifest_json().replace(from, to)).expect("write");
            let err = read_manifest(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        std::fs::write(&path, manifest_json()).expect("write");
        let m = read_manifest(&path).expect("the untouched manifest reads");
        assert_eq!(m.metrics()["auc"], 0.7);
    }

    #[test]
    fn typed_inputs_name_registry_features_of_their_dtype() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manifest.json");
        let with = |inputs: &str| {
            let json = manifest_json().replace(r#""metrics""#, &format!(r#""typed_inputs":{inputs},"metrics""#));
            std::fs::write(&path, json).expect("write");
            read_manifest(&path)
        };
        let m = with(r#"[{"name":"categorical","dtype":"int64","features":["ctx_device_id","ctx_placement_id"]}]"#)
            .expect("two registry categoricals");
        assert_eq!(m.typed_inputs[0].dtype, InputDtype::Int64);
        assert_eq!(m.typed_inputs[0].width(), 2);
        for (inputs, want) in [
            (r#"[{"name":"c","dtype":"int64","features":["user_ctr_30d"]}]"#, "not a registry categorical feature"),
            (r#"[{"name":"e","dtype":"float32","features":["ctx_device_id"]}]"#, "not a registry embedding feature"),
            (r#"[{"name":"features","dtype":"int64","features":["ctx_device_id"]}]"#, "names another input"),
            (r#"[{"name":"pctr","dtype":"int64","features":["ctx_device_id"]}]"#, "names another input"),
            (r#"[{"name":"c","dtype":"int64","features":[]}]"#, "lists no features"),
            (
                r#"[{"name":"a","dtype":"int64","features":["ctx_device_id"]},{"name":"b","dtype":"int64","features":["ctx_device_id"]}]"#,
                "typed_inputs[1] (\"b\"): feature \"ctx_device_id\" is listed twice",
            ),
            (r#"[{"name":"c","dtype":"int32","features":["ctx_device_id"]}]"#, "unknown variant `int32`"),
        ] {
            let err = with(inputs).unwrap_err().to_string();
            assert!(err.contains(want), "{inputs}: {err}");
        }
        // Written back, a manifest without typed inputs has no such key.
        let plain: ModelManifest = serde_json::from_str(&manifest_json()).expect("plain");
        assert!(!serde_json::to_string(&plain).expect("json").contains("typed_inputs"));
    }

    #[test]
    fn downsampling_correction_and_mappings_calibrate_as_defined() {
        let close = |a: f32, b: f64| (f64::from(a) - b).abs() < 1e-6;
        // keep_rate 0.1: odds scale by 0.1; p = 0.5 (odds 1) -> odds 0.1.
        let c = Calibration { keep_rate: 0.1, mapping: Mapping::None };
        assert!(close(c.apply(0.5), 0.1 / 1.1));
        assert_eq!(c.apply(0.0), 0.0);
        assert!(close(c.apply(1.0), 1.0));
        // Platt with a = 1, b = 0 is the identity; b shifts the logit.
        let id = Calibration { keep_rate: 1.0, mapping: Mapping::Platt { a: 1.0, b: 0.0 } };
        assert!(close(id.apply(0.3), 0.3));
        let shift = Calibration { keep_rate: 1.0, mapping: Mapping::Platt { a: 1.0, b: (0.5f64).ln() } };
        assert!(close(shift.apply(0.5), 1.0 / 3.0));
        // Isotonic: interpolated between points, flat outside.
        let iso = Calibration {
            keep_rate: 1.0,
            mapping: Mapping::Isotonic { x: vec![0.1, 0.5, 0.9], y: vec![0.05, 0.4, 0.8] },
        };
        assert!(close(iso.apply(0.3), 0.225));
        assert!(close(iso.apply(0.01), 0.05));
        assert!(close(iso.apply(0.95), 0.8));
        assert!(close(iso.apply(0.5), 0.4));
        // Monotone in p, for each mapping.
        for c in [&c, &shift, &iso] {
            let ps: Vec<f32> = (0..=100).map(|i| c.apply(i as f32 / 100.0)).collect();
            assert!(ps.windows(2).all(|w| w[0] <= w[1]), "{c:?}");
        }
    }

    #[test]
    fn bad_calibrations_are_refused_by_name() {
        for (json, want) in [
            (r#"{"keep_rate":0}"#, "keep_rate 0"),
            (r#"{"keep_rate":1.5}"#, "keep_rate 1.5"),
            (r#"{"mapping":{"method":"platt","a":-1,"b":0}}"#, "a must be > 0"),
            (r#"{"mapping":{"method":"isotonic","x":[0.5,0.2],"y":[0.1,0.2]}}"#, "strictly increasing"),
            (r#"{"mapping":{"method":"isotonic","x":[0.2,0.5],"y":[0.3,0.2]}}"#, "non-decreasing"),
            (r#"{"mapping":{"method":"isotonic","x":[0.2],"y":[0.3]}}"#, ">= 2"),
        ] {
            let c: Calibration = serde_json::from_str(json).expect(json);
            let err = c.check().unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert!(serde_json::from_str::<Calibration>(r#"{"mapping":{"method":"beta"}}"#).is_err());
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manifest.json");
        let with = manifest_json().replace(r#""metrics""#, r#""calibration":{"keep_rate":2},"metrics""#);
        std::fs::write(&path, with).expect("write");
        assert!(read_manifest(&path).unwrap_err().to_string().contains("keep_rate 2"));
    }

    #[test]
    fn a_model_file_that_does_not_hash_to_its_manifest_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("model.onnx"), b"bytes").expect("write");
        std::fs::write(dir.path().join("manifest.json"), manifest_json()).expect("write");
        assert!(matches!(read_model_dir(dir.path()), Err(ManifestError::Checksum { .. })));
        let sha = hex::encode(Sha256::digest(b"bytes"));
        std::fs::write(dir.path().join("manifest.json"), manifest_json().replace(&"ab".repeat(32), &sha))
            .expect("write");
        let (m, bytes) = read_model_dir(dir.path()).expect("matching file");
        assert_eq!((m.onnx_sha256, bytes), (sha, b"bytes".to_vec()));
    }
}
