//! Label-joiner configuration.

use std::{path::PathBuf, time::Duration};

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, ports};
use adserve_events::KafkaConfig;
use serde::{Deserialize, Serialize};

use crate::{
    join::{JoinRules, Mode},
    sink::Target,
    store::{ObjectTarget, S3Options, parse_s3_url},
};

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
    /// Consumer group. Instances in one group split the partitions.
    pub group_id: String,
    /// Root directory of the Parquet dataset (`date=…/hour=…/` below it),
    /// when `output_url` is empty. Must be durable storage shared by every
    /// instance of the group: a partition's new owner reads its
    /// predecessor's files to skip rows written but not yet committed.
    pub output_dir: PathBuf,
    /// The dataset on object storage instead: `s3://bucket/prefix` (AWS S3
    /// or an S3-compatible service, see `s3`). Empty: `output_dir`.
    pub output_url: String,
    /// S3 connection settings for `output_url`.
    pub s3: S3Options,
    /// A click counts when it happens within this long of its impression.
    /// Defaults to the feature registry's `[label].window_seconds`, the
    /// definition the trainer reads too.
    #[serde(with = "humantime_serde")]
    pub label_window: Duration,
    /// How far the watermark stays behind the newest event time (or the
    /// clock, once a partition is read to its end): covers events published
    /// out of order, the gateway's publish timeout and clock skew.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// `window`: one final row per impression when its window closes.
    /// `streaming`: also a provisional negative at impression time and a
    /// correction row when a click arrives.
    pub mode: Mode,
    /// Weight of a provisional negative row (streaming mode).
    pub provisional_weight: f32,
    /// Share of negative rows kept (deterministic per impression id); every
    /// row records it as `keep_rate` so training and serving can correct.
    pub negative_keep_rate: f64,
    /// Orphan clicks (read before their impression) held at most.
    pub max_orphan_clicks: usize,
    /// Memory budget for join state (pending impressions, orphan clicks,
    /// unwritten rows). Above it the joiner stops reading impressions (keeps
    /// reading clicks, so windows keep closing) until it is back under 80 %.
    pub memory_budget_bytes: usize,
    /// Rows are written at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Rows per Parquet file at most.
    pub max_rows_per_file: usize,
    /// Bearer token that authorises `Flush(close_open_windows = true)`,
    /// which labels open windows early. Empty: that request is refused.
    pub admin_token: String,
    /// Fault injection for the crash tests only: a pause between a file
    /// becoming durable and its offsets being committed. Never set it in
    /// production.
    #[serde(with = "humantime_serde")]
    pub test_pause_before_commit: Duration,
}

impl Default for LabelJoinerConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::LABEL_JOINER_GRPC, ports::LABEL_JOINER_METRICS),
            telemetry: TelemetryConfig::default(),
            kafka: KafkaConfig::default(),
            group_id: "adserve-label-joiner".into(),
            output_dir: PathBuf::from("data/training-rows"),
            output_url: String::new(),
            s3: S3Options::default(),
            label_window: adserve_features::registry().label.window(),
            allowed_lateness: Duration::from_secs(3),
            mode: Mode::Window,
            provisional_weight: 0.5,
            negative_keep_rate: 1.0,
            max_orphan_clicks: 100_000,
            memory_budget_bytes: 512 << 20,
            flush_interval: Duration::from_secs(10),
            max_rows_per_file: 100_000,
            admin_token: String::new(),
            test_pause_before_commit: Duration::ZERO,
        }
    }
}

impl LabelJoinerConfig {
    /// Where the dataset goes.
    pub fn target(&self) -> Result<Target, String> {
        if self.output_url.is_empty() {
            Ok(Target::Dir(self.output_dir.clone()))
        } else {
            ObjectTarget::s3(&self.output_url, &self.s3).map(Target::Object)
        }
    }

    /// The dataset's location as shown in status: the URL or the directory.
    pub fn output_location(&self) -> String {
        if self.output_url.is_empty() { self.output_dir.display().to_string() } else { self.output_url.clone() }
    }

    /// The join's rules.
    pub fn rules(&self) -> JoinRules {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        JoinRules {
            window_ms: ms(self.label_window),
            lateness_ms: ms(self.allowed_lateness),
            mode: self.mode,
            provisional_weight: self.provisional_weight,
            negative_keep_rate: self.negative_keep_rate,
            max_orphans: self.max_orphan_clicks,
            max_clock_skew_ms: 60_000,
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
        if self.output_url.is_empty() && self.output_dir.as_os_str().is_empty() {
            return Err(Invalid::new("output_dir", "required (or set output_url)"));
        }
        if !self.output_url.is_empty() {
            parse_s3_url(&self.output_url).map_err(|e| Invalid::new("output_url", e))?;
        }
        if !self.s3.endpoint.is_empty() && !self.s3.endpoint.starts_with("http") {
            return Err(Invalid::new("s3.endpoint", "must be an http(s):// URL"));
        }
        let week = Duration::from_secs(7 * 24 * 3600);
        check_duration("label_window", self.label_window, Duration::from_millis(1), week)?;
        check_duration("allowed_lateness", self.allowed_lateness, Duration::ZERO, Duration::from_secs(3600))?;
        check_duration("flush_interval", self.flush_interval, Duration::from_millis(1), Duration::from_secs(3600))?;
        check_duration(
            "test_pause_before_commit",
            self.test_pause_before_commit,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        check_range("max_rows_per_file", self.max_rows_per_file, 1..=100_000_000)?;
        check_range("max_orphan_clicks", self.max_orphan_clicks, 1..=100_000_000)?;
        check_range("memory_budget_bytes", self.memory_budget_bytes, (1 << 20)..=(1 << 40))?;
        if !(self.provisional_weight > 0.0 && self.provisional_weight <= 1.0) {
            return Err(Invalid::new("provisional_weight", "must be in (0, 1]"));
        }
        if !(self.negative_keep_rate > 0.0 && self.negative_keep_rate <= 1.0) {
            return Err(Invalid::new("negative_keep_rate", "must be in (0, 1]"));
        }
        if !self.admin_token.is_empty() && self.admin_token.len() < 16 {
            return Err(Invalid::new("admin_token", "must be empty (disabled) or at least 16 characters"));
        }
        Ok(())
    }
}
