//! What every adserve service shares: typed configuration (defaults < TOML
//! file < `ADSERVE_*` environment), telemetry (tracing, OpenTelemetry export,
//! Prometheus metrics), and a gRPC server with health, reflection and
//! graceful shutdown.

pub mod config;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod net;
pub mod readiness;
pub mod shutdown;
pub mod telemetry;

pub use config::{ConfigError, ServerConfig, TelemetryConfig, Validate, load_config};
pub use lifecycle::Lifecycle;
pub use readiness::Readiness;
pub use shutdown::Shutdown;

/// What every service's `main` does first: install telemetry and the metrics
/// endpoint, listen for SIGTERM, and bind the gRPC port.
pub async fn bootstrap(
    service: &'static str,
    server: &ServerConfig,
    telemetry: &TelemetryConfig,
) -> Result<(telemetry::TelemetryGuard, Lifecycle, tokio::net::TcpListener), BootstrapError> {
    let guard = telemetry::init_tracing(service, telemetry)?;
    let metrics = telemetry::init_metrics()?;
    let metrics_listener = tokio::net::TcpListener::bind(server.metrics_addr)
        .await
        .map_err(|e| BootstrapError::Bind("server.metrics_addr", server.metrics_addr, e))?;
    telemetry::serve_metrics(metrics_listener, metrics);
    let listener = tokio::net::TcpListener::bind(server.grpc_addr)
        .await
        .map_err(|e| BootstrapError::Bind("server.grpc_addr", server.grpc_addr, e))?;
    tracing::info!(service, grpc = %server.grpc_addr, metrics = %server.metrics_addr, "listening");
    Ok((guard, Lifecycle::new(server, Shutdown::listen_for_signals()), listener))
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Telemetry or metrics setup failed.
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    /// A listen address could not be bound (the key, the address, why).
    #[error("{0}: cannot listen on {1}: {2}")]
    Bind(&'static str, std::net::SocketAddr, std::io::Error),
}
