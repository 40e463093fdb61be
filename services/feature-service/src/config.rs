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
    /// Users' batch items kept in process for a short TTL.
    pub user_cache: crate::UserCacheConfig,
    /// What this process runs: the GetFeatures service, the streaming
    /// aggregates consumer, or both.
    pub mode: Mode,
    /// The streaming aggregates (real-time counters from Kafka).
    pub aggregates: AggregatesConfig,
    /// When a tier that keeps failing is skipped instead of waited for.
    pub breaker: crate::breaker::BreakerConfig,
}

/// What a feature-service process runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Serve GetFeatures and aggregate (one process does everything; the
    /// local stack). Readiness follows serving only.
    #[default]
    Both,
    /// Serve GetFeatures only (with aggregators deployed on their own).
    Serve,
    /// Aggregate only: health and metrics, no GetFeatures; readiness
    /// follows the Kafka consumer.
    Aggregate,
}

impl Mode {
    /// Whether GetFeatures is served.
    pub fn serves(self) -> bool {
        self != Mode::Aggregate
    }

    /// Whether the aggregates consumer runs.
    pub fn aggregates(self) -> bool {
        self != Mode::Serve
    }
}

/// The streaming aggregates consumer ([`crate::aggregates`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatesConfig {
    /// Kafka connection (the impressions and clicks topics; malformed
    /// messages go to the dead-letter topic).
    pub kafka: adserve_events::KafkaConfig,
    /// Consumer group: aggregators share the partitions of one group.
    pub group_id: String,
    /// An event this far behind its partition's newest event time is
    /// counted late (and still applied to the windows that hold it).
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// How long a click read before its impression waits for it before it is
    /// counted unattributed.
    #[serde(with = "humantime_serde")]
    pub click_wait: Duration,
    /// Most clicks waiting at once (the oldest gives up first).
    pub max_waiting_clicks: usize,
    /// How long an impression's marker (dedup, and the user and ad its
    /// clicks count for) is kept: at least the label window.
    #[serde(with = "humantime_serde")]
    pub attribution_ttl: Duration,
    /// TTL of an entity's counters after its last change (at least the
    /// longest window, 24 h).
    #[serde(with = "humantime_serde")]
    pub value_ttl: Duration,
    /// How often entities whose windows moved are re-summed.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Most entities re-summed per refresh tick.
    pub refresh_batch: usize,
    /// How often offsets are committed (and waiting clicks retried).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for AggregatesConfig {
    fn default() -> Self {
        let label = adserve_features::registry().label.window();
        Self {
            kafka: adserve_events::KafkaConfig::default(),
            group_id: "adserve-feature-aggregates".into(),
            allowed_lateness: Duration::from_secs(60),
            click_wait: Duration::from_secs(30),
            max_waiting_clicks: 100_000,
            attribution_ttl: label + Duration::from_secs(600),
            value_ttl: Duration::from_secs(25 * 3600),
            refresh_interval: Duration::from_secs(5),
            refresh_batch: 2000,
            commit_interval: Duration::from_secs(1),
        }
    }
}

impl AggregatesConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.kafka.validate().map_err(|e| e.within("aggregates"))?;
        if self.group_id.trim().is_empty() {
            return Err(Invalid::new("aggregates.group_id", "required"));
        }
        let day = Duration::from_secs(86_400);
        check_duration("aggregates.allowed_lateness", self.allowed_lateness, Duration::ZERO, day)?;
        check_duration("aggregates.click_wait", self.click_wait, Duration::from_millis(1), Duration::from_secs(3600))?;
        check_range("aggregates.max_waiting_clicks", self.max_waiting_clicks, 1..=10_000_000)?;
        let label = adserve_features::registry().label.window();
        check_duration("aggregates.attribution_ttl", self.attribution_ttl, label, 7 * day)?;
        check_duration("aggregates.value_ttl", self.value_ttl, day, 7 * day)?;
        check_duration(
            "aggregates.refresh_interval",
            self.refresh_interval,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        check_range("aggregates.refresh_batch", self.refresh_batch, 1..=1_000_000)?;
        check_duration(
            "aggregates.commit_interval",
            self.commit_interval,
            Duration::from_millis(10),
            Duration::from_secs(60),
        )
    }
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

/// Where the DynamoDB client's credentials come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSource {
    /// `access_key_id` / `secret_access_key`.
    Static,
    /// The AWS SDK's default chain, resolved on first use and refreshed
    /// before expiry (IRSA tokens rotate hourly).
    DefaultChain,
}

/// DynamoDB connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoConfig {
    /// Endpoint URL; DynamoDB Local is `http://127.0.0.1:8000`. Empty uses
    /// the regional AWS endpoint.
    pub endpoint: String,
    /// AWS region.
    pub region: String,
    /// Where credentials come from: `static` (the two keys below) or
    /// `default_chain` (the AWS SDK's chain: environment, profile, web
    /// identity token (EKS IRSA), ECS task role, EC2 instance profile; the
    /// keys below must then be empty).
    pub credentials: CredentialSource,
    /// Static credentials (DynamoDB Local accepts any).
    pub access_key_id: String,
    /// Static credentials secret.
    pub secret_access_key: String,
    /// Deadline for the whole batch-tier lookup of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl DynamoConfig {
    /// Static credentials need both keys; the default chain takes none (a
    /// key left over from a static setup would be silently ignored).
    pub fn check_credentials(&self) -> Result<(), Invalid> {
        let (id, secret) = (self.access_key_id.is_empty(), self.secret_access_key.is_empty());
        match self.credentials {
            CredentialSource::Static if id || secret => Err(Invalid::new(
                if id { "dynamodb.access_key_id" } else { "dynamodb.secret_access_key" },
                "required with dynamodb.credentials = \"static\" (or use \"default_chain\")",
            )),
            CredentialSource::DefaultChain if !id || !secret => Err(Invalid::new(
                if !id { "dynamodb.access_key_id" } else { "dynamodb.secret_access_key" },
                "must be empty with dynamodb.credentials = \"default_chain\"",
            )),
            _ => Ok(()),
        }
    }
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8000".into(),
            region: "us-east-1".into(),
            credentials: CredentialSource::Static,
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
            user_cache: crate::UserCacheConfig::default(),
            mode: Mode::default(),
            aggregates: AggregatesConfig::default(),
            breaker: crate::breaker::BreakerConfig::default(),
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
        self.dynamodb.check_credentials()?;
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
        self.user_cache.validate()?;
        if self.mode.aggregates() {
            self.aggregates.validate()?;
        }
        self.breaker.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_keys_must_agree() {
        let mut c = FeatureServiceConfig::default();
        c.validate().unwrap();
        c.dynamodb.secret_access_key.clear();
        assert_eq!(c.validate().unwrap_err().key, "dynamodb.secret_access_key");
        c.dynamodb.credentials = CredentialSource::DefaultChain;
        assert_eq!(c.validate().unwrap_err().key, "dynamodb.access_key_id", "leftover static key");
        c.dynamodb.access_key_id.clear();
        c.validate().unwrap();
    }
}
