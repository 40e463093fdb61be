//! Ranker configuration.

use std::{path::PathBuf, time::Duration};

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, ports};
use adserve_events::KafkaConfig;
use adserve_registry::RegistryConfig;
use serde::{Deserialize, Serialize};

/// An ONNX Runtime execution provider. GPU providers need the `cuda` /
/// `tensorrt` cargo features (on by default) and a GPU build of ONNX Runtime
/// (onnxruntime-gpu) at run time; a provider that cannot be registered is
/// logged and counted, and the next one in `model.execution_providers` is
/// tried.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// NVIDIA TensorRT (FP16 and an engine cache from `model.tensorrt`);
    /// nodes TensorRT cannot run go to the providers after it in the list.
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// CPU (always available; always the last resort).
    Cpu,
}

impl ExecutionProvider {
    /// The name used in config, logs, metrics and `GetModel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tensorrt => "tensorrt",
            Self::Cuda => "cuda",
            Self::Cpu => "cpu",
        }
    }

    /// How close to the trainer's float32 CPU outputs a session on this
    /// provider must score the model's reference rows: CUDA may run TF32
    /// matrix products and TensorRT FP16 engines, so a GPU session is held to
    /// log-odds agreement rather than float32 rounding (which would refuse
    /// every GPU session and leave a GPU node scoring on CPU).
    pub fn arithmetic(self) -> adserve_registry::Arithmetic {
        match self {
            Self::Cpu => adserve_registry::Arithmetic::Float32,
            Self::Cuda | Self::Tensorrt => adserve_registry::Arithmetic::Reduced,
        }
    }
}

/// Everything the ranker reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RankerConfig {
    /// Listen addresses (gRPC 50053, metrics 9103 by default).
    pub server: ServerConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// The model to serve.
    pub model: ModelConfig,
    /// How concurrent Score calls share the model's sessions.
    pub batching: BatchingConfig,
    /// The model registry this ranker follows (on by default; `model.dir`
    /// is served until the registry has a production version).
    pub registry: RegistryConfig,
    /// Shadow scoring (a registry `shadow` version scores beside production).
    pub shadow: ShadowConfig,
    /// What scores a call when the model cannot.
    pub fallback: FallbackConfig,
    /// The broker shadow scores are published to.
    pub kafka: KafkaConfig,
    /// Path (or file name on the loader path) of `libonnxruntime.so`
    /// (`ADSERVE_ONNXRUNTIME_DYLIB`; the ranker does not read ORT_DYLIB_PATH).
    pub onnxruntime_dylib: String,
    /// Largest matrix (rows) accepted by one Score call.
    pub max_rows: usize,
}

/// Model location and execution settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory with `model.onnx` and `manifest.json`.
    pub dir: PathBuf,
    /// Providers to try, in order; the first that registers runs the model
    /// (those after it take the nodes it cannot run). CPU is always the last
    /// resort, listed or not.
    pub execution_providers: Vec<ExecutionProvider>,
    /// GPU ordinal for CUDA / TensorRT.
    pub device_id: i32,
    /// ONNX Runtime intra-op threads per session (0 = ONNX Runtime's
    /// default, one per core).
    pub intra_threads: usize,
    /// TensorRT settings (used when `tensorrt` is in the list).
    pub tensorrt: TensorrtConfig,
}

/// TensorRT execution provider settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TensorrtConfig {
    /// Build FP16 engines (the usual choice for CTR models on T4/A10/L4).
    pub fp16: bool,
    /// Directory where built engines are cached; without it every start
    /// rebuilds them (minutes for a large model). Put it on a volume.
    pub engine_cache_dir: Option<PathBuf>,
}

impl Default for TensorrtConfig {
    fn default() -> Self {
        Self { fp16: true, engine_cache_dir: None }
    }
}

/// Dynamic batching: concurrent Score calls queue per model and are run
/// together. A batch is flushed when it holds `max_batch_rows` rows or when
/// its oldest call has waited `max_queue_delay`, whichever comes first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// ONNX Runtime sessions per model, each on its own thread: how many
    /// batches run at once. With `model.intra_threads = 1`, one per core.
    pub sessions: usize,
    /// Rows that flush a batch at once. A call larger than this runs alone;
    /// 1 turns batching off (every call is its own batch).
    pub max_batch_rows: usize,
    /// Longest a call waits for others to join its batch (humantime, e.g.
    /// `"500us"`). The default 0 is greedy batching: a free session takes
    /// whatever is queued at once, so a lone call never waits, and batches
    /// form exactly when calls queue behind busy sessions. A delay pays off
    /// only where one run costs much more than the calls it merges (a GPU,
    /// a large model): measured, it cost this CPU baseline latency and
    /// throughput (docs/benchmarks.md).
    #[serde(with = "humantime_serde")]
    pub max_queue_delay: Duration,
    /// Rows allowed to wait in the queue; a call beyond it is not queued
    /// (it would wait past its deadline): the fallback chain answers it at
    /// once.
    pub max_queue_rows: usize,
    /// Refuse, at arrival, a call the queue predicts would finish after its
    /// deadline (from the rows queued ahead of it and a cost per batch fitted
    /// on recent runs), so the fallback answers at once instead of after the
    /// wait. `false`: such a call waits until its deadline.
    pub predict_misses: bool,
}

/// The fallback chain: when the model fails, is overloaded, or would miss
/// the call's deadline, a lightweight model scores the call; when that fails
/// too, a prior per ad from the features. Every answer says which level
/// scored it (`ScoreResponse.level`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    /// Directory of the fallback model (`model.onnx` + `manifest.json`,
    /// checked like any model; one session of its own). Unset: `model.dir`,
    /// the image's baked-in logistic regression. `enabled = false` skips
    /// straight to the prior.
    pub model_dir: Option<PathBuf>,
    /// Use a fallback model at all.
    pub enabled: bool,
    /// Time kept back from the model for the fallback: the model gets the
    /// call's deadline minus this, the fallback model what is left.
    #[serde(with = "humantime_serde")]
    pub reserve: Duration,
    /// Registry feature read as the prior (an ad's historical CTR).
    pub prior_feature: String,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            model_dir: None,
            enabled: true,
            reserve: Duration::from_millis(20),
            prior_feature: adserve_features::prior::DEFAULT_PRIOR_FEATURE.into(),
        }
    }
}

/// Shadow scoring: when the registry has a `shadow` version, each call
/// production answered is also scored by it, after the answer and on its own
/// sessions, and both scores go to the shadow-scores topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShadowConfig {
    /// Score and publish shadow scores (off: a shadow version is loaded but
    /// scores nothing).
    pub enabled: bool,
    /// Shadow calls allowed in flight; beyond it a call's shadow scoring is
    /// skipped and counted, so a slow shadow never queues up work.
    pub max_in_flight: usize,
    /// Share of model-scored calls the shadow scores, sampled by request id
    /// with the canary's hash (a request is shadowed whole or not at all).
    /// 1: every call. Set it to the gateways' `prediction_cache.shadow_share`
    /// to shadow exactly the requests the cache sends whole.
    pub sample_share: f64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self { enabled: true, max_in_flight: 64, sample_share: 1.0 }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            sessions: 2,
            max_batch_rows: 1024,
            max_queue_delay: Duration::ZERO,
            max_queue_rows: 32_768,
            predict_misses: true,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/ctr-baseline"),
            execution_providers: vec![ExecutionProvider::Cpu],
            device_id: 0,
            intra_threads: 1,
            tensorrt: TensorrtConfig::default(),
        }
    }
}

impl Default for RankerConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::RANKER_GRPC, ports::RANKER_METRICS),
            telemetry: TelemetryConfig::default(),
            model: ModelConfig::default(),
            batching: BatchingConfig::default(),
            registry: RegistryConfig::default(),
            shadow: ShadowConfig::default(),
            fallback: FallbackConfig::default(),
            kafka: KafkaConfig::default(),
            onnxruntime_dylib: "libonnxruntime.so".into(),
            max_rows: adserve_proto::limits::MAX_CANDIDATES,
        }
    }
}

impl Validate for RankerConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        if !self.model.dir.join("manifest.json").is_file() {
            return Err(Invalid::new("model.dir", format!("{} has no manifest.json", self.model.dir.display())));
        }
        if self.onnxruntime_dylib.is_empty() {
            return Err(Invalid::new("onnxruntime_dylib", "must name libonnxruntime.so"));
        }
        let eps = &self.model.execution_providers;
        if eps.is_empty() {
            return Err(Invalid::new("model.execution_providers", "must list at least one provider (e.g. [\"cpu\"])"));
        }
        for (i, ep) in eps.iter().enumerate() {
            if eps[..i].contains(ep) {
                return Err(Invalid::new("model.execution_providers", format!("{} is listed twice", ep.as_str())));
            }
        }
        if let Some(i) = eps.iter().position(|e| *e == ExecutionProvider::Cpu)
            && i + 1 != eps.len()
        {
            return Err(Invalid::new("model.execution_providers", "cpu must come last (it takes every node)"));
        }
        self.registry.validate()?;
        self.kafka.validate()?;
        check_range("shadow.max_in_flight", self.shadow.max_in_flight, 1..=10_000)?;
        if !(0.0..=1.0).contains(&self.shadow.sample_share) {
            return Err(Invalid::new(
                "shadow.sample_share",
                format!("must be 0..=1, got {}", self.shadow.sample_share),
            ));
        }
        check_duration("fallback.reserve", self.fallback.reserve, Duration::ZERO, Duration::from_secs(10))?;
        if adserve_features::registry().index_of(&self.fallback.prior_feature).is_none() {
            return Err(Invalid::new(
                "fallback.prior_feature",
                format!("{:?} is not in the feature registry", self.fallback.prior_feature),
            ));
        }
        if let Some(dir) = &self.fallback.model_dir
            && !dir.join("manifest.json").is_file()
        {
            return Err(Invalid::new("fallback.model_dir", format!("{} has no manifest.json", dir.display())));
        }
        check_range("max_rows", self.max_rows, 1..=100_000)?;
        check_range("model.device_id", self.model.device_id, 0..=i32::MAX)?;
        check_range("model.intra_threads", self.model.intra_threads, 0..=256)?;
        check_range("batching.sessions", self.batching.sessions, 1..=64)?;
        check_range("batching.max_batch_rows", self.batching.max_batch_rows, 1..=100_000)?;
        check_duration(
            "batching.max_queue_delay",
            self.batching.max_queue_delay,
            Duration::ZERO,
            Duration::from_millis(100),
        )?;
        check_range("batching.max_queue_rows", self.batching.max_queue_rows, self.max_rows..=10_000_000)
            .map_err(|e| Invalid::new(e.key, format!("{} (at least max_rows, so any valid call can queue)", e.why)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> RankerConfig {
        RankerConfig {
            model: ModelConfig {
                dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-baseline"),
                ..ModelConfig::default()
            },
            ..RankerConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        valid().validate().expect("defaults validate");
    }

    #[test]
    fn provider_lists_are_checked() {
        use ExecutionProvider::*;
        for (list, why) in [
            (vec![], "at least one"),
            (vec![Cuda, Cuda], "cuda is listed twice"),
            (vec![Cpu, Cuda], "cpu must come last"),
        ] {
            let mut c = valid();
            c.model.execution_providers = list;
            let err = c.validate().unwrap_err();
            assert_eq!(err.key, "model.execution_providers");
            assert!(err.why.contains(why), "{err}");
        }
        let mut c = valid();
        c.model.execution_providers = vec![Tensorrt, Cuda, Cpu];
        c.validate().expect("the GPU list validates");
    }

    #[test]
    fn batching_limits_are_checked() {
        let mut c = valid();
        c.batching.max_queue_rows = c.max_rows - 1;
        assert_eq!(c.validate().unwrap_err().key, "batching.max_queue_rows");
        let mut c = valid();
        c.batching.sessions = 0;
        assert_eq!(c.validate().unwrap_err().key, "batching.sessions");
        let mut c = valid();
        c.batching.max_queue_delay = Duration::from_secs(1);
        assert_eq!(c.validate().unwrap_err().key, "batching.max_queue_delay");
    }

    #[test]
    fn shadow_and_registry_bounds_are_checked() {
        for share in [-0.1, 1.5, f64::NAN] {
            let mut c = valid();
            c.shadow.sample_share = share;
            assert_eq!(c.validate().unwrap_err().key, "shadow.sample_share", "{share}");
        }
        let mut c = valid();
        c.registry.load_timeout = Duration::from_millis(10);
        assert_eq!(c.validate().unwrap_err().key, "registry.load_timeout");
    }
}
