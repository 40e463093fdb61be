//! Auction service configuration.

use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, ports};
use serde::{Deserialize, Serialize};

/// Everything the auction service reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuctionConfig {
    /// Listen addresses (gRPC 50054, metrics 9104 by default).
    pub server: ServerConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
}

impl Default for AuctionConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::AUCTION_GRPC, ports::AUCTION_METRICS),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Validate for AuctionConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()
    }
}
