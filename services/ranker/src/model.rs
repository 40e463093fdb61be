//! Loading a CTR model (ONNX + manifest) and scoring matrices with it.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use adserve_proto::v1::FeatureMatrix;
use ort::{environment::Environment, session::Session, value::Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{ExecutionProvider, ModelConfig};

/// Lowest pCTR handed to the auction (a sigmoid can underflow to 0, and the
/// auction divides by pCTR to price): the auction's own floor.
pub use adserve_auction::MIN_PCTR;

/// `manifest.json`, written by the trainer next to `model.onnx`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelManifest {
    /// Unique model version, logged with every impression.
    pub model_version: String,
    /// Name of the `[N, F]` float32 input.
    pub input_name: String,
    /// Name of the `[N, 1]` (or `[N]`) float32 output.
    pub output_name: String,
    /// Feature names, in the model's column order.
    pub feature_order: Vec<String>,
    /// Anything else the trainer recorded (metrics, data, timestamps).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why a model cannot be loaded or cannot score a request.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest is missing or malformed.
    #[error("model manifest {path}: {why}")]
    Manifest {
        /// Manifest path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The ONNX Runtime shared library could not be loaded.
    #[error("onnxruntime: cannot load {dylib}: {source}")]
    Load {
        /// Path or name of `libonnxruntime.so`.
        dylib: String,
        /// Why (ort's load error: file missing, wrong version, ...).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// ONNX Runtime failed at one stage of loading or scoring.
    #[error("onnxruntime: {stage}: {source}")]
    Runtime {
        /// What was being done (`building the session`, `run`, ...).
        stage: &'static str,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// The ONNX graph does not match its manifest.
    #[error("model.onnx does not match its manifest: {0}")]
    Mismatch(String),
    /// A scoring call panicked while holding the session.
    #[error("onnxruntime session lock poisoned by an earlier panic")]
    Poisoned,
    /// The request matrix does not fit the model.
    #[error("{0}")]
    BadInput(String),
    /// The model produced something that is not a probability.
    #[error("model output: {0}")]
    BadOutput(String),
}

/// The process-wide ONNX Runtime environment (ONNX Runtime allows one).
fn environment(dylib: &str) -> Result<&'static Environment, ModelError> {
    static ENV: OnceLock<Environment> = OnceLock::new();
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let env = ort::init_from(dylib)
        .map_err(|e| ModelError::Load { dylib: dylib.to_string(), source: Box::new(e) })?
        .with_name("adserve-ranker")
        .with_telemetry(false)
        .build()
        .map_err(|source| ModelError::Runtime { stage: "creating the environment", source })?;
    Ok(ENV.get_or_init(|| env))
}

/// A loaded, ready-to-score CTR model.
pub struct CtrModel {
    manifest: ModelManifest,
    /// `Session::run` needs `&mut`; dynamic batching (a later step) replaces
    /// this lock with a queue that owns the session.
    session: Mutex<Session>,
    provider: ExecutionProvider,
}

impl std::fmt::Debug for CtrModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrModel")
            .field("version", &self.manifest.model_version)
            .field("provider", &self.provider)
            .finish()
    }
}

impl CtrModel {
    /// Loads `dir/manifest.json` and `dir/model.onnx`, checks the manifest
    /// against the feature registry, and builds a session on the requested
    /// execution provider (CPU when it is unavailable).
    pub fn load(config: &ModelConfig, dylib: &str) -> Result<Self, ModelError> {
        let manifest = read_manifest(&config.dir.join("manifest.json"))?;
        let env = environment(dylib)?;
        let runtime = |stage| move |source| ModelError::Runtime { stage, source };
        let mut builder = Session::builder(env).map_err(runtime("creating a session builder"))?;
        if config.intra_threads > 0 {
            builder = builder
                .with_intra_threads(config.intra_threads)
                .map_err(|e| runtime("setting intra-op threads")(e.into()))?;
        }
        let (mut builder, provider) = with_provider(builder, config);
        let session = builder.commit_from_file(config.dir.join("model.onnx")).map_err(runtime("loading model.onnx"))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        if !names.contains(&manifest.input_name.as_str()) {
            return Err(ModelError::Mismatch(format!(
                "model.onnx has inputs {names:?}, manifest input_name is {:?}",
                manifest.input_name
            )));
        }
        tracing::info!(version = %manifest.model_version, ?provider, features = manifest.feature_order.len(), "model loaded");
        Ok(Self { manifest, session: Mutex::new(session), provider })
    }

    /// The manifest of this model.
    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// The execution provider actually in use.
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// Scores every row of `matrix`. Columns are picked by name in the
    /// manifest's order; extra columns are ignored, missing ones are an error.
    /// Blocking (runs ONNX Runtime): call from `spawn_blocking`.
    pub fn score(&self, matrix: &FeatureMatrix) -> Result<Vec<f32>, ModelError> {
        matrix.check_shape().map_err(ModelError::BadInput)?;
        let rows = matrix.num_rows as usize;
        let cols = matrix.num_cols();
        let index: Vec<usize> = self
            .manifest
            .feature_order
            .iter()
            .map(|name| {
                matrix.feature_names.iter().position(|n| n == name).ok_or_else(|| {
                    ModelError::BadInput(format!(
                        "matrix.feature_names lacks {name:?}, which model {} needs",
                        self.manifest.model_version
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let width = index.len();
        let mut input = Vec::with_capacity(rows * width);
        for r in 0..rows {
            let row = &matrix.values[r * cols..(r + 1) * cols];
            for (c, &i) in index.iter().enumerate() {
                let v = row[i];
                if !v.is_finite() {
                    return Err(ModelError::BadInput(format!(
                        "matrix.values row {r} feature {:?} is {v}",
                        self.manifest.feature_order[c]
                    )));
                }
                input.push(v);
            }
        }
        let tensor = Tensor::from_array(([rows, width], input))
            .map_err(|source| ModelError::Runtime { stage: "building the input tensor", source })?;
        let mut session = self.session.lock().map_err(|_| ModelError::Poisoned)?;
        let outputs = session
            .run(ort::inputs![self.manifest.input_name.as_str() => tensor])
            .map_err(|source| ModelError::Runtime { stage: "run", source })?;
        let output = outputs
            .get(self.manifest.output_name.as_str())
            .ok_or_else(|| ModelError::BadOutput(format!("no output named {:?}", self.manifest.output_name)))?;
        let (_, values) = output.try_extract_tensor::<f32>().map_err(|e| ModelError::BadOutput(e.to_string()))?;
        if values.len() != rows {
            return Err(ModelError::BadOutput(format!("{} values for {rows} rows", values.len())));
        }
        values
            .iter()
            .map(|&p| {
                if p.is_finite() && (0.0..=1.0).contains(&p) {
                    Ok(p.max(MIN_PCTR))
                } else {
                    Err(ModelError::BadOutput(format!("pCTR {p} is not a probability")))
                }
            })
            .collect()
    }
}

fn read_manifest(path: &Path) -> Result<ModelManifest, ModelError> {
    let bad = |why: String| ModelError::Manifest { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let manifest: ModelManifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.model_version.is_empty() {
        return Err(bad("model_version is empty".into()));
    }
    if manifest.feature_order.is_empty() {
        return Err(bad("feature_order is empty".into()));
    }
    let registry = adserve_features::registry();
    for name in &manifest.feature_order {
        if registry.index_of(name).is_none() {
            return Err(bad(format!("feature {name:?} is not in the feature registry")));
        }
    }
    Ok(manifest)
}

type Builder = ort::session::builder::SessionBuilder;

/// Registers the requested GPU provider when compiled in; on any failure logs
/// a warning and returns the builder unchanged (CPU).
fn with_provider(builder: Builder, config: &ModelConfig) -> (Builder, ExecutionProvider) {
    match config.execution_provider {
        ExecutionProvider::Cpu => (builder, ExecutionProvider::Cpu),
        #[cfg(feature = "cuda")]
        ExecutionProvider::Cuda => {
            let ep = ort::ep::CUDA::default().with_device_id(config.device_id).build().error_on_failure();
            match builder.with_execution_providers([ep]) {
                Ok(b) => (b, ExecutionProvider::Cuda),
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA execution provider unavailable, falling back to CPU");
                    (e.recover(), ExecutionProvider::Cpu)
                }
            }
        }
        #[cfg(feature = "tensorrt")]
        ExecutionProvider::Tensorrt => {
            let eps = [
                ort::ep::TensorRT::default().with_device_id(config.device_id).build().error_on_failure(),
                ort::ep::CUDA::default().with_device_id(config.device_id).build(),
            ];
            match builder.with_execution_providers(eps) {
                Ok(b) => (b, ExecutionProvider::Tensorrt),
                Err(e) => {
                    tracing::warn!(error = %e, "TensorRT execution provider unavailable, falling back to CPU");
                    (e.recover(), ExecutionProvider::Cpu)
                }
            }
        }
        #[allow(unreachable_patterns)]
        other => {
            tracing::warn!(requested = ?other, "this build has no GPU execution providers (cargo features cuda/tensorrt); using CPU");
            (builder, ExecutionProvider::Cpu)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed baseline model. Fails (rather than passing vacuously)
    /// without ONNX Runtime: `make test` sets ORT_DYLIB_PATH.
    fn baseline() -> CtrModel {
        let dylib = std::env::var("ORT_DYLIB_PATH")
            .expect("ORT_DYLIB_PATH is unset: run the ranker tests through `make test` (scripts/env.sh)");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-baseline");
        let config = ModelConfig { dir, ..ModelConfig::default() };
        CtrModel::load(&config, &dylib).expect("baseline model loads")
    }

    fn matrix(model: &CtrModel, rows: usize) -> FeatureMatrix {
        let registry = adserve_features::registry();
        let names: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
        let mut values = Vec::new();
        for r in 0..rows {
            values.extend(registry.defaults().iter().map(|d| d + r as f32 * 0.01));
        }
        assert!(model.manifest().feature_order.iter().all(|f| names.contains(f)));
        FeatureMatrix { feature_names: names, num_rows: rows as u32, values }
    }

    #[test]
    fn scores_are_probabilities_one_per_row() {
        let model = baseline();
        let scores = model.score(&matrix(&model, 7)).expect("scores");
        assert_eq!(scores.len(), 7);
        assert!(scores.iter().all(|p| (MIN_PCTR..=1.0).contains(p)));
    }

    #[test]
    fn columns_are_matched_by_name_not_position() {
        let model = baseline();
        let m = matrix(&model, 3);
        let want = model.score(&m).expect("scores");
        // Reverse the column order: same features, same scores.
        let cols = m.num_cols();
        let mut names = m.feature_names.clone();
        names.reverse();
        let mut values = Vec::new();
        for r in 0..3 {
            let mut row = m.row(r).expect("row").to_vec();
            row.reverse();
            values.extend(row);
        }
        let reversed = FeatureMatrix { feature_names: names, num_rows: 3, values };
        assert_eq!(reversed.values.len(), 3 * cols);
        assert_eq!(model.score(&reversed).expect("scores"), want);
    }

    #[test]
    fn a_missing_feature_is_named() {
        let model = baseline();
        let mut m = matrix(&model, 1);
        let missing = model.manifest().feature_order[0].clone();
        let i = m.feature_names.iter().position(|n| *n == missing).expect("present");
        m.feature_names.remove(i);
        m.values.remove(i);
        let err = model.score(&m).unwrap_err().to_string();
        assert!(err.contains(&missing), "{err}");
    }

    #[test]
    fn ragged_and_non_finite_matrices_are_rejected() {
        let model = baseline();
        let mut m = matrix(&model, 2);
        m.values.pop();
        assert!(matches!(model.score(&m), Err(ModelError::BadInput(_))));
        let mut m = matrix(&model, 2);
        m.values[3] = f32::NAN;
        let err = model.score(&m).unwrap_err().to_string();
        assert!(err.contains("row 0"), "{err}");
    }

    #[test]
    fn manifest_with_unregistered_feature_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manifest.json");
        std::fs::write(
            &path,
            r#"{"model_version":"v","input_name":"features","output_name":"pctr","feature_order":["nope"]}"#,
        )
        .expect("write");
        let err = read_manifest(&path).unwrap_err().to_string();
        assert!(err.contains("\"nope\" is not in the feature registry"), "{err}");
    }
}
