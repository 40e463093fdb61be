//! TLS between services, optional by config: a gRPC listener with a
//! certificate (and, for mutual TLS, the CA whose client certificates it
//! requires), and a gRPC client that verifies its upstreams against a CA
//! (and presents a certificate of its own). Every file is read and parsed
//! when the configuration is validated, so `--check-config` and a start
//! with a wrong path or a key that is not PEM fail naming the key, not at
//! the first handshake.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::Invalid;

/// TLS on a service's gRPC listener (`server.tls`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain the server presents (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s): when set, every client must present a
    /// certificate signed by one of them (mutual TLS); a client without one
    /// is refused at the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// TLS on a service's gRPC client to its upstreams (the gateway's
/// `upstreams.tls`). Upstream URLs are then `https://`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificate(s) the upstreams' certificates must chain to.
    pub ca: PathBuf,
    /// PEM certificate chain this client presents (mutual TLS); with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The name to verify in the upstream's certificate, when it is not the
    /// URL's host (a certificate for `ranker.adserve.svc` dialled by IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// Makes ring rustls's process-wide crypto provider (the workspace's one
/// TLS provider), once, before any TLS configuration is built.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Reads `path` under config key `key`: at least one PEM certificate.
fn certificates(key: &str, path: &Path) -> Result<Vec<u8>, Invalid> {
    let bytes = std::fs::read(path).map_err(|e| Invalid::new(key, format!("{}: {e}", path.display())))?;
    let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| Invalid::new(key, format!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Invalid::new(key, format!("{}: holds no PEM certificate", path.display())));
    }
    Ok(bytes)
}

/// Reads `path` under config key `key`: a PEM private key.
fn private_key(key: &str, path: &Path) -> Result<Vec<u8>, Invalid> {
    let bytes = std::fs::read(path).map_err(|e| Invalid::new(key, format!("{}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| Invalid::new(key, format!("{}: not a PEM private key: {e}", path.display())))?;
    Ok(bytes)
}

impl ServerTls {
    /// Reads and parses every file; `prefix` is the config table (`server.tls`).
    pub fn load(&self, prefix: &str) -> Result<ServerTlsConfig, Invalid> {
        install_provider();
        let cert = certificates(&format!("{prefix}.cert"), &self.cert)?;
        let key = private_key(&format!("{prefix}.key"), &self.key)?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(certificates(&format!("{prefix}.client_ca"), ca)?));
        }
        Ok(config)
    }
}

impl ClientTls {
    /// Reads and parses every file; `prefix` is the config table.
    pub fn load(&self, prefix: &str) -> Result<ClientTlsConfig, Invalid> {
        install_provider();
        let ca = certificates(&format!("{prefix}.ca"), &self.ca)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = certificates(&format!("{prefix}.cert"), cert)?;
                let key = private_key(&format!("{prefix}.key"), key)?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) => return Err(Invalid::new(format!("{prefix}.key"), "cert is set without its key")),
            (None, Some(_)) => return Err(Invalid::new(format!("{prefix}.cert"), "key is set without its cert")),
        }
        if let Some(domain) = &self.domain {
            if domain.is_empty() {
                return Err(Invalid::new(format!("{prefix}.domain"), "must not be empty when set"));
            }
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// Checks that `url` (under config key `key`) uses the scheme `tls` calls
/// for: `https://` with TLS configured, `http://` without.
pub fn check_scheme(key: &str, url: &str, tls: bool) -> Result<(), Invalid> {
    match (url.starts_with("https://"), tls) {
        (true, true) | (false, false) => Ok(()),
        (false, true) => Err(Invalid::new(key, format!("{url:?}: TLS is configured, so the URL must be https://"))),
        (true, false) => Err(Invalid::new(key, format!("{url:?}: https:// needs the client TLS settings (a CA)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_non_pem_files_are_named_by_their_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let server = ServerTls { cert: junk.clone(), key: junk.clone(), client_ca: None };
        let err = server.load("server.tls").unwrap_err();
        assert_eq!(err.key, "server.tls.cert");
        assert!(err.why.contains("no PEM certificate"), "{}", err.why);
        let missing = ServerTls { cert: dir.path().join("nope.pem"), key: junk.clone(), client_ca: None };
        let err = missing.load("server.tls").unwrap_err();
        assert!(err.key == "server.tls.cert" && err.why.contains("nope.pem"), "{err:?}");
        let client = ClientTls { ca: junk.clone(), cert: None, key: None, domain: None };
        assert_eq!(client.load("upstreams.tls").unwrap_err().key, "upstreams.tls.ca");
    }

    #[test]
    fn urls_match_whether_tls_is_on() {
        assert!(check_scheme("k", "https://ranker:50053", true).is_ok());
        assert!(check_scheme("k", "http://ranker:50053", false).is_ok());
        assert!(check_scheme("k", "http://ranker:50053", true).unwrap_err().why.contains("must be https://"));
        assert!(check_scheme("k", "https://ranker:50053", false).unwrap_err().why.contains("needs the client TLS"));
    }
}
