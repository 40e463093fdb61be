//! adserve-feature-service: config -> telemetry -> connect stores -> serve.
use adserve_feature_service::{AdTable, BatchStore, FeatureGrpc, FeatureServiceConfig, RealtimeStore};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: FeatureServiceConfig = adserve_core::load_config()?;
    let (_telemetry, lifecycle, listener) = adserve_core::bootstrap(
        adserve_core::build_info!("adserve-feature-service"),
        &config.server,
        &config.telemetry,
    )
    .await?;
    let registry = adserve_features::registry();
    let batch = BatchStore::new(&config.dynamodb, registry);
    if let Err(e) = batch.ensure_tables().await {
        // The service still starts: lookups degrade to defaults until DynamoDB answers.
        tracing::warn!(error = %e, "cannot ensure DynamoDB tables yet");
    }
    let realtime = RealtimeStore::connect(&config.redis, registry).await?;
    let mut service = FeatureGrpc::new(
        registry,
        batch.clone(),
        realtime,
        config.dynamodb.timeout,
        config.redis.timeout,
        config.max_ads,
    );
    if config.ad_table.enabled {
        let table = AdTable::new();
        tokio::spawn(table.clone().refresh(batch, config.ad_table.refresh, config.ad_table.max_age));
        service = service.with_ad_table(table);
    }
    let routes = Routes::new(service.into_server());
    adserve_core::grpc::serve(listener, routes, &[service_names::FEATURE_SERVICE], &lifecycle).await?;
    Ok(())
}
