//! adserve-label-joiner: config -> telemetry -> join loop + gRPC status.
use std::{sync::Arc, time::Duration};

use adserve_label_joiner::{LabelJoinerConfig, runner::Runner, service::LabelJoinerGrpc};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: LabelJoinerConfig = adserve_core::load_config()?;
    let (_telemetry, shutdown, listener) =
        adserve_core::bootstrap("adserve-label-joiner", &config.server, &config.telemetry).await?;
    if let Err(e) = adserve_events::ensure_topics(&config.kafka).await {
        tracing::warn!(error = %e, "cannot ensure Kafka topics yet");
    }
    let status = Arc::default();
    let (commands, inbox) = tokio::sync::mpsc::channel(8);
    let runner = Runner::start(&config, Arc::clone(&status), inbox).await?;
    let service = LabelJoinerGrpc::new(status, commands, config.output_dir.clone());
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let grpc = adserve_core::grpc::serve(
        listener,
        Routes::new(service.into_server()),
        &[service_names::LABEL_JOINER],
        shutdown.clone(),
        grace,
    );
    // A join loop that fails stops the whole process (and so is restarted and re-reads).
    let joined = async {
        let result = runner.run(shutdown.clone()).await;
        shutdown.trigger();
        result
    };
    let (grpc, joined) = tokio::join!(grpc, joined);
    grpc?;
    joined?;
    Ok(())
}
