//! adserve-ranker: config -> telemetry -> load model -> serve.
use std::sync::Arc;

use adserve_proto::service_names;
use adserve_ranker::{CtrModel, RankerConfig, RankerGrpc};
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: RankerConfig = adserve_core::load_config()?;
    let (_telemetry, lifecycle, listener) =
        adserve_core::bootstrap(adserve_core::build_info!("adserve-ranker"), &config.server, &config.telemetry).await?;
    let model = Arc::new(CtrModel::load(&config.model, &config.onnxruntime_dylib)?);
    let routes = Routes::new(RankerGrpc::new(model, config.max_rows).into_server());
    adserve_core::grpc::serve(listener, routes, &[service_names::RANKER], &lifecycle).await?;
    Ok(())
}
