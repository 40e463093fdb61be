//! Label-joiner configuration.

use std::path::PathBuf;

use adserve_core::{ServerConfig, TelemetryConfig, Validate};
use adserve_events::KafkaConfig;
use serde::{Deserialize, Serialize};

/// Everything the label-joiner reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LabelJoinerConfig {
    /// gRPC (50055) and metrics (9105) listen addresses.
    pub server: ServerConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Broker and DLQ publishing.
    pub kafka: KafkaConfig,
    /// Consumer group.
    pub group_id: String,
    /// Directory for Parquet files.
    pub output_dir: PathBuf,
    /// A click counts when it arrives within this long of its impression.
    pub label_window_ms: u64,
    /// Buffered rows are written at least this often.
    pub flush_interval_ms: u64,
    /// Rows per Parquet file at most.
    pub max_rows_per_file: usize,
}

impl Default for LabelJoinerConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(50055, 9105),
            telemetry: TelemetryConfig::default(),
            kafka: KafkaConfig::default(),
            group_id: "adserve-label-joiner".into(),
            output_dir: PathBuf::from("data/training-rows"),
            label_window_ms: 30 * 60 * 1000,
            flush_interval_ms: 10_000,
            max_rows_per_file: 100_000,
        }
    }
}

impl Validate for LabelJoinerConfig {
    fn validate(&self) -> Result<(), String> {
        self.server.validate()?;
        self.kafka.validate()?;
        if self.group_id.is_empty() {
            return Err("group_id: required".into());
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err("output_dir: required".into());
        }
        if self.label_window_ms == 0 || self.label_window_ms > 7 * 24 * 3600 * 1000 {
            return Err("label_window_ms: must be in 1..=604800000 (7 days)".into());
        }
        if self.flush_interval_ms == 0 || self.max_rows_per_file == 0 {
            return Err("flush_interval_ms / max_rows_per_file: must be > 0".into());
        }
        Ok(())
    }
}
