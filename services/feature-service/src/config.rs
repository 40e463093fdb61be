//! Feature-service configuration.

use std::time::Duration;

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, ports};
use serde::{Deserialize, Serialize};

/// Everything the feature-service reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureServiceConfig {
    /// Listen addresses (gRPC 50052, metrics 9102 by default).
    pub server: ServerConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Real-time tier.
    pub redis: RedisConfig,
    /// Batch tier.
    pub dynamodb: DynamoConfig,
    /// Most candidate ads accepted per request.
    pub max_ads: usize,
    /// The in-process copy of the batch tier's ad rows.
    pub ad_table: AdTableConfig,
}

/// The in-process ad-feature table ([`crate::AdTable`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdTableConfig {
    /// Serve ad batch features from memory (false: a DynamoDB read per
    /// request, as before).
    pub enabled: bool,
    /// How often the table's version item is read (one GetItem).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Reload at least this often even if the version did not move (a
    /// writer that forgot to bump it).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for AdTableConfig {
    fn default() -> Self {
        Self { enabled: true, refresh: Duration::from_secs(1), max_age: Duration::from_secs(300) }
    }
}

/// Redis connection: one definition, shared with the gateway's counters.
pub use adserve_counters::RedisConfig;

/// DynamoDB connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoConfig {
    /// Endpoint URL; DynamoDB Local is `http://127.0.0.1:8000`. Empty uses
    /// the regional AWS endpoint.
    pub endpoint: String,
    /// AWS region.
    pub region: String,
    /// Static credentials (DynamoDB Local accepts any).
    pub access_key_id: String,
    /// Static credentials secret.
    pub secret_access_key: String,
    /// Deadline for the whole batch-tier lookup of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8000".into(),
            region: "us-east-1".into(),
            // DynamoDB Local accepts only letters and digits in the key id.
            access_key_id: "adservelocal".into(),
            secret_access_key: "adservelocal".into(),
            timeout: Duration::from_millis(100),
        }
    }
}

impl Default for FeatureServiceConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::FEATURE_SERVICE_GRPC, ports::FEATURE_SERVICE_METRICS),
            telemetry: TelemetryConfig::default(),
            redis: RedisConfig::default(),
            dynamodb: DynamoConfig::default(),
            max_ads: adserve_proto::limits::MAX_CANDIDATES,
            ad_table: AdTableConfig::default(),
        }
    }
}

impl Validate for FeatureServiceConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        self.redis.validate("redis")?;
        check_duration("dynamodb.timeout", self.dynamodb.timeout, Duration::from_millis(1), Duration::from_secs(60))?;
        if self.dynamodb.region.is_empty() {
            return Err(Invalid::new("dynamodb.region", "required"));
        }
        if !self.dynamodb.endpoint.is_empty() && !self.dynamodb.endpoint.starts_with("http") {
            return Err(Invalid::new(
                "dynamodb.endpoint",
                format!("must be an http(s) URL, got {:?}", self.dynamodb.endpoint),
            ));
        }
        check_range("max_ads", self.max_ads, 1..=100_000)?;
        check_duration(
            "ad_table.refresh",
            self.ad_table.refresh,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?;
        check_duration("ad_table.max_age", self.ad_table.max_age, self.ad_table.refresh, Duration::from_secs(86_400))?;
        Ok(())
    }
}
