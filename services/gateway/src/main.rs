//! adserve-gateway: config -> telemetry -> catalog, Kafka -> serve HTTP + gRPC.
use std::time::Duration;

use adserve_catalog::Catalog;
use adserve_events::EventPublisher;
use adserve_gateway::{AdServer, GatewayConfig, grpc::GatewayGrpc, http};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: GatewayConfig = adserve_core::load_config()?;
    let (_telemetry, shutdown, grpc_listener) =
        adserve_core::bootstrap("adserve-gateway", &config.server, &config.telemetry).await?;
    let catalog = Catalog::connect_lazy(&config.postgres)?;
    let migrated = if config.postgres.migrate { catalog.migrate(&config.postgres.schema).await } else { Ok(()) };
    if let Err(e) = migrated {
        tracing::warn!(error = %e, "catalog migrations not applied yet; requests will fail until PostgreSQL answers");
    }
    if let Err(e) = adserve_events::ensure_topics(&config.kafka).await {
        tracing::warn!(error = %e, "cannot ensure Kafka topics yet");
    }
    let server = AdServer::new(config.clone(), catalog, EventPublisher::new(&config.kafka)?)?;
    let http_listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("http_addr: cannot listen on {}: {e}", config.http_addr))?;
    tracing::info!(http = %config.http_addr, "listening");
    let http = {
        let shutdown = shutdown.clone();
        axum::serve(
            adserve_core::net::http_listener(http_listener),
            http::router(server.clone(), config.max_body_bytes),
        )
        .with_graceful_shutdown(async move { shutdown.wait().await })
    };
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let grpc = adserve_core::grpc::serve(
        grpc_listener,
        Routes::new(GatewayGrpc(server).into_server()),
        &[service_names::GATEWAY],
        shutdown,
        grace,
    );
    let (http, grpc) = tokio::join!(async { http.await }, grpc);
    http?;
    grpc?;
    Ok(())
}
