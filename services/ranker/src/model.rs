//! Loading a CTR model (ONNX + manifest): the checks that keep a bad model
//! out of service, the execution providers, and the sessions it runs on.
//!
//! A model is refused at load, never at its first request: the manifest must
//! name features the registry knows, `model.onnx` must hash to the manifest's
//! `onnx_sha256` (a torn or swapped file), the graph's input and output must
//! have the names, dtypes and widths the manifest promises, and a warm-up run
//! on every session must return one probability per row.

use std::sync::OnceLock;

use adserve_proto::v1::FeatureMatrix;
pub use adserve_registry::ModelManifest;
use adserve_registry::{ManifestError, read_model_dir};
use ort::{
    environment::Environment,
    session::Session,
    value::{TensorElementType, ValueType},
};

use crate::{
    batcher::Batcher,
    config::{BatchingConfig, ExecutionProvider, ModelConfig},
};

/// Lowest pCTR handed to the auction (a sigmoid can underflow to 0, and the
/// auction divides by pCTR to price): the auction's own floor.
pub use adserve_auction::MIN_PCTR;

/// Why a model cannot be loaded or a batch cannot be scored.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest is missing or malformed, the file unreadable, or not
    /// the file the manifest describes.
    #[error(transparent)]
    Artifact(#[from] ManifestError),
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
    /// The model produced something that is not a probability.
    #[error("model output: {0}")]
    BadOutput(String),
    /// The loading task panicked.
    #[error("loading the model panicked: {0}")]
    Panicked(String),
}

impl ModelError {
    /// Short label for `adserve_ranker_model_load_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Artifact(ManifestError::Invalid { .. }) => "manifest",
            Self::Artifact(ManifestError::File { .. }) => "file",
            Self::Artifact(ManifestError::Checksum { .. }) => "checksum",
            Self::Load { .. } => "onnxruntime_library",
            Self::Runtime { .. } => "onnxruntime",
            Self::Mismatch(_) => "mismatch",
            Self::BadOutput(_) => "bad_output",
            Self::Panicked(_) => "panic",
        }
    }
}

static ENV: OnceLock<Environment> = OnceLock::new();

/// The process-wide ONNX Runtime environment (ONNX Runtime allows one;
/// concurrent first loads wait for the one that creates it).
pub(crate) fn environment(dylib: &str) -> Result<&'static Environment, ModelError> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let _init = INIT.lock().unwrap_or_else(|p| p.into_inner());
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

/// A loaded, checked, warmed-up CTR model with its batching queue.
pub struct CtrModel {
    manifest: ModelManifest,
    provider: ExecutionProvider,
    batcher: Batcher,
}

impl std::fmt::Debug for CtrModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrModel")
            .field("version", &self.manifest.model_version)
            .field("provider", &self.provider)
            .finish()
    }
}

impl Drop for CtrModel {
    fn drop(&mut self) {
        metrics::gauge!(
            "adserve_ranker_sessions",
            "model_version" => self.manifest.model_version.clone(),
            "provider" => self.provider.as_str(),
        )
        .set(0.0);
    }
}

impl CtrModel {
    /// Loads `dir/manifest.json` and `dir/model.onnx`, checks both, builds
    /// `batching.sessions` sessions on the first execution provider that
    /// works, warms each up (1 row, a full batch, and a `max_rows` call), and
    /// starts the batching queue. Any failure is counted in
    /// `adserve_ranker_model_load_failures_total{reason}`.
    /// Blocking (file I/O, graph optimisation): call it off the runtime.
    pub fn load(
        config: &ModelConfig,
        batching: &BatchingConfig,
        max_rows: usize,
        dylib: &str,
    ) -> Result<Self, ModelError> {
        Self::try_load(config, batching, max_rows, dylib).inspect_err(|e| {
            metrics::counter!("adserve_ranker_model_load_failures_total", "reason" => e.reason()).increment(1);
            tracing::error!(dir = %config.dir.display(), error = %e, "model refused");
        })
    }

    fn try_load(
        config: &ModelConfig,
        batching: &BatchingConfig,
        max_rows: usize,
        dylib: &str,
    ) -> Result<Self, ModelError> {
        let (manifest, bytes) = read_model_dir(&config.dir)?;
        let env = environment(dylib)?;
        // A GPU provider can register and still fail when the session is
        // built or first run (no device, a TensorRT engine build error): then
        // the whole pool is rebuilt from the next provider in the list. On
        // CPU a failure is the model's own, and refuses it.
        let mut start = 0;
        let (sessions, provider) = loop {
            let (provider, next) = resolve_providers(config, start);
            match build_pool(env, config, &bytes, &manifest, batching, max_rows, next) {
                Ok(sessions) => break (sessions, provider),
                Err(e) if provider != ExecutionProvider::Cpu => {
                    fallback(provider, "session_failed", &e.to_string());
                    start = next + 1;
                }
                Err(e) => return Err(e),
            }
        };
        metrics::gauge!(
            "adserve_ranker_sessions",
            "model_version" => manifest.model_version.clone(),
            "provider" => provider.as_str(),
        )
        .set(sessions.len() as f64);
        tracing::info!(
            version = %manifest.model_version,
            provider = provider.as_str(),
            sessions = sessions.len(),
            features = manifest.feature_order.len(),
            max_batch_rows = batching.max_batch_rows,
            max_queue_delay = ?batching.max_queue_delay,
            "model loaded"
        );
        let batcher = Batcher::start(sessions, manifest.clone(), batching.clone());
        Ok(Self { manifest, provider, batcher })
    }

    /// The manifest of this model.
    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// The execution provider the sessions actually got.
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// The batching queue scoring for this model.
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    /// The request's rows, gathered by name into the model's column order
    /// (`rows × features`, row-major). Extra columns are ignored; a missing
    /// column, a ragged matrix or a non-finite value is refused, named.
    pub fn gather(&self, matrix: &FeatureMatrix) -> Result<Vec<f32>, String> {
        gather(matrix, &self.manifest)
    }
}

/// See [`CtrModel::gather`].
pub fn gather(matrix: &FeatureMatrix, manifest: &ModelManifest) -> Result<Vec<f32>, String> {
    matrix.check_shape()?;
    let rows = matrix.num_rows as usize;
    let cols = matrix.num_cols();
    let index: Vec<usize> = manifest
        .feature_order
        .iter()
        .map(|name| {
            matrix.feature_names.iter().position(|n| n == name).ok_or_else(|| {
                format!("matrix.feature_names lacks {name:?}, which model {} needs", manifest.model_version)
            })
        })
        .collect::<Result<_, _>>()?;
    let mut input = Vec::with_capacity(rows * index.len());
    for (r, row) in matrix.values.chunks_exact(cols.max(1)).take(rows).enumerate() {
        for (c, &i) in index.iter().enumerate() {
            let v = row[i];
            if !v.is_finite() {
                return Err(format!("matrix.values row {r} feature {:?} is {v}", manifest.feature_order[c]));
            }
            input.push(v);
        }
    }
    Ok(input)
}

/// The graph must take exactly one float32 `[N, F]` input named as the
/// manifest says, with F equal to the manifest's feature count (or dynamic)
/// and N dynamic (batching stacks calls), and produce a float32 `[N]` or
/// `[N, 1]` output under the manifest's output name.
fn check_graph(session: &Session, m: &ModelManifest) -> Result<(), ModelError> {
    let mismatch = |s: String| Err(ModelError::Mismatch(s));
    let inputs = session.inputs();
    let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
    let [input] = inputs else {
        return mismatch(format!("model.onnx has inputs {names:?}; this ranker feeds exactly one, {:?}", m.input_name));
    };
    if input.name() != m.input_name {
        return mismatch(format!("model.onnx has input {:?}, manifest input_name is {:?}", input.name(), m.input_name));
    }
    let (ty, shape) = tensor_of(input.dtype());
    if ty != Some(TensorElementType::Float32) {
        return mismatch(format!("input {:?} is {}, not a float32 tensor", m.input_name, describe(input.dtype())));
    }
    let width = m.feature_order.len() as i64;
    match shape.as_deref() {
        Some([n, f]) if *n < 0 && (*f < 0 || *f == width) => {}
        Some([n, _]) if *n >= 0 => {
            return mismatch(format!(
                "input {:?} has a fixed batch dimension {n}; requests are stacked, so it must be dynamic",
                m.input_name
            ));
        }
        Some([_, f]) => {
            return mismatch(format!("input {:?} has {f} columns, manifest feature_order has {width}", m.input_name));
        }
        other => return mismatch(format!("input {:?} has shape {other:?}, not [N, {width}]", m.input_name)),
    }
    let outputs = session.outputs();
    let Some(output) = outputs.iter().find(|o| o.name() == m.output_name) else {
        let names: Vec<&str> = outputs.iter().map(|o| o.name()).collect();
        return mismatch(format!("model.onnx has outputs {names:?}, manifest output_name is {:?}", m.output_name));
    };
    let (ty, shape) = tensor_of(output.dtype());
    if ty != Some(TensorElementType::Float32) {
        return mismatch(format!("output {:?} is {}, not a float32 tensor", m.output_name, describe(output.dtype())));
    }
    match shape.as_deref() {
        Some([_]) | Some([_, 1]) | Some([_, -1]) => Ok(()),
        other => mismatch(format!("output {:?} has shape {other:?}, not [N] or [N, 1]", m.output_name)),
    }
}

fn tensor_of(t: &ValueType) -> (Option<TensorElementType>, Option<Vec<i64>>) {
    match t {
        ValueType::Tensor { ty, shape, .. } => (Some(*ty), Some(shape.to_vec())),
        _ => (None, None),
    }
}

fn describe(t: &ValueType) -> String {
    match t {
        ValueType::Tensor { ty, .. } => format!("a {ty:?} tensor"),
        other => format!("{other:?}"),
    }
}

/// Runs the registry's defaults at each of `sizes` rows (one row, a full
/// batch, the largest call): graph initialisation, allocator growth and, on
/// TensorRT, engine builds for those shapes happen now, not on a request;
/// and a graph that fails at run time (a wrong width behind a dynamic
/// dimension) is refused.
fn warm_up(session: &mut Session, manifest: &ModelManifest, sizes: &[usize]) -> Result<(), ModelError> {
    let registry = adserve_features::registry();
    let defaults = registry.defaults();
    let row: Vec<f32> =
        manifest.feature_order.iter().map(|n| registry.index_of(n).map(|i| defaults[i]).unwrap_or_default()).collect();
    for &rows in sizes {
        let input: Vec<f32> = row.iter().copied().cycle().take(rows * row.len()).collect();
        let scores = run(session, manifest, input, rows)?;
        if let Some((i, p)) = scores.iter().enumerate().find(|(_, p)| !(p.is_finite() && (0.0..=1.0).contains(*p))) {
            return Err(ModelError::BadOutput(format!("warm-up row {i} scored {p}, not a probability")));
        }
    }
    Ok(())
}

/// One `session.run` over `rows` rows (`input` is `rows × features`): the
/// raw output, one value per row.
pub(crate) fn run(
    session: &mut Session,
    manifest: &ModelManifest,
    input: Vec<f32>,
    rows: usize,
) -> Result<Vec<f32>, ModelError> {
    let width = manifest.feature_order.len();
    let tensor = ort::value::Tensor::from_array(([rows, width], input))
        .map_err(|source| ModelError::Runtime { stage: "building the input tensor", source })?;
    let outputs = session
        .run(ort::inputs![manifest.input_name.as_str() => tensor])
        .map_err(|source| ModelError::Runtime { stage: "run", source })?;
    let output = outputs
        .get(manifest.output_name.as_str())
        .ok_or_else(|| ModelError::BadOutput(format!("no output named {:?}", manifest.output_name)))?;
    let (_, values) = output.try_extract_tensor::<f32>().map_err(|e| ModelError::BadOutput(e.to_string()))?;
    if values.len() != rows {
        return Err(ModelError::BadOutput(format!("{} values for {rows} rows", values.len())));
    }
    Ok(values.to_vec())
}

/// `batching.sessions` sessions with the providers from `list[first..]`
/// registered, the graph checked and each session warmed up.
#[allow(clippy::too_many_arguments)]
fn build_pool(
    env: &Environment,
    config: &ModelConfig,
    bytes: &[u8],
    manifest: &ModelManifest,
    batching: &BatchingConfig,
    max_rows: usize,
    first: usize,
) -> Result<Vec<Session>, ModelError> {
    let mut sizes = vec![1, batching.max_batch_rows, max_rows];
    sizes.dedup();
    let mut sessions = Vec::with_capacity(batching.sessions);
    for i in 0..batching.sessions {
        let mut session = build_session(env, config, bytes, first)?;
        if i == 0 {
            check_graph(&session, manifest)?;
        }
        warm_up(&mut session, manifest, &sizes)?;
        sessions.push(session);
    }
    Ok(sessions)
}

fn build_session(env: &Environment, config: &ModelConfig, bytes: &[u8], first: usize) -> Result<Session, ModelError> {
    let runtime = |stage| move |source| ModelError::Runtime { stage, source };
    let mut builder = Session::builder(env).map_err(runtime("creating a session builder"))?;
    if config.intra_threads > 0 {
        builder = builder
            .with_intra_threads(config.intra_threads)
            .map_err(|e| runtime("setting intra-op threads")(e.into()))?;
    }
    let list = &config.execution_providers;
    if let Some(&ep) = list.get(first).filter(|&&ep| ep != ExecutionProvider::Cpu) {
        let eps: Vec<_> = list[first..]
            .iter()
            .filter_map(|&e| dispatch(e, config))
            .enumerate()
            .map(|(i, d)| if i == 0 { d.error_on_failure() } else { d.fail_silently() })
            .collect();
        builder = builder.with_execution_providers(eps).map_err(|e| ModelError::Runtime {
            stage: if ep == ExecutionProvider::Tensorrt { "registering TensorRT" } else { "registering CUDA" },
            source: e.into(),
        })?;
    }
    builder.commit_from_memory(bytes).map_err(runtime("loading model.onnx"))
}

type Builder = ort::session::builder::SessionBuilder;

/// The first provider of `model.execution_providers[start..]` that this
/// build and this ONNX Runtime can register (probed on a throwaway builder),
/// and its index; CPU (at the list's length when the list ends on GPUs)
/// when none can. Each one passed over is logged and counted once in
/// `adserve_ranker_provider_fallbacks_total{requested,reason}`.
fn resolve_providers(config: &ModelConfig, start: usize) -> (ExecutionProvider, usize) {
    let list = &config.execution_providers;
    for (i, &ep) in list.iter().enumerate().skip(start) {
        if ep == ExecutionProvider::Cpu {
            return (ExecutionProvider::Cpu, i);
        }
        let Some(dispatch) = dispatch(ep, config) else {
            fallback(ep, "not_compiled", "this build lacks the cargo feature (cuda / tensorrt)");
            continue;
        };
        let probe = ENV.get().map(Session::builder).and_then(Result::ok).map(|b: Builder| {
            b.with_execution_providers([dispatch.error_on_failure()]).map(|_| ()).map_err(|e| e.to_string())
        });
        match probe {
            Some(Ok(())) => return (ep, i),
            Some(Err(e)) => fallback(ep, "unavailable", &e),
            None => fallback(ep, "unavailable", "no ONNX Runtime session builder"),
        }
    }
    (ExecutionProvider::Cpu, list.len())
}

fn fallback(ep: ExecutionProvider, reason: &'static str, detail: &str) {
    metrics::counter!("adserve_ranker_provider_fallbacks_total", "requested" => ep.as_str(), "reason" => reason)
        .increment(1);
    tracing::warn!(requested = ep.as_str(), reason, detail, "execution provider not used; trying the next one");
}

/// The ort dispatch for a GPU provider, if compiled in.
#[allow(unused_variables)]
fn dispatch(ep: ExecutionProvider, config: &ModelConfig) -> Option<ort::ep::ExecutionProviderDispatch> {
    match ep {
        ExecutionProvider::Cpu => None,
        #[cfg(feature = "cuda")]
        ExecutionProvider::Cuda => Some(ort::ep::CUDA::default().with_device_id(config.device_id).build()),
        #[cfg(feature = "tensorrt")]
        ExecutionProvider::Tensorrt => {
            let mut trt = ort::ep::TensorRT::default().with_device_id(config.device_id).with_fp16(config.tensorrt.fp16);
            if let Some(dir) = &config.tensorrt.engine_cache_dir {
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display());
            }
            Some(trt.build())
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
