//! adserve-ranker: config -> telemetry -> load and check the model (the
//! registry's production version, else model.dir) -> follow the registry ->
//! serve.
use std::sync::Arc;

use adserve_proto::service_names;
use adserve_ranker::{RankerConfig, RankerGrpc, follow};
use adserve_registry::Registry;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    };
    let serving = Arc::new(follow::initial(registry.as_ref(), &config.registry, &loader).await?);
    if let Some(registry) = registry {
        tokio::spawn(follow::follow(registry, config.registry.clone(), loader, serving.clone()));
    }
    let service = RankerGrpc::new(serving, config.max_rows, config.server.request_timeout);
    let routes = Routes::new(service.into_server());
    adserve_core::grpc::serve(listener, routes, &[service_names::RANKER], &lifecycle).await?;
    Ok(())
}
