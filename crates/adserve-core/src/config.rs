//! Layered configuration: built-in defaults < TOML file < `ADSERVE_*` env.
//!
//! The TOML file is named by `ADSERVE_CONFIG`; nested keys in the environment
//! use a double underscore, e.g. `ADSERVE_SERVER__GRPC_ADDR=0.0.0.0:50051`.

use std::{net::SocketAddr, path::Path};

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
    Invalid(String),
}

/// Checks a parsed configuration; the error names the offending key.
pub trait Validate {
    /// Returns `Err("key: why")` for the first problem found.
    fn validate(&self) -> Result<(), String>;
}

/// Loads `T` from defaults, the optional TOML file in `ADSERVE_CONFIG`, and
/// `ADSERVE_*` variables, then validates it.
pub fn load_config<T>() -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    let file = std::env::var("ADSERVE_CONFIG").ok();
    load_config_from(file.as_deref(), Env::prefixed("ADSERVE_").split("__").ignore(&["config"]))
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
    config.validate().map_err(ConfigError::Invalid)?;
    Ok(config)
}

/// Listening addresses and shutdown behaviour, common to every service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Prometheus `/metrics` listen address.
    pub metrics_addr: SocketAddr,
    /// After SIGTERM, how long listeners keep accepting once health went
    /// NOT_SERVING, so load balancers stop routing here before it closes.
    pub readiness_drain_ms: u64,
    /// How long in-flight requests may take to finish once listeners closed.
    pub shutdown_grace_ms: u64,
}

impl ServerConfig {
    /// Defaults for a service on the given gRPC and metrics ports.
    pub fn on_ports(grpc: u16, metrics: u16) -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], metrics)),
            readiness_drain_ms: 0,
            shutdown_grace_ms: 10_000,
        }
    }

    /// Validation shared by every service.
    pub fn validate(&self) -> Result<(), String> {
        if self.shutdown_grace_ms == 0 || self.shutdown_grace_ms > 300_000 {
            return Err("server.shutdown_grace_ms: must be in 1..=300000".into());
        }
        if self.readiness_drain_ms > 300_000 {
            return Err("server.readiness_drain_ms: must be in 0..=300000".into());
        }
        if self.grpc_addr.port() != 0 && self.grpc_addr == self.metrics_addr {
            return Err("server.metrics_addr: must differ from server.grpc_addr".into());
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
#[serde(default)]
pub struct TelemetryConfig {
    /// `tracing` filter directive, e.g. "info,adserve_ranker=debug".
    pub log_filter: String,
    /// Log as JSON lines (true) or human-readable text (false).
    pub log_json: bool,
    /// OTLP gRPC endpoint (e.g. "http://127.0.0.1:4317"); empty disables export.
    pub otlp_endpoint: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_filter: "info".into(), log_json: true, otlp_endpoint: String::new() }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Demo {
        server: ServerConfig,
        name: String,
    }

    impl Validate for Demo {
        fn validate(&self) -> Result<(), String> {
            self.server.validate()?;
            if self.name.len() > 5 {
                return Err("name: at most 5 characters".into());
            }
            Ok(())
        }
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "name = \"file\"\n[server]\nshutdown_grace_ms = 5\n")?;
            jail.set_env("ADSERVE_NAME", "env");
            let c: Demo = load_config_from(Some("c.toml"), Env::prefixed("ADSERVE_").split("__")).expect("loads");
            assert_eq!(c.name, "env");
            assert_eq!(c.server.shutdown_grace_ms, 5);
            assert_eq!(c.server.grpc_addr.port(), 0);
            Ok(())
        });
    }

    #[test]
    fn invalid_values_are_rejected_naming_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ADSERVE_SERVER__SHUTDOWN_GRACE_MS", "0");
            let err = load_config_from::<Demo>(None, Env::prefixed("ADSERVE_").split("__")).unwrap_err();
            assert!(err.to_string().contains("server.shutdown_grace_ms"), "{err}");
            jail.set_env("ADSERVE_SERVER__SHUTDOWN_GRACE_MS", "not-a-number");
            let err = load_config_from::<Demo>(None, Env::prefixed("ADSERVE_").split("__")).unwrap_err();
            assert!(err.to_string().to_lowercase().contains("server.shutdown_grace_ms"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = load_config_from::<Demo>(Some("/nonexistent/adserve.toml"), Env::prefixed("X_")).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }
}
