//! adserve-auction: config -> telemetry -> serve.
use std::time::Duration;

use adserve_auction::{AuctionConfig, AuctionGrpc};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: AuctionConfig = adserve_core::load_config()?;
    let (_telemetry, shutdown, listener) =
        adserve_core::bootstrap("adserve-auction", &config.server, &config.telemetry).await?;
    let routes = Routes::new(AuctionGrpc::new(config.reserve_ecpm_micros).into_server());
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    adserve_core::grpc::serve(listener, routes, &[service_names::AUCTION], shutdown, grace).await?;
    Ok(())
}
