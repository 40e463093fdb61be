//! Structured logs (tracing), optional OpenTelemetry trace export over OTLP,
//! and the Prometheus `/metrics` endpoint. Set up once per process.

use metrics_exporter_prometheus::{Matcher, PrometheusHandle};
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
    /// `telemetry.trace_sample_ratio` is outside `[0, 1]`.
    #[error("telemetry.trace_sample_ratio: must be in [0, 1], got {0}")]
    SampleRatio(f64),
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
    if !(0.0..=1.0).contains(&config.trace_sample_ratio) {
        return Err(TelemetryError::SampleRatio(config.trace_sample_ratio));
    }
    let (otel, provider) = if config.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        // Head sampling at the edge; downstream services follow the caller.
        let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(config.trace_sample_ratio),
        ));
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
        (Some(layer), Some(provider))
    };
    // traceparent in and out of every request (trace_context).
    crate::trace_context::install_propagator();
    // A second init (e.g. several services in one test process) keeps the first.
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    Ok(TelemetryGuard { provider })
}

/// Latency buckets of every `*_seconds` histogram: fine enough between 1 and
/// 50 ms to read a 25 ms p99 from a scrape.
pub const LATENCY_BUCKETS: [f64; 28] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175,
    0.02, 0.0225, 0.025, 0.03, 0.035, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets of the `*_seconds` histograms of slow operations (seconds to a
/// day: `registry.load_timeout` may be set that high), named in
/// [`SLOW_SECONDS`].
pub const SLOW_BUCKETS: [f64; 17] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14_400.0, 86_400.0];

/// Histograms of operations that take seconds to minutes (a model load, on
/// a GPU a TensorRT engine build): [`LATENCY_BUCKETS`] would put them all
/// in `+Inf`.
pub const SLOW_SECONDS: [&str; 1] = ["adserve_ranker_model_load_seconds"];

/// Buckets of every other histogram: they count things (rows, candidates).
pub const COUNT_BUCKETS: [f64; 9] = [1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// Installs the process-wide Prometheus recorder; every `metrics::*!` macro in
/// the process is exported through the returned handle.
pub fn init_metrics() -> Result<PrometheusHandle, TelemetryError> {
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    // A full name wins over the suffix (the exporter checks Full matchers first).
    for name in SLOW_SECONDS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), &SLOW_BUCKETS)
            .map_err(|e| TelemetryError::Metrics(e.to_string()))?;
    }
    let handle = builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?
        .set_buckets(&COUNT_BUCKETS)
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?;
    // Histograms are summarised lazily; keep the work off the scrape path.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Sets `adserve_build_info{service,version,git_sha,profile} 1` (the
/// Prometheus convention: join on it to label any series with the build).
pub fn report_build(build: crate::BuildInfo) {
    metrics::gauge!(
        "adserve_build_info",
        "service" => build.service,
        "version" => build.version,
        "git_sha" => build.git_sha,
        "profile" => build.profile,
    )
    .set(1.0);
}

/// The body of `GET /buildinfo`: the build plus the process id, so a
/// supervisor (scripts/start.sh) can tell whether the process on a port is
/// the binary it would start.
pub fn build_info_json(build: crate::BuildInfo) -> serde_json::Value {
    serde_json::json!({
        "service": build.service,
        "version": build.version,
        "git_sha": build.git_sha,
        "profile": build.profile,
        "pid": std::process::id(),
    })
}

/// Serves `GET /metrics` (Prometheus text format), `GET /buildinfo` (JSON),
/// and the HTTP health checks `GET /livez` (200 while the process serves) and
/// `GET /healthz` (200 when ready, 503 when not: the same readiness as the
/// gRPC health service) on `listener` until the process exits. The HTTP
/// checks are what a kubelet probes when the gRPC port speaks TLS (its gRPC
/// probe cannot). Its accepted sockets get the same settings as every other
/// server's ([`crate::net::http_listener`]).
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    build: crate::BuildInfo,
    readiness: crate::Readiness,
) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/buildinfo", axum::routing::get(move || async move { axum::Json(build_info_json(build)) }))
        .route("/livez", axum::routing::get(|| async { "ok" }))
        .route(
            "/healthz",
            axum::routing::get(move || {
                let answer = readiness.healthz();
                async move { answer }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(crate::net::http_listener(listener), app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
}
