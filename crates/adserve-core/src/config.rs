//! Layered configuration: built-in defaults < TOML file < `ADSERVE_*` env.
//!
//! The TOML file is named by `ADSERVE_CONFIG`; nested keys in the environment
//! use a double underscore, e.g. `ADSERVE_SERVER__GRPC_ADDR=0.0.0.0:50051`.
//!
//! Strict: every config struct denies unknown keys, so a misspelt key (in the
//! file, or `ADSERVE_KAFKA_BROKERS` with one underscore) stops the service at
//! start with the key named instead of silently using a default. The
//! `ADSERVE_` prefix therefore belongs to service configuration alone; the
//! local-stack scripts use `ADSTACK_`. Durations are humantime strings
//! (`"250ms"`, `"30s"`, `"30m"`).

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be parsed; figment's message names the key and source.
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// The file named by ADSERVE_CONFIG does not exist.
    #[error("config file {0} (from ADSERVE_CONFIG) does not exist")]
    MissingFile(String),
    /// Values parsed but are inconsistent or out of range.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Invalid),
}

/// A configuration value that parsed but is out of range or inconsistent
/// with another: the key (dotted, as in the TOML file) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {why}")]
pub struct Invalid {
    /// Dotted key, e.g. `server.shutdown_grace`.
    pub key: String,
    /// What is wrong with its value.
    pub why: String,
}

impl Invalid {
    /// `key` is invalid because `why`.
    pub fn new(key: impl Into<String>, why: impl Into<String>) -> Self {
        Self { key: key.into(), why: why.into() }
    }

    /// The same problem, for a config table nested under `table` (a shared
    /// section such as `kafka` inside `aggregates`).
    pub fn within(self, table: &str) -> Self {
        Self { key: format!("{table}.{}", self.key), why: self.why }
    }
}

/// Fails with `key` unless `value` lies in `min..=max`.
pub fn check_duration(key: &str, value: Duration, min: Duration, max: Duration) -> Result<(), Invalid> {
    if value < min || value > max {
        return Err(Invalid::new(
            key,
            format!(
                "must be in {}..={}, got {}",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

/// Fails with `key` unless `value` lies in `range`.
pub fn check_range<N>(key: &str, value: N, range: std::ops::RangeInclusive<N>) -> Result<(), Invalid>
where
    N: PartialOrd + std::fmt::Display,
{
    if !range.contains(&value) {
        return Err(Invalid::new(key, format!("must be in {}..={}, got {value}", range.start(), range.end())));
    }
    Ok(())
}

/// Checks a parsed configuration; the error names the offending key.
pub trait Validate {
    /// The first problem found.
    fn validate(&self) -> Result<(), Invalid>;
}

/// Loads `T` from defaults, the optional TOML file in `ADSERVE_CONFIG`, and
/// `ADSERVE_*` variables, then validates it.
///
/// Started with `--check-config` (the only argument a service takes), the
/// process stops here: it exits 0 when the configuration is valid, or prints
/// the problem (naming the key) and exits 1, without binding a port or
/// touching a dependency. It does not print the configuration (it holds
/// credentials). Use it to check a config file, e.g. one rendered by the
/// Helm chart, before a rollout.
pub fn load_config<T>() -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    let file = std::env::var("ADSERVE_CONFIG").ok();
    let loaded = load_config_from(file.as_deref(), Env::prefixed("ADSERVE_").split("__").ignore(&["config"]));
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => loaded,
        [flag] if flag == "--check-config" => match loaded {
            Ok(_) => {
                eprintln!("config ok ({})", file.as_deref().unwrap_or("defaults and ADSERVE_* variables"));
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("config error: {e}");
                std::process::exit(1)
            }
        },
        other => {
            eprintln!("usage: {} [--check-config]; got {other:?}", std::env::args().next().unwrap_or_default());
            std::process::exit(2)
        }
    }
}

fn load_config_from<T>(file: Option<&str>, env: Env) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file.filter(|p| !p.is_empty()) {
        if !Path::new(path).exists() {
            return Err(ConfigError::MissingFile(path.to_string()));
        }
        figment = figment.merge(Toml::file(path));
    }
    let config: T = figment.merge(env).extract().map_err(Box::new)?;
    config.validate()?;
    Ok(config)
}

/// Listening addresses and shutdown behaviour, common to every service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Prometheus `/metrics` listen address.
    pub metrics_addr: SocketAddr,
    /// After SIGTERM, how long listeners keep accepting once health went
    /// NOT_SERVING, so load balancers stop routing here before it closes.
    #[serde(with = "humantime_serde")]
    pub readiness_drain: Duration,
    /// How long in-flight requests may take to finish once listeners closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most requests in flight per listener; beyond it requests are shed at
    /// once (gRPC RESOURCE_EXHAUSTED, HTTP 503) rather than queued. Health
    /// checks are never shed.
    pub max_concurrent_requests: usize,
    /// Longest any request may run, whatever deadline its caller sent (a
    /// shorter gRPC deadline is honoured).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest an HTTP/1 client may take to send a request's headers, from
    /// the moment the connection is ready for them; slower (a trickling
    /// slowloris client, a connection that sends nothing, one idle between
    /// requests) and the connection is closed. gRPC listeners are
    /// HTTP/2 and bound by their keep-alive PINGs instead.
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// Serve gRPC server reflection (v1), for `grpcurl list` and friends.
    /// On for the local stack; the Helm chart turns it off (it hands anyone
    /// who can reach the port the whole API surface).
    pub reflection: bool,
    /// TLS on the gRPC listener (mutual TLS with `client_ca`); absent:
    /// plaintext, as on the local stack. The metrics/health HTTP listener
    /// stays plaintext (scraped and probed inside the pod's network).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::ServerTls>,
}

impl ServerConfig {
    /// Defaults for a service on the given gRPC and metrics ports.
    pub fn on_ports(grpc: u16, metrics: u16) -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], metrics)),
            readiness_drain: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(30),
            http_header_timeout: Duration::from_secs(10),
            reflection: true,
            tls: None,
        }
    }

    /// Validation shared by every service.
    pub fn validate(&self) -> Result<(), Invalid> {
        let five_min = Duration::from_secs(300);
        check_duration("server.shutdown_grace", self.shutdown_grace, Duration::from_millis(1), five_min)?;
        check_duration("server.readiness_drain", self.readiness_drain, Duration::ZERO, five_min)?;
        check_duration("server.request_timeout", self.request_timeout, Duration::from_millis(1), five_min)?;
        check_duration("server.http_header_timeout", self.http_header_timeout, Duration::from_millis(10), five_min)?;
        check_range("server.max_concurrent_requests", self.max_concurrent_requests, 1..=1_000_000)?;
        if self.grpc_addr.port() != 0 && self.grpc_addr == self.metrics_addr {
            return Err(Invalid::new("server.metrics_addr", "must differ from server.grpc_addr"));
        }
        if let Some(tls) = &self.tls {
            tls.load("server.tls")?;
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::on_ports(0, 0)
    }
}

/// Logging and trace export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directive, e.g. "info,adserve_ranker=debug".
    pub log_filter: String,
    /// Log as JSON lines (true) or human-readable text (false).
    pub log_json: bool,
    /// OTLP gRPC endpoint (e.g. "http://127.0.0.1:4317"); empty disables export.
    pub otlp_endpoint: String,
    /// Share of requests traced when the caller sent no sampling decision,
    /// `[0, 1]`. A caller's sampled `traceparent` is always followed, so one
    /// trace is never cut in half between services.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        // ONNX Runtime logs every allocation at info (the ranker); keep it to warnings.
        Self {
            log_filter: "info,ort=warn".into(),
            log_json: true,
            otlp_endpoint: String::new(),
            trace_sample_ratio: 0.05,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        server: ServerConfig,
        name: String,
    }

    impl Validate for Demo {
        fn validate(&self) -> Result<(), Invalid> {
            self.server.validate()?;
            if self.name.len() > 5 {
                return Err(Invalid::new("name", "at most 5 characters"));
            }
            Ok(())
        }
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "name = \"file\"\n[server]\nshutdown_grace = \"5ms\"\n")?;
            jail.set_env("ADSERVE_NAME", "env");
            let c: Demo = load_config_from(Some("c.toml"), Env::prefixed("ADSERVE_").split("__")).expect("loads");
            assert_eq!(c.name, "env");
            assert_eq!(c.server.shutdown_grace, Duration::from_millis(5));
            assert_eq!(c.server.grpc_addr.port(), 0);
            Ok(())
        });
    }

    #[test]
    fn invalid_values_are_rejected_naming_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ADSERVE_SERVER__SHUTDOWN_GRACE", "0s");
            let err = load_config_from::<Demo>(None, Env::prefixed("ADSERVE_").split("__")).unwrap_err();
            match &err {
                ConfigError::Invalid(invalid) => assert_eq!(invalid.key, "server.shutdown_grace"),
                other => panic!("expected Invalid, got {other}"),
            }
            jail.set_env("ADSERVE_SERVER__SHUTDOWN_GRACE", "ten seconds");
            let err = load_config_from::<Demo>(None, Env::prefixed("ADSERVE_").split("__")).unwrap_err();
            assert!(err.to_string().to_lowercase().contains("server.shutdown_grace"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_misspelt_key_stops_loading_and_is_named() {
        figment::Jail::expect_with(|jail| {
            // One underscore instead of two: `server_grpc_addr`, not `server.grpc_addr`.
            jail.set_env("ADSERVE_SERVER_GRPC_ADDR", "0.0.0.0:1");
            let err = load_config_from::<Demo>(None, Env::prefixed("ADSERVE_").split("__")).unwrap_err();
            assert!(err.to_string().contains("server_grpc_addr"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[server]\nshutdown_grace_ms = 5\n")?;
            let err = load_config_from::<Demo>(Some("c.toml"), Env::prefixed("ADSERVE_").split("__")).unwrap_err();
            assert!(err.to_string().contains("shutdown_grace_ms"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn durations_are_humantime_strings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ADSERVE_SERVER__READINESS_DRAIN", "1m 30s");
            let c: Demo = load_config_from(None, Env::prefixed("ADSERVE_").split("__")).expect("loads");
            assert_eq!(c.server.readiness_drain, Duration::from_secs(90));
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = load_config_from::<Demo>(Some("/nonexistent/adserve.toml"), Env::prefixed("X_")).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }
}
