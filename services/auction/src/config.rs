//! Auction service configuration.

use adserve_core::{ServerConfig, TelemetryConfig, Validate};
use serde::{Deserialize, Serialize};

/// Everything the auction service reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
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
            server: ServerConfig::on_ports(50054, 9104),
            telemetry: TelemetryConfig::default(),
            reserve_ecpm_micros: 10_000,
        }
    }
}

impl Validate for AuctionConfig {
    fn validate(&self) -> Result<(), String> {
        self.server.validate()?;
        if self.reserve_ecpm_micros < 0 {
            return Err("reserve_ecpm_micros: must be >= 0".into());
        }
        Ok(())
    }
}
