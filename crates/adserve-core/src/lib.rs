//! What every adserve service shares: typed configuration (defaults < TOML
//! file < `ADSERVE_*` environment), telemetry (tracing, OpenTelemetry export,
//! Prometheus metrics), and a gRPC server with health, reflection and
//! graceful shutdown.

pub mod config;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod net;
pub mod overload;
pub mod ports;
pub mod readiness;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace_context;

pub use config::{
    ConfigError, Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, load_config,
};
pub use lifecycle::Lifecycle;
pub use readiness::Readiness;
pub use shutdown::Shutdown;

/// Which build a service is: reported as `adserve_build_info` and on
/// `GET /buildinfo`. Made by [`build_info!`] in the service's `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BuildInfo {
    /// The service (binary) name, e.g. `adserve-gateway`.
    pub service: &'static str,
    /// The workspace version.
    pub version: &'static str,
    /// The git commit the build was made from.
    pub git_sha: &'static str,
    /// The cargo profile.
    pub profile: &'static str,
}

/// The [`BuildInfo`] of the calling binary; it must depend on
/// `adserve-build-info` (only the services do, so a commit does not
/// recompile the shared crates).
#[macro_export]
macro_rules! build_info {
    ($service:expr) => {
        $crate::BuildInfo {
            service: $service,
            version: adserve_build_info::VERSION,
            git_sha: adserve_build_info::GIT_SHA,
            profile: adserve_build_info::PROFILE,
        }
    };
}

/// What every service's `main` does first: install telemetry and the metrics
/// endpoint (with `adserve_build_info` and `/buildinfo`), listen for
/// SIGTERM, and bind the gRPC port.
pub async fn bootstrap(
    build: BuildInfo,
    server: &ServerConfig,
    telemetry: &TelemetryConfig,
) -> Result<(telemetry::TelemetryGuard, Lifecycle, tokio::net::TcpListener), BootstrapError> {
    let service = build.service;
    let guard = telemetry::init_tracing(service, telemetry)?;
    let metrics = telemetry::init_metrics()?;
    let metrics_listener = tokio::net::TcpListener::bind(server.metrics_addr)
        .await
        .map_err(|e| BootstrapError::Bind("server.metrics_addr", server.metrics_addr, e))?;
    telemetry::report_build(build);
    let lifecycle = Lifecycle::new(server, Shutdown::listen_for_signals());
    telemetry::serve_metrics(metrics_listener, metrics, build, lifecycle.readiness.clone());
    let listener = tokio::net::TcpListener::bind(server.grpc_addr)
        .await
        .map_err(|e| BootstrapError::Bind("server.grpc_addr", server.grpc_addr, e))?;
    tracing::info!(
        service,
        version = build.version,
        git_sha = build.git_sha,
        profile = build.profile,
        grpc = %server.grpc_addr,
        metrics = %server.metrics_addr,
        "listening"
    );
    Ok((guard, lifecycle, listener))
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
