//! adserve-ranker: config -> telemetry -> load and check the model (the
//! registry's production version, else model.dir) -> follow the registry ->
//! serve.
use std::sync::Arc;

use adserve_proto::service_names;
use adserve_ranker::{RankerConfig, RankerGrpc, follow};
use adserve_registry::Registry;
use tonic::service::Routes;

/// The readiness entry held while the models load.
const MODEL_DEPENDENCY: &str = "model";

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(run());
    // A model load that outlived registry.load_timeout may still hold a
    // blocking thread (on a hung file system, forever): the process exits
    // without waiting for it, as dropping the runtime would.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

async fn run() -> anyhow::Result<()> {
    let config: RankerConfig = adserve_core::load_config()?;
    let (_telemetry, lifecycle, listener) =
        adserve_core::bootstrap(adserve_core::build_info!("adserve-ranker"), &config.server, &config.telemetry).await?;
    let registry = match config.registry.enabled {
        true => Some(Registry::connect_lazy(&config.registry.postgres)?),
        false => None,
    };
    let loader = follow::Loader {
        model: config.model.clone(),
        batching: config.batching.clone(),
        max_rows: config.max_rows,
        dylib: config.onnxruntime_dylib.clone(),
        queue: adserve_ranker::QueueKind::Model,
    };
    // Not ready until the models are loaded, checked and warmed (a TensorRT
    // engine build can take minutes): /healthz says why. gRPC, whose health
    // service the probes use without TLS, is not served until then either.
    lifecycle.readiness.set(MODEL_DEPENDENCY, Some("loading".into()));
    let start = follow::initial(registry.as_ref(), &config.registry, &loader).await?;
    let serving = Arc::new(start.serving);
    if let Some(registry) = registry {
        tokio::spawn(follow::follow(registry, config.registry.clone(), loader.clone(), serving.clone(), start.held));
    }
    let fallback_model = if config.fallback.enabled {
        let dir = config.fallback.model_dir.clone().unwrap_or_else(|| config.model.dir.clone());
        let one_session = follow::Loader {
            batching: adserve_ranker::BatchingConfig { sessions: 1, ..config.batching.clone() },
            queue: adserve_ranker::QueueKind::Fallback,
            ..loader.clone()
        };
        match one_session.load(Some(dir)).await {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::warn!(error = %e, "fallback model refused; the prior is the only fallback");
                None
            }
        }
    } else {
        None
    };
    let fallback = adserve_ranker::service::Fallback {
        model: fallback_model,
        reserve: config.fallback.reserve,
        prior_feature: config.fallback.prior_feature.clone(),
    };
    let mut service = RankerGrpc::new(serving, config.max_rows, config.server.request_timeout)
        .with_fallback(fallback)
        .with_model_name(config.registry.model_name.clone());
    if config.shadow.enabled {
        let kafka = config.kafka.clone();
        tokio::spawn(async move {
            if let Err(e) = adserve_events::ensure_topics(&kafka).await {
                tracing::warn!(error = %e, "could not create the Kafka topics; shadow scores wait for the broker");
            }
        });
        let publisher = adserve_events::EventPublisher::new(&config.kafka, "adserve-ranker")?;
        let sink = adserve_ranker::service::ShadowSink::new(
            publisher,
            config.shadow.max_in_flight,
            config.shadow.sample_share,
        );
        service = service.with_shadow(sink);
    }
    lifecycle.readiness.set(MODEL_DEPENDENCY, None);
    let routes = Routes::new(service.into_server());
    adserve_core::grpc::serve(
        listener,
        routes,
        &[service_names::RANKER],
        &lifecycle,
        adserve_core::net::Callers::Internal,
    )
    .await?;
    Ok(())
}
