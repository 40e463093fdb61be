//! Gateway configuration.

use std::{net::SocketAddr, time::Duration};

use adserve_catalog::PostgresConfig;
use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, ports};
use adserve_events::KafkaConfig;
use serde::{Deserialize, Serialize};

/// Everything the gateway reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
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
#[serde(default, deny_unknown_fields)]
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
            feature_service: ports::local_url(ports::FEATURE_SERVICE_GRPC),
            ranker: ports::local_url(ports::RANKER_GRPC),
            auction: ports::local_url(ports::AUCTION_GRPC),
        }
    }
}

/// How long each dependency may take.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Deadlines {
    /// Catalog eligibility query.
    #[serde(with = "humantime_serde")]
    pub catalog: Duration,
    /// Feature-service call.
    #[serde(with = "humantime_serde")]
    pub features: Duration,
    /// Ranker call.
    #[serde(with = "humantime_serde")]
    pub ranker: Duration,
    /// Auction call.
    #[serde(with = "humantime_serde")]
    pub auction: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            catalog: Duration::from_millis(200),
            features: Duration::from_millis(150),
            ranker: Duration::from_millis(250),
            auction: Duration::from_millis(50),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::GATEWAY_GRPC, ports::GATEWAY_METRICS),
            http_addr: SocketAddr::from(([127, 0, 0, 1], ports::GATEWAY_HTTP)),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            kafka: KafkaConfig::default(),
            upstreams: Upstreams::default(),
            deadlines: Deadlines::default(),
            max_candidates: 1000,
            reserve_ecpm_micros: adserve_auction::DEFAULT_RESERVE_ECPM_MICROS,
            fallback_pctr_feature: adserve_features::prior::DEFAULT_PRIOR_FEATURE.into(),
            max_body_bytes: 16 * 1024,
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        self.postgres.validate()?;
        self.kafka.validate()?;
        for (key, url) in [
            ("upstreams.feature_service", &self.upstreams.feature_service),
            ("upstreams.ranker", &self.upstreams.ranker),
            ("upstreams.auction", &self.upstreams.auction),
        ] {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(Invalid::new(key, format!("must be an http(s) URL, got {url:?}")));
            }
        }
        let d = &self.deadlines;
        let (min, max) = (Duration::from_millis(1), Duration::from_secs(60));
        check_duration("deadlines.catalog", d.catalog, min, max)?;
        check_duration("deadlines.features", d.features, min, max)?;
        check_duration("deadlines.ranker", d.ranker, min, max)?;
        check_duration("deadlines.auction", d.auction, min, max)?;
        check_range("max_candidates", self.max_candidates, 1..=adserve_auction::MAX_CANDIDATES)?;
        if adserve_features::registry().index_of(&self.fallback_pctr_feature).is_none() {
            return Err(Invalid::new(
                "fallback_pctr_feature",
                format!("{:?} is not in the feature registry", self.fallback_pctr_feature),
            ));
        }
        check_range("reserve_ecpm_micros", self.reserve_ecpm_micros, 0..=i64::MAX)?;
        check_range("max_body_bytes", self.max_body_bytes, 256..=64 * 1024 * 1024)?;
        Ok(())
    }
}
