//! Loading a CTR model (ONNX + manifest): the checks that keep a bad model
//! out of service, the execution providers, and the sessions it runs on.
//!
//! A model is refused at load, never at its first request: the manifest must
//! name features the registry knows, `model.onnx` must hash to the manifest's
//! `onnx_sha256` (a torn or swapped file), the graph's inputs and output must
//! have the names, dtypes and widths the manifest promises, the rows of a
//! `reference.json` beside it must score as they did in the trainer's
//! onnxruntime, and a warm-up run on every session must return one
//! probability per row.

use std::sync::OnceLock;

use adserve_features::FeatureRegistry;
use adserve_proto::v1::FeatureMatrix;
pub use adserve_registry::ModelManifest;
use adserve_registry::{Arithmetic, InputDtype, ManifestError, Reference, TypedInput, read_model_dir};
use ort::{
    environment::Environment,
    session::Session,
    value::{TensorElementType, ValueType},
};

use crate::{
    batcher::{Batcher, QueueKind},
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
    /// `reference.json` is unreadable, or the sessions do not reproduce the
    /// outputs the trainer's onnxruntime gave its rows.
    #[error("reference.json: {0}")]
    Reference(String),
    /// The loading task panicked.
    #[error("loading the model panicked: {0}")]
    Panicked(String),
    /// The load took longer than `registry.load_timeout`. The follower
    /// stopped waiting for it; its thread (blocked on a hung file system,
    /// say) may still finish, and what it built then serves if the registry
    /// still wants it.
    #[error("loading took longer than registry.load_timeout ({0:?})")]
    TimedOut(std::time::Duration),
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
            Self::Reference(_) => "reference",
            Self::Panicked(_) => "panic",
            Self::TimedOut(_) => "timeout",
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
    queue: QueueKind,
    batcher: Batcher,
}

/// Sets the gauges that say what a loaded model runs on:
/// `adserve_ranker_sessions{model_version,provider,queue}` (its sessions) and
/// `adserve_ranker_provider_fallback{model_version,queue}` (1 while it runs on
/// a later provider than the first of `model.execution_providers`: a GPU
/// node scoring on CPU). Zeroed when the model is dropped.
fn publish_provider(
    manifest: &ModelManifest,
    provider: ExecutionProvider,
    queue: QueueKind,
    sessions: usize,
    fell_back: bool,
) {
    let (v, q) = (manifest.model_version.clone(), queue.as_str());
    metrics::gauge!("adserve_ranker_sessions", "model_version" => v.clone(), "provider" => provider.as_str(), "queue" => q)
        .set(sessions as f64);
    metrics::gauge!("adserve_ranker_provider_fallback", "model_version" => v, "queue" => q).set(if fell_back {
        1.0
    } else {
        0.0
    });
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
        publish_provider(&self.manifest, self.provider, self.queue, 0, false);
    }
}

impl CtrModel {
    /// Loads `dir/manifest.json` and `dir/model.onnx`, checks both, builds
    /// `batching.sessions` sessions on the first execution provider that
    /// works, warms each up (1 row, a full batch, and a `max_rows` call), and
    /// starts the batching queue (`queue` labels its metrics). Any failure is counted in
    /// `adserve_ranker_model_load_failures_total{reason}`.
    /// Blocking (file I/O, graph optimisation): call it off the runtime.
    pub fn load(
        config: &ModelConfig,
        batching: &BatchingConfig,
        max_rows: usize,
        dylib: &str,
        queue: QueueKind,
    ) -> Result<Self, ModelError> {
        Self::try_load(config, batching, max_rows, dylib, queue).inspect_err(|e| {
            metrics::counter!("adserve_ranker_model_load_failures_total", "reason" => e.reason()).increment(1);
            tracing::error!(dir = %config.dir.display(), error = %e, "model refused");
        })
    }

    fn try_load(
        config: &ModelConfig,
        batching: &BatchingConfig,
        max_rows: usize,
        dylib: &str,
        queue: QueueKind,
    ) -> Result<Self, ModelError> {
        let (manifest, bytes) = read_model_dir(&config.dir)?;
        let reference = Reference::read(&config.dir, &manifest).map_err(ModelError::Reference)?;
        let env = environment(dylib)?;
        // A GPU provider can register and still fail when the session is
        // built or first run (no device, a TensorRT engine build error): then
        // the whole pool is rebuilt from the next provider in the list. On
        // CPU a failure is the model's own, and refuses it.
        let mut start = 0;
        let (sessions, provider) = loop {
            let (provider, next) = resolve_providers(config, start);
            let check = reference.as_ref().map(|r| (r, provider.arithmetic()));
            match build_pool(env, config, &bytes, &manifest, check, batching, max_rows, next) {
                Ok(sessions) => break (sessions, provider),
                Err(e) if provider != ExecutionProvider::Cpu => {
                    fallback(provider, "session_failed", &e.to_string());
                    start = next + 1;
                }
                Err(e) => return Err(e),
            }
        };
        let fell_back = config.execution_providers.first().is_some_and(|first| *first != provider);
        publish_provider(&manifest, provider, queue, sessions.len(), fell_back);
        tracing::info!(
            version = %manifest.model_version,
            provider = provider.as_str(),
            sessions = sessions.len(),
            features = manifest.feature_order.len(),
            typed_inputs = manifest.typed_inputs.len(),
            max_batch_rows = batching.max_batch_rows,
            max_queue_delay = ?batching.max_queue_delay,
            "model loaded"
        );
        let batcher = Batcher::start(sessions, manifest.clone(), batching.clone(), queue);
        Ok(Self { manifest, provider, queue, batcher })
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

    /// The request's rows, gathered by name into the model's inputs: the
    /// dense columns in `feature_order`, and each typed input's categorical
    /// ids or embeddings in its own order. Extra columns are ignored; a
    /// missing column, a ragged matrix, a non-finite value, an id outside
    /// its feature's buckets or an embedding of the wrong length is refused,
    /// named.
    pub fn gather(&self, matrix: &FeatureMatrix) -> Result<Input, String> {
        gather(matrix, &self.manifest)
    }
}

/// The rows of a model's [`Reference`] as a feature matrix carries them.
pub fn reference_matrix(reference: &Reference) -> FeatureMatrix {
    FeatureMatrix {
        feature_names: reference.feature_names.clone(),
        num_rows: reference.rows,
        values: reference.values.clone(),
        categorical_names: reference.categorical_names.clone(),
        categorical_ids: reference.categorical_ids.clone(),
        ..Default::default()
    }
}

/// Scores a model's [`Reference`] rows on `session` as a request would be,
/// and compares with the trainer's outputs, as closely as a session
/// computing in `arithmetic` can agree ([`Reference::agrees`]).
fn check_reference(
    reference: &Reference,
    arithmetic: Arithmetic,
    session: &mut Session,
    manifest: &ModelManifest,
) -> Result<(), ModelError> {
    let input = gather(&reference_matrix(reference), manifest).map_err(ModelError::Reference)?;
    let got = run(session, manifest, input)?;
    for (i, (&g, &want)) in got.iter().zip(&reference.raw).enumerate() {
        if !Reference::agrees(g, want, arithmetic) {
            return Err(ModelError::Reference(format!(
                "row {i} scores {g} here, {want} in the trainer's onnxruntime ({arithmetic:?} arithmetic): the \
                 inputs are bound differently or the runtime computes differently"
            )));
        }
    }
    Ok(())
}

/// One call's rows (or a batch of calls'), as the model's inputs take them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Input {
    /// Number of rows.
    pub rows: usize,
    /// `rows × feature_order.len()`, row-major.
    pub dense: Vec<f32>,
    /// One block per `typed_inputs` entry, in its order: `rows × width`.
    pub typed: Vec<Block>,
}

/// A typed input's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// Categorical bucket ids.
    Int64(Vec<i64>),
    /// Embedding values.
    Float32(Vec<f32>),
}

impl Block {
    fn len(&self) -> usize {
        match self {
            Self::Int64(v) => v.len(),
            Self::Float32(v) => v.len(),
        }
    }

    fn extend_from(&mut self, other: &Self) {
        match (self, other) {
            (Self::Int64(a), Self::Int64(b)) => a.extend_from_slice(b),
            (Self::Float32(a), Self::Float32(b)) => a.extend_from_slice(b),
            // Every call of a model is gathered by the same manifest.
            _ => unreachable!("calls of one model have the same input types"),
        }
    }
}

impl Input {
    /// The rows of `parts` one after the other (calls of the same model, so
    /// the same blocks); the one part itself when there is one.
    pub fn concat(parts: &mut [&mut Input]) -> Input {
        match parts {
            [] => Input::default(),
            [only] => std::mem::take(*only),
            [first, ..] => {
                let typed = (0..first.typed.len())
                    .map(|k| {
                        let cap = parts.iter().map(|p| p.typed[k].len()).sum();
                        match parts[0].typed[k] {
                            Block::Int64(_) => Block::Int64(Vec::with_capacity(cap)),
                            Block::Float32(_) => Block::Float32(Vec::with_capacity(cap)),
                        }
                    })
                    .collect();
                let mut out = Input {
                    rows: parts.iter().map(|p| p.rows).sum(),
                    dense: Vec::with_capacity(parts.iter().map(|p| p.dense.len()).sum()),
                    typed,
                };
                for part in parts.iter() {
                    out.dense.extend_from_slice(&part.dense);
                    for (to, from) in out.typed.iter_mut().zip(&part.typed) {
                        to.extend_from(from);
                    }
                }
                out
            }
        }
    }
}

/// See [`CtrModel::gather`].
pub fn gather(matrix: &FeatureMatrix, manifest: &ModelManifest) -> Result<Input, String> {
    gather_in(matrix, manifest, adserve_features::registry())
}

/// [`gather`] with the typed features' buckets and dims read from `registry`.
pub fn gather_in(
    matrix: &FeatureMatrix,
    manifest: &ModelManifest,
    registry: &FeatureRegistry,
) -> Result<Input, String> {
    matrix.check_shape()?;
    let rows = matrix.num_rows as usize;
    let version = &manifest.model_version;
    let index: Vec<usize> = columns(&matrix.feature_names, &manifest.feature_order, |name| {
        format!("matrix.feature_names lacks {name:?}, which model {version} needs")
    })?;
    let dense = gather_columns(&matrix.values, matrix.num_cols(), rows, &index);
    // One pass over what was gathered, without an early exit, so it
    // vectorises; the position is looked for only when a value is bad.
    if !dense.iter().fold(true, |ok, v| ok & v.is_finite()) {
        let at = dense.iter().position(|v| !v.is_finite()).expect("a non-finite value was seen");
        let (r, c) = (at / index.len(), at % index.len());
        return Err(format!("matrix.values row {r} feature {:?} is {}", manifest.feature_order[c], dense[at]));
    }
    let typed = manifest
        .typed_inputs
        .iter()
        .map(|input| match input.dtype {
            InputDtype::Int64 => gather_ids(matrix, input, version, registry).map(Block::Int64),
            InputDtype::Float32 => gather_embeddings(matrix, input, version, registry).map(Block::Float32),
        })
        .collect::<Result<_, _>>()?;
    Ok(Input { rows, dense, typed })
}

/// Where each of `wanted` is among the matrix's `names`, or `missing(name)`
/// for the first that is not. The search for each starts just past the
/// previous one's column, so names sent in the order wanted (the
/// feature-service's registry order) cost one comparison each.
fn columns(names: &[String], wanted: &[String], missing: impl Fn(&str) -> String) -> Result<Vec<usize>, String> {
    let mut next = 0;
    wanted
        .iter()
        .map(|name| {
            let at = find_from(names, name, next).ok_or_else(|| missing(name))?;
            next = at + 1;
            Ok(at)
        })
        .collect()
}

/// Where `name` is among `names`, searched from `from` on, then before it.
fn find_from(names: &[String], name: &str, from: usize) -> Option<usize> {
    let from = from.min(names.len());
    names[from..]
        .iter()
        .position(|n| n == name)
        .map(|p| from + p)
        .or_else(|| names[..from].iter().position(|n| n == name))
}

/// Columns `index` of a row-major block of `width` columns and `rows` rows,
/// row by row in `index`'s order: runs of adjacent columns are copied as
/// slices (one copy per row when the model reads a contiguous range of the
/// matrix's columns in order, one copy in all when it reads every column).
fn gather_columns<T: Copy>(block: &[T], width: usize, rows: usize, index: &[usize]) -> Vec<T> {
    let block = &block[..rows * width];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in index {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == i => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    if runs.len() == 1 && runs[0] == (0, width) {
        return block.to_vec();
    }
    let mut out = Vec::with_capacity(rows * index.len());
    if width > 0 {
        for row in block.chunks_exact(width) {
            for &(start, len) in &runs {
                out.extend_from_slice(&row[start..start + len]);
            }
        }
    }
    out
}

/// `rows × features` bucket ids of a categorical input; an id outside
/// `0..buckets` of its registry feature is refused, named.
fn gather_ids(
    matrix: &FeatureMatrix,
    input: &TypedInput,
    version: &str,
    registry: &FeatureRegistry,
) -> Result<Vec<i64>, String> {
    let rows = matrix.num_rows as usize;
    let index = columns(&matrix.categorical_names, &input.features, |name| {
        format!("matrix.categorical_names lacks {name:?}, which model {version} needs (input {:?})", input.name)
    })?;
    let buckets: Vec<u64> = input
        .features
        .iter()
        .map(|name| registry.categorical.iter().find(|f| &f.name == name).and_then(|f| f.buckets).map_or(0, u64::from))
        .collect();
    let out = gather_columns(&matrix.categorical_ids, matrix.categorical_names.len(), rows, &index);
    // A negative id is a huge u64: one unsigned comparison checks both ends.
    let inside = |row: &[i64]| row.iter().zip(&buckets).fold(true, |ok, (&id, &b)| ok & ((id as u64) < b));
    if !out.chunks_exact(index.len().max(1)).fold(true, |ok, row| ok & inside(row)) {
        let at = out
            .chunks_exact(index.len())
            .flat_map(|row| row.iter().zip(&buckets))
            .position(|(&id, &b)| (id as u64) >= b)
            .expect("an id outside its buckets was seen");
        let (r, c) = (at / index.len(), at % index.len());
        return Err(format!(
            "matrix.categorical_ids row {r} feature {:?} is {}, outside its {} buckets",
            input.features[c], out[at], buckets[c]
        ));
    }
    Ok(out)
}

/// `rows × sum(dims)` values of an embedding input; an embedding of another
/// length than the registry's, or a non-finite value, is refused, named.
fn gather_embeddings(
    matrix: &FeatureMatrix,
    input: &TypedInput,
    version: &str,
    registry: &FeatureRegistry,
) -> Result<Vec<f32>, String> {
    let rows = matrix.num_rows as usize;
    let width = matrix.embedding_width();
    let mut offsets = Vec::with_capacity(matrix.embedding_dims.len());
    let mut at = 0;
    for &d in &matrix.embedding_dims {
        offsets.push(at);
        at += d as usize;
    }
    let mut next = 0;
    let columns: Vec<(usize, usize)> = input
        .features
        .iter()
        .map(|name| {
            let k = find_from(&matrix.embedding_names, name, next).ok_or_else(|| {
                format!("matrix.embedding_names lacks {name:?}, which model {version} needs (input {:?})", input.name)
            })?;
            next = k + 1;
            let want = registry.embeddings.iter().find(|f| &f.name == name).and_then(|f| f.dim).unwrap_or(0) as usize;
            let have = matrix.embedding_dims[k] as usize;
            if have != want {
                return Err(format!("matrix.embedding_dims gives {name:?} {have} values, the registry {want}"));
            }
            Ok((offsets[k], have))
        })
        .collect::<Result<_, String>>()?;
    let mut out = Vec::with_capacity(rows * input.width_in(registry));
    for (r, row) in matrix.embedding_values.chunks_exact(width.max(1)).take(rows).enumerate() {
        for (c, &(at, dim)) in columns.iter().enumerate() {
            let values = &row[at..at + dim];
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(format!("matrix.embedding_values row {r} feature {:?} holds {v}", input.features[c]));
            }
            out.extend_from_slice(values);
        }
    }
    Ok(out)
}

/// The graph's inputs must be exactly the manifest's: the float32 `[N, F]`
/// dense input named `input_name` (F = the manifest's feature count, or
/// dynamic), and each typed input by name, dtype and width; N dynamic
/// (batching stacks calls). It must produce a float32 `[N]` or `[N, 1]`
/// output under the manifest's output name.
fn check_graph(session: &Session, m: &ModelManifest) -> Result<(), ModelError> {
    let mismatch = |s: String| Err(ModelError::Mismatch(s));
    let inputs = session.inputs();
    let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
    let dense = (m.input_name.as_str(), TensorElementType::Float32, m.feature_order.len(), "manifest feature_order");
    let want: Vec<(&str, TensorElementType, usize, &str)> = std::iter::once(dense)
        .chain(m.typed_inputs.iter().map(|t| {
            let ty = match t.dtype {
                InputDtype::Int64 => TensorElementType::Int64,
                InputDtype::Float32 => TensorElementType::Float32,
            };
            (t.name.as_str(), ty, t.width(), "its manifest features")
        }))
        .collect();
    let wanted: Vec<&str> = want.iter().map(|w| w.0).collect();
    if names.len() != wanted.len() || !wanted.iter().all(|w| names.contains(w)) {
        return mismatch(if wanted.len() == 1 {
            format!(
                "model.onnx has inputs {names:?}; this ranker feeds exactly one, {:?} (manifest input_name)",
                m.input_name
            )
        } else {
            format!("model.onnx has inputs {names:?}; its manifest names {wanted:?} (input_name and typed_inputs)")
        });
    }
    for (name, ty_want, width, what) in want {
        let Some(input) = inputs.iter().find(|i| i.name() == name) else { unreachable!("checked above") };
        let (ty, shape) = tensor_of(input.dtype());
        if ty != Some(ty_want) {
            let dtype = if ty_want == TensorElementType::Int64 { "an int64" } else { "a float32" };
            return mismatch(format!("input {name:?} is {}, not {dtype} tensor", describe(input.dtype())));
        }
        let width = width as i64;
        match shape.as_deref() {
            Some([n, f]) if *n < 0 && (*f < 0 || *f == width) => {}
            Some([n, _]) if *n >= 0 => {
                return mismatch(format!(
                    "input {name:?} has a fixed batch dimension {n}; requests are stacked, so it must be dynamic"
                ));
            }
            Some([_, f]) => return mismatch(format!("input {name:?} has {f} columns, {what} has {width}")),
            other => return mismatch(format!("input {name:?} has shape {other:?}, not [N, {width}]")),
        }
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
    let row = default_row(manifest);
    for &rows in sizes {
        let input = Input {
            rows,
            dense: repeat(&row.dense, rows),
            typed: row
                .typed
                .iter()
                .map(|b| match b {
                    Block::Int64(v) => Block::Int64(repeat(v, rows)),
                    Block::Float32(v) => Block::Float32(repeat(v, rows)),
                })
                .collect(),
        };
        let scores = run(session, manifest, input)?;
        if let Some((i, p)) = scores.iter().enumerate().find(|(_, p)| !(p.is_finite() && (0.0..=1.0).contains(*p))) {
            return Err(ModelError::BadOutput(format!("warm-up row {i} scored {p}, not a probability")));
        }
    }
    Ok(())
}

fn repeat<T: Copy>(row: &[T], rows: usize) -> Vec<T> {
    row.iter().copied().cycle().take(rows * row.len()).collect()
}

/// One row of the registry's defaults in the model's inputs (a missing
/// categorical is bucket 0).
pub fn default_row(manifest: &ModelManifest) -> Input {
    let registry = adserve_features::registry();
    let defaults = registry.defaults();
    let dense =
        manifest.feature_order.iter().map(|n| registry.index_of(n).map(|i| defaults[i]).unwrap_or_default()).collect();
    let typed = manifest
        .typed_inputs
        .iter()
        .map(|t| match t.dtype {
            InputDtype::Int64 => Block::Int64(vec![0; t.features.len()]),
            InputDtype::Float32 => Block::Float32(
                t.features
                    .iter()
                    .flat_map(|n| {
                        let f = registry.embeddings.iter().find(|f| &f.name == n);
                        let (dim, default) = f.map_or((0, 0.0), |f| (f.dim.unwrap_or(0) as usize, f.default));
                        std::iter::repeat_n(default, dim)
                    })
                    .collect(),
            ),
        })
        .collect();
    Input { rows: 1, dense, typed }
}

/// One `session.run` over `input`'s rows: the raw output, one value per row.
pub(crate) fn run(session: &mut Session, manifest: &ModelManifest, input: Input) -> Result<Vec<f32>, ModelError> {
    let rows = input.rows;
    let tensor_error = |source| ModelError::Runtime { stage: "building the input tensor", source };
    let mut values: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> =
        Vec::with_capacity(1 + input.typed.len());
    let dense =
        ort::value::Tensor::from_array(([rows, manifest.feature_order.len()], input.dense)).map_err(tensor_error)?;
    values.push((manifest.input_name.as_str().into(), dense.into()));
    for (spec, block) in manifest.typed_inputs.iter().zip(input.typed) {
        let shape = [rows, spec.width()];
        let value = match block {
            Block::Int64(v) => ort::value::Tensor::from_array((shape, v)).map_err(tensor_error)?.into(),
            Block::Float32(v) => ort::value::Tensor::from_array((shape, v)).map_err(tensor_error)?.into(),
        };
        values.push((spec.name.as_str().into(), value));
    }
    let outputs = session.run(values).map_err(|source| ModelError::Runtime { stage: "run", source })?;
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
    reference: Option<(&Reference, Arithmetic)>,
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
            if let Some((reference, arithmetic)) = reference {
                check_reference(reference, arithmetic, &mut session, manifest)?;
            }
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
    first_usable(&config.execution_providers, start, |ep| {
        let Some(dispatch) = dispatch(ep, config) else {
            return Err(("not_compiled", "this build lacks the cargo feature (cuda / tensorrt)".into()));
        };
        let probe = ENV.get().map(Session::builder).and_then(Result::ok).map(|b: Builder| {
            b.with_execution_providers([dispatch.error_on_failure()]).map(|_| ()).map_err(|e| e.to_string())
        });
        match probe {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(("unavailable", e)),
            None => Err(("unavailable", "no ONNX Runtime session builder".into())),
        }
    })
}

/// The walk of [`resolve_providers`] over `list[start..]`, with the probe of
/// a GPU provider passed in (`Err((reason, detail))` passes it over, counted):
/// the first provider that probes well, or CPU where the list has it (or
/// past its end). A provider this build lacks passes to the next one in the
/// list, a GPU provider too, never straight to CPU.
pub(crate) fn first_usable(
    list: &[ExecutionProvider],
    start: usize,
    probe: impl Fn(ExecutionProvider) -> Result<(), (&'static str, String)>,
) -> (ExecutionProvider, usize) {
    for (i, &ep) in list.iter().enumerate().skip(start) {
        if ep == ExecutionProvider::Cpu {
            return (ExecutionProvider::Cpu, i);
        }
        match probe(ep) {
            Ok(()) => return (ep, i),
            Err((reason, detail)) => fallback(ep, reason, &detail),
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
