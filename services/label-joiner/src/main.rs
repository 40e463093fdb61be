//! adserve-label-joiner: config -> telemetry -> join loop + gRPC status.
use std::sync::Arc;

use adserve_events::EventPublisher;
use adserve_label_joiner::{LabelJoinerConfig, runner, service::LabelJoinerGrpc};
use adserve_proto::service_names;
use tonic::service::Routes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: LabelJoinerConfig = adserve_core::load_config()?;
    // TLS for object storage uses rustls with the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (_telemetry, lifecycle, listener) =
        adserve_core::bootstrap(adserve_core::build_info!("adserve-label-joiner"), &config.server, &config.telemetry)
            .await?;
    if let Err(e) = adserve_events::ensure_topics(&config.kafka).await {
        tracing::warn!(error = %e, "cannot ensure Kafka topics yet");
    }
    let status = Arc::default();
    let (commands, inbox) = tokio::sync::mpsc::channel(8);
    let dead_letters = EventPublisher::new(&config.kafka, "label-joiner")?;
    adserve_events::report_health(dead_letters.clone(), lifecycle.readiness.clone(), "kafka dead-letter producer");
    let service = LabelJoinerGrpc::new(Arc::clone(&status), commands, config.output_location(), &config.admin_token);
    let grpc = adserve_core::grpc::serve(
        listener,
        Routes::new(service.into_server()),
        &[service_names::LABEL_JOINER],
        &lifecycle,
        adserve_core::net::Callers::Internal,
    );
    // Kafka failures restart the loop in-process; a sink failure that leaves a
    // file's fate unknown stops the process (a restart re-reads the files).
    let joined = async {
        let result = runner::supervise(&config, status, dead_letters, &lifecycle, inbox).await;
        lifecycle.shutdown.trigger();
        result
    };
    let (grpc, joined) = tokio::join!(grpc, joined);
    grpc?;
    joined?;
    Ok(())
}
