//! adserve-auction: config -> telemetry -> serve.
use adserve_auction_service::{AuctionConfig, AuctionGrpc};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: AuctionConfig = adserve_core::load_config()?;
    let (_telemetry, lifecycle, listener) =
        adserve_core::bootstrap(adserve_core::build_info!("adserve-auction"), &config.server, &config.telemetry)
            .await?;
    let routes = Routes::new(AuctionGrpc::new().into_server());
    adserve_core::grpc::serve(
        listener,
        routes,
        &[service_names::AUCTION],
        &lifecycle,
        adserve_core::net::Callers::Internal,
    )
    .await?;
    Ok(())
}
