//! Feature-service configuration.

use adserve_core::{ServerConfig, TelemetryConfig, Validate};
use serde::{Deserialize, Serialize};

/// Everything the feature-service reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
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
}

/// Redis connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Deadline for the whole real-time lookup of one request.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: "redis://127.0.0.1:6379/0".into(), timeout_ms: 50 }
    }
}

/// DynamoDB connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
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
    pub timeout_ms: u64,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8000".into(),
            region: "us-east-1".into(),
            // DynamoDB Local accepts only letters and digits in the key id.
            access_key_id: "adservelocal".into(),
            secret_access_key: "adservelocal".into(),
            timeout_ms: 100,
        }
    }
}

impl Default for FeatureServiceConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(50052, 9102),
            telemetry: TelemetryConfig::default(),
            redis: RedisConfig::default(),
            dynamodb: DynamoConfig::default(),
            max_ads: 5000,
        }
    }
}

impl Validate for FeatureServiceConfig {
    fn validate(&self) -> Result<(), String> {
        self.server.validate()?;
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            return Err(format!("redis.url: must start with redis:// or rediss://, got {:?}", self.redis.url));
        }
        if self.redis.timeout_ms == 0 || self.dynamodb.timeout_ms == 0 {
            return Err("redis.timeout_ms / dynamodb.timeout_ms: must be > 0".into());
        }
        if self.dynamodb.region.is_empty() {
            return Err("dynamodb.region: required".into());
        }
        if !self.dynamodb.endpoint.is_empty() && !self.dynamodb.endpoint.starts_with("http") {
            return Err(format!("dynamodb.endpoint: must be an http(s) URL, got {:?}", self.dynamodb.endpoint));
        }
        if self.max_ads == 0 || self.max_ads > 100_000 {
            return Err("max_ads: must be in 1..=100000".into());
        }
        Ok(())
    }
}
