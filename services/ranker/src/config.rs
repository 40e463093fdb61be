//! Ranker configuration.

use std::path::PathBuf;

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_range, ports};
use serde::{Deserialize, Serialize};

/// Which ONNX Runtime execution provider to ask for. GPU providers need the
/// `cuda` / `tensorrt` cargo features and a GPU build of ONNX Runtime; when
/// either is missing the ranker logs a warning and runs on CPU.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// CPU (always available).
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT (with CUDA for unsupported nodes).
    Tensorrt,
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
    /// Path (or file name on the loader path) of `libonnxruntime.so`
    /// (`ADSERVE_ONNXRUNTIME_DYLIB`; the ranker does not read ORT_DYLIB_PATH).
    pub onnxruntime_dylib: String,
    /// Largest matrix (rows) accepted by Score.
    pub max_rows: usize,
}

/// Model location and execution settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory with `model.onnx` and `manifest.json`.
    pub dir: PathBuf,
    /// Requested execution provider.
    pub execution_provider: ExecutionProvider,
    /// GPU ordinal for CUDA / TensorRT.
    pub device_id: i32,
    /// ONNX Runtime intra-op threads (0 = ONNX Runtime's default).
    pub intra_threads: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/ctr-baseline"),
            execution_provider: ExecutionProvider::Cpu,
            device_id: 0,
            intra_threads: 1,
        }
    }
}

impl Default for RankerConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::RANKER_GRPC, ports::RANKER_METRICS),
            telemetry: TelemetryConfig::default(),
            model: ModelConfig::default(),
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
        check_range("max_rows", self.max_rows, 1..=100_000)?;
        check_range("model.device_id", self.model.device_id, 0..=i32::MAX)?;
        Ok(())
    }
}
