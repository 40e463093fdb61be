//! Label-joiner configuration.

use std::{path::PathBuf, time::Duration};

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, ports};
use adserve_events::KafkaConfig;
use serde::{Deserialize, Serialize};

/// Everything the label-joiner reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
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
    /// Defaults to the feature registry's `[label].window_seconds`, the
    /// definition the trainer reads too.
    #[serde(with = "humantime_serde")]
    pub label_window: Duration,
    /// Buffered rows are written at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Rows per Parquet file at most.
    pub max_rows_per_file: usize,
}

impl Default for LabelJoinerConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::LABEL_JOINER_GRPC, ports::LABEL_JOINER_METRICS),
            telemetry: TelemetryConfig::default(),
            kafka: KafkaConfig::default(),
            group_id: "adserve-label-joiner".into(),
            output_dir: PathBuf::from("data/training-rows"),
            label_window: adserve_features::registry().label.window(),
            flush_interval: Duration::from_secs(10),
            max_rows_per_file: 100_000,
        }
    }
}

impl Validate for LabelJoinerConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        self.kafka.validate()?;
        if self.group_id.is_empty() {
            return Err(Invalid::new("group_id", "required"));
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err(Invalid::new("output_dir", "required"));
        }
        let week = Duration::from_secs(7 * 24 * 3600);
        check_duration("label_window", self.label_window, Duration::from_millis(1), week)?;
        check_duration("flush_interval", self.flush_interval, Duration::from_millis(1), Duration::from_secs(3600))?;
        check_range("max_rows_per_file", self.max_rows_per_file, 1..=100_000_000)?;
        Ok(())
    }
}
