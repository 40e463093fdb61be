//! A throwaway PKI for TLS tests and benchmarks: a CA and leaf
//! certificates (localhost, 127.0.0.1) in a temporary directory.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A CA, and files signed by it in `dir`: `NAME-ca.pem`, and per leaf
/// `LEAF.pem` / `LEAF.key` (valid for localhost and 127.0.0.1).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// An empty PKI in a new temporary directory (removed on drop).
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self { dir: tempfile::tempdir()? })
    }

    /// The file `name` in the PKI's directory.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// A CA named `ca`, and each of `leaves` signed by it.
    pub fn ca(&self, ca: &str, leaves: &[&str]) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(self.path(&format!("{ca}-ca.pem")), issuer.pem())?;
        for leaf in leaves {
            let key = KeyPair::generate()?;
            let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
            let cert = params.signed_by(&key, &issuer)?;
            std::fs::write(self.path(&format!("{leaf}.pem")), cert.pem())?;
            std::fs::write(self.path(&format!("{leaf}.key")), key.serialize_pem())?;
        }
        Ok(())
    }

    /// `ADSERVE_SERVER__TLS__*` for a server presenting `leaf`, requiring
    /// client certificates of CA `ca`.
    pub fn server_env(&self, leaf: &str, ca: &str) -> Vec<(String, String)> {
        let p = |n: String| self.path(&n).display().to_string();
        vec![
            ("ADSERVE_SERVER__TLS__CERT".into(), p(format!("{leaf}.pem"))),
            ("ADSERVE_SERVER__TLS__KEY".into(), p(format!("{leaf}.key"))),
            ("ADSERVE_SERVER__TLS__CLIENT_CA".into(), p(format!("{ca}-ca.pem"))),
        ]
    }

    /// A client TLS config trusting CA `ca`, presenting `leaf` if any.
    pub fn client(&self, ca: &str, leaf: Option<&str>) -> anyhow::Result<ClientTlsConfig> {
        adserve_core::tls::install_provider();
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.path(&format!("{ca}-ca.pem")))?))
            .domain_name("localhost");
        if let Some(leaf) = leaf {
            config = config.identity(Identity::from_pem(
                std::fs::read(self.path(&format!("{leaf}.pem")))?,
                std::fs::read(self.path(&format!("{leaf}.key")))?,
            ));
        }
        Ok(config)
    }
}
