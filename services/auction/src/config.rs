//! Auction service configuration.

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_range, ports};
use serde::{Deserialize, Serialize};

/// Everything the auction service reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuctionConfig {
    /// Listen addresses (gRPC 50054, metrics 9104 by default).
    pub server: ServerConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Reserve eCPM in micro units, used when a request does not set one.
    pub reserve_ecpm_micros: i64,
}

impl Default for AuctionConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::AUCTION_GRPC, ports::AUCTION_METRICS),
            telemetry: TelemetryConfig::default(),
            reserve_ecpm_micros: adserve_auction::DEFAULT_RESERVE_ECPM_MICROS,
        }
    }
}

impl Validate for AuctionConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        check_range("reserve_ecpm_micros", self.reserve_ecpm_micros, 0..=i64::MAX)
    }
}
