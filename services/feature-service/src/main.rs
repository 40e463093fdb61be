//! adserve-feature-service: config -> telemetry -> connect stores -> serve
//! GetFeatures and/or run the streaming aggregates (`mode`).
use adserve_events::EventPublisher;
use std::sync::Arc;

use adserve_feature_service::{
    AdTable, Aggregator, BatchStore, FeatureGrpc, FeatureServiceConfig, RealtimeStore, aggregates,
    freshness::RealtimeFreshness,
};
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

    let aggregating = if config.mode.aggregates() {
        let kafka = &config.aggregates.kafka;
        if let Err(e) = adserve_events::ensure_topics(kafka).await {
            tracing::warn!(error = %e, "cannot ensure Kafka topics yet");
        }
        let dead_letters = EventPublisher::new(kafka, "feature-aggregates")?;
        // Its own connection, so its scripts never queue ahead of a
        // request's MGET, with room for a script over a busy entity.
        let writes = adserve_counters::RedisConfig {
            timeout: config.redis.timeout.max(std::time::Duration::from_secs(1)),
            ..config.redis.clone()
        };
        let aggregator =
            Aggregator::new(adserve_counters::client(&writes)?, &registry.redis.key_prefix, &config.aggregates);
        // Only a process that does nothing else is unready while its consumer is down.
        let alone = !config.mode.serves();
        if alone {
            adserve_events::report_health(
                dead_letters.clone(),
                lifecycle.readiness.clone(),
                "kafka dead-letter producer",
            );
        }
        let (config, lifecycle) = (config.aggregates.clone(), lifecycle.clone());
        Some(tokio::spawn(async move {
            aggregates::supervise(&config, &config.kafka, aggregator, dead_letters, &lifecycle, alone).await;
        }))
    } else {
        None
    };

    // The health name is the same in every mode (the chart's readiness probe
    // asks for it); with mode = aggregate it follows the consumer.
    let routes = if config.mode.serves() {
        let batch = BatchStore::new(&config.dynamodb, registry);
        if let Err(e) = batch.ensure_tables().await {
            // The service still starts: lookups degrade to defaults until DynamoDB answers.
            tracing::warn!(error = %e, "cannot ensure DynamoDB tables yet");
        }
        let realtime = RealtimeStore::connect(&config.redis, registry).await?;
        let freshness = Arc::new(RealtimeFreshness::new(registry));
        tokio::spawn(freshness.clone().follow(realtime.clone(), std::time::Duration::from_secs(1)));
        let mut service = FeatureGrpc::new(
            registry,
            batch.clone(),
            realtime,
            config.dynamodb.timeout,
            config.redis.timeout,
            config.max_ads,
        )
        .with_breakers(config.breaker)
        .with_freshness(freshness)
        .with_user_cache(adserve_feature_service::UserCache::new(&config.user_cache));
        if config.ad_table.enabled {
            let table = AdTable::new();
            tokio::spawn(table.clone().refresh(batch, config.ad_table.refresh, config.ad_table.max_age));
            service = service.with_ad_table(table);
        }
        Routes::new(service.into_server())
    } else {
        // Health and metrics only.
        Routes::default()
    };
    adserve_core::grpc::serve(
        listener,
        routes,
        &[service_names::FEATURE_SERVICE],
        &lifecycle,
        adserve_core::net::Callers::Internal,
    )
    .await?;
    if let Some(task) = aggregating {
        let _ = task.await;
    }
    Ok(())
}
