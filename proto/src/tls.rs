//! TLS for the gRPC connections (tonic over rustls): the coordinator's certificate, and
//! optionally mutual TLS, where every client must present a certificate signed by a given CA.
//!
//! TLS covers the control plane: the job token, the session secrets, rewards and status. The
//! c10d store and the collectives between workers (Gloo, NCCL, HCCL) are not covered by it;
//! they belong on the cluster's private network, and the store binds only `MASTER_ADDR`'s
//! interface.
//!
//! Files are PEM, as `openssl` and cert-manager write them. Cost: one handshake per
//! connection (each process keeps one), then symmetric encryption of messages of a few kB.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{what} {}: {source}", path.display())]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file that is not PEM of the expected kind.
    #[error("{what} {}: {message}", path.display())]
    Pem {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A certificate without its key, or the other way round.
    #[error("{0}")]
    Incomplete(String),
    /// tonic refused the configuration.
    #[error("TLS: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Reads a PEM file that must hold `marker` (`CERTIFICATE`, `PRIVATE KEY`).
fn pem(what: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(marker) {
        return Err(TlsError::Pem {
            what,
            path: path.to_path_buf(),
            message: format!("not a PEM file holding a {marker}"),
        });
    }
    Ok(bytes)
}

fn identity(
    what: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<Identity>, TlsError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => Ok(Some(Identity::from_pem(
            pem("certificate", c, "CERTIFICATE")?,
            pem("private key", k, "PRIVATE KEY")?,
        ))),
        _ => Err(TlsError::Incomplete(format!("{what} needs both a certificate and its key"))),
    }
}

/// The coordinator's TLS: its certificate and key, and with `client_ca` mutual TLS.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServerTls {
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long = "tls-cert", env = "DANCEGRPO_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long = "tls-key", env = "DANCEGRPO_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// Mutual TLS: every client (workers, the CLI) must present a certificate signed by this
    /// CA (PEM).
    #[arg(long = "tls-client-ca", env = "DANCEGRPO_TLS_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The tonic configuration, or `None` for plaintext.
    pub fn config(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let Some(id) = identity("--tls-cert/--tls-key", self.cert.as_deref(), self.key.as_deref())?
        else {
            if self.client_ca.is_some() {
                return Err(TlsError::Incomplete(
                    "--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let mut cfg = ServerTlsConfig::new().identity(id);
        if let Some(ca) = &self.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(pem("client CA", ca, "CERTIFICATE")?));
        }
        Ok(Some(cfg))
    }
}

/// A client's TLS (workers and the CLI): the CA that signed the coordinator's certificate,
/// the client's own certificate for mutual TLS, and the name to verify.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientTls {
    /// Connect over TLS, trusting the coordinator's certificate if this CA (PEM) signed it.
    #[arg(long = "tls-ca", env = "DANCEGRPO_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (PEM); needs --tls-client-key.
    #[arg(long = "tls-client-cert", env = "DANCEGRPO_TLS_CLIENT_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key of --tls-client-cert (PEM).
    #[arg(long = "tls-client-key", env = "DANCEGRPO_TLS_CLIENT_KEY")]
    pub key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry, when it is not the host dialed.
    #[arg(long = "tls-domain", env = "DANCEGRPO_TLS_DOMAIN")]
    pub domain: Option<String>,
}

impl ClientTls {
    /// Whether TLS is on: a CA is given.
    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }

    /// `uri` with the scheme TLS needs (`https`) or plaintext (`http`): tonic speaks TLS only
    /// to `https` URIs, and users give `http://` or a bare `host:port`.
    pub fn uri(&self, addr: &str) -> String {
        let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
        format!("{}://{rest}", if self.enabled() { "https" } else { "http" })
    }

    /// Applies the configuration to `endpoint`.
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, TlsError> {
        let Some(ca) = &self.ca else {
            if self.cert.is_some() || self.key.is_some() || self.domain.is_some() {
                return Err(TlsError::Incomplete(
                    "a client certificate or --tls-domain needs --tls-ca, the CA that signed \
                     the coordinator's certificate"
                        .into(),
                ));
            }
            return Ok(endpoint);
        };
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(
            "CA",
            ca,
            "CERTIFICATE",
        )?));
        if let Some(id) = identity(
            "--tls-client-cert/--tls-client-key",
            self.cert.as_deref(),
            self.key.as_deref(),
        )? {
            cfg = cfg.identity(id);
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(endpoint.tls_config(cfg)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_unless_a_ca_is_given_and_half_configurations_are_refused() {
        let none = ClientTls::default();
        assert_eq!(none.uri("http://10.0.0.1:29500"), "http://10.0.0.1:29500");
        assert_eq!(none.uri("10.0.0.1:29500"), "http://10.0.0.1:29500");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap();
        let on = ClientTls { ca: Some(ca.clone()), ..Default::default() };
        assert_eq!(on.uri("http://10.0.0.1:29500"), "https://10.0.0.1:29500");

        let half = ClientTls { cert: Some(ca.clone()), ..Default::default() };
        let e = half.apply(Endpoint::from_static("http://x")).unwrap_err();
        assert!(e.to_string().contains("needs --tls-ca"), "{e}");
        let e = ServerTls { cert: Some(ca.clone()), ..Default::default() }.config().unwrap_err();
        assert!(e.to_string().contains("needs both a certificate and its key"), "{e}");
        let e =
            ServerTls { client_ca: Some(ca.clone()), ..Default::default() }.config().unwrap_err();
        assert!(e.to_string().contains("needs the server's own --tls-cert"), "{e}");
        let e = ServerTls { cert: Some(ca.clone()), key: Some(ca), client_ca: None }
            .config()
            .unwrap_err();
        assert!(e.to_string().contains("not a PEM file holding a PRIVATE KEY"), "{e}");
        let missing = ClientTls { ca: Some(dir.path().join("nope.pem")), ..Default::default() };
        let e = missing.apply(Endpoint::from_static("https://x")).unwrap_err();
        assert!(e.to_string().starts_with("CA ") && e.to_string().contains("nope.pem"), "{e}");
        assert!(ServerTls::default().config().unwrap().is_none());
    }
}
