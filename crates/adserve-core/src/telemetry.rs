//! Structured logs (tracing), optional OpenTelemetry trace export over OTLP,
//! and the Prometheus `/metrics` endpoint. Set up once per process.

use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::TelemetryConfig;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `telemetry.log_filter` is not a valid filter directive.
    #[error("telemetry.log_filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built.
    #[error("telemetry.otlp_endpoint: {0}")]
    Otlp(String),
    /// The metrics endpoint could not bind.
    #[error("server.metrics_addr: {0}")]
    Metrics(String),
}

/// Flushes and shuts down trace export when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.provider.take().map(|p| p.shutdown()) {
            eprintln!("opentelemetry shutdown: {e}");
        }
    }
}

/// Installs the global tracing subscriber for `service` (JSON or text logs,
/// plus OTLP export when `config.otlp_endpoint` is set).
pub fn init_tracing(service: &'static str, config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.log_filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let fmt = if config.log_json {
        tracing_subscriber::fmt::layer().json().with_current_span(false).boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let (otel, provider) = if config.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
        (Some(layer), Some(provider))
    };
    // A second init (e.g. several services in one test process) keeps the first.
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    Ok(TelemetryGuard { provider })
}

/// Serves Prometheus metrics at `http://{addr}/metrics`; every `metrics::*!`
/// macro in the process is exported there.
pub fn init_metrics(addr: SocketAddr) -> Result<(), TelemetryError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
        )
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?
        // Every other histogram is a count (rows, candidates).
        .set_buckets(&[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0])
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?
        .install()
        .map_err(|e| TelemetryError::Metrics(e.to_string()))
}
