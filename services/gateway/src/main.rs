//! adserve-gateway: config -> telemetry -> catalog, Kafka -> serve HTTP + gRPC.
use adserve_catalog::Catalog;
use adserve_events::EventPublisher;
use adserve_gateway::{AdServer, GatewayConfig, grpc::GatewayGrpc, http};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: GatewayConfig = adserve_core::load_config()?;
    let (_telemetry, lifecycle, grpc_listener) =
        adserve_core::bootstrap(adserve_core::build_info!("adserve-gateway"), &config.server, &config.telemetry)
            .await?;
    let catalog = Catalog::connect_lazy(&config.postgres)?;
    let migrated = if config.postgres.migrate { catalog.migrate(&config.postgres.schema).await } else { Ok(()) };
    if let Err(e) = migrated {
        tracing::warn!(error = %e, "catalog migrations not applied yet; requests will fail until PostgreSQL answers");
    }
    if let Err(e) = adserve_events::ensure_topics(&config.kafka).await {
        tracing::warn!(error = %e, "cannot ensure Kafka topics yet");
    }
    let events = EventPublisher::new(&config.kafka, "gateway")?;
    // The first send of a cold producer waits for broker discovery, longer
    // than the impression log's share of a request: warm it before serving.
    let topics = [adserve_events::IMPRESSIONS_TOPIC, adserve_events::CLICKS_TOPIC];
    if let Err(e) = events.warm_up(&topics, std::time::Duration::from_secs(5)).await {
        tracing::warn!(error = %e, "kafka producer not warmed; the first requests may answer 503");
    }
    // No ad is served unlogged: while the producer is being replaced the gateway is not ready.
    adserve_events::report_health(events.clone(), lifecycle.readiness.clone(), "kafka impression log");
    let server = AdServer::new(config.clone(), catalog, events)?;
    server.wait_for_counters(std::time::Duration::from_secs(1)).await;
    server.wait_for_catalog(std::time::Duration::from_secs(10)).await;
    let http_listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("http_addr: cannot listen on {}: {e}", config.http_addr))?;
    tracing::info!(http = %config.http_addr, "listening");
    let router = http::router(server.clone(), http::BodyLimits::of(&config), lifecycle.readiness.clone());
    let http = adserve_core::http::serve(http_listener, router, &lifecycle);
    let routes = Routes::new(GatewayGrpc(server).into_server());
    let grpc = adserve_core::grpc::serve(
        grpc_listener,
        routes,
        &[service_names::GATEWAY],
        &lifecycle,
        adserve_core::net::Callers::Public,
    );
    let (http, grpc) = tokio::join!(http, grpc);
    http?;
    grpc?;
    Ok(())
}
