//! Gateway configuration.

use std::net::SocketAddr;

use adserve_catalog::PostgresConfig;
use adserve_core::{ServerConfig, TelemetryConfig, Validate};
use adserve_events::KafkaConfig;
use serde::{Deserialize, Serialize};

/// Everything the gateway reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GatewayConfig {
    /// gRPC (50051) and metrics (9101) listen addresses.
    pub server: ServerConfig,
    /// HTTP/JSON listen address.
    pub http_addr: SocketAddr,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Ad catalog.
    pub postgres: PostgresConfig,
    /// Impression and click log.
    pub kafka: KafkaConfig,
    /// Where the other services listen.
    pub upstreams: Upstreams,
    /// Per-dependency deadlines.
    pub deadlines: Deadlines,
    /// Most eligible ads scored per request.
    pub max_candidates: usize,
    /// Reserve eCPM (micro units) sent with every auction request, and used by
    /// the in-process fallback auction.
    pub reserve_ecpm_micros: i64,
    /// Feature whose value is the fallback pCTR when the ranker is down.
    pub fallback_pctr_feature: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

/// gRPC endpoints of the other services.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Upstreams {
    /// feature-service URL.
    pub feature_service: String,
    /// ranker URL.
    pub ranker: String,
    /// auction URL.
    pub auction: String,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            feature_service: "http://127.0.0.1:50052".into(),
            ranker: "http://127.0.0.1:50053".into(),
            auction: "http://127.0.0.1:50054".into(),
        }
    }
}

/// How long each dependency may take, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Deadlines {
    /// Catalog eligibility query.
    pub catalog_ms: u64,
    /// Feature-service call.
    pub features_ms: u64,
    /// Ranker call.
    pub ranker_ms: u64,
    /// Auction call.
    pub auction_ms: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self { catalog_ms: 200, features_ms: 150, ranker_ms: 250, auction_ms: 50 }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(50051, 9101),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            kafka: KafkaConfig::default(),
            upstreams: Upstreams::default(),
            deadlines: Deadlines::default(),
            max_candidates: 1000,
            reserve_ecpm_micros: 10_000,
            fallback_pctr_feature: "ad_ctr_7d".into(),
            max_body_bytes: 16 * 1024,
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), String> {
        self.server.validate()?;
        self.postgres.validate()?;
        self.kafka.validate()?;
        for (name, url) in [
            ("upstreams.feature_service", &self.upstreams.feature_service),
            ("upstreams.ranker", &self.upstreams.ranker),
            ("upstreams.auction", &self.upstreams.auction),
        ] {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(format!("{name}: must be an http(s) URL, got {url:?}"));
            }
        }
        let d = &self.deadlines;
        if [d.catalog_ms, d.features_ms, d.ranker_ms, d.auction_ms].contains(&0) {
            return Err("deadlines.*_ms: must be > 0".into());
        }
        if self.max_candidates == 0 || self.max_candidates > 5000 {
            return Err("max_candidates: must be in 1..=5000".into());
        }
        if adserve_features::registry().index_of(&self.fallback_pctr_feature).is_none() {
            return Err(format!(
                "fallback_pctr_feature: {:?} is not in the feature registry",
                self.fallback_pctr_feature
            ));
        }
        if self.reserve_ecpm_micros < 0 {
            return Err("reserve_ecpm_micros: must be >= 0".into());
        }
        if self.max_body_bytes < 256 {
            return Err("max_body_bytes: must be >= 256".into());
        }
        Ok(())
    }
}
