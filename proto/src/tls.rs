//! TLS files of the control plane (PEM, e.g. a mounted Kubernetes Secret), read the same way by
//! the coordinator (server certificate and key, optionally the CA of client certificates) and by
//! its clients (`ferroclip-worker join`, `ferroclip status`: the CA, optionally a client
//! certificate and key for mutual TLS). Every error names the flag and the file.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that is missing, unreadable or holds nothing usable.
#[derive(Debug, thiserror::Error)]
#[error("reading {flag} {path}: {why}")]
pub struct TlsFileError {
    pub flag: &'static str,
    pub path: String,
    pub why: String,
}

/// A file's bytes, checked to hold at least one certificate.
pub fn read_certs(flag: &'static str, path: &str) -> Result<Vec<u8>, TlsFileError> {
    let err = |why: String| TlsFileError {
        flag,
        path: path.to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = certificates(&pem).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM CERTIFICATE block in the file".into()));
    }
    Ok(pem)
}

/// A file's bytes, checked to hold a private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(flag: &'static str, path: &str) -> Result<Vec<u8>, TlsFileError> {
    let err = |why: String| TlsFileError {
        flag,
        path: path.to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    private_key(&pem).map_err(|e| err(format!("no usable PEM private key: {e}")))?;
    Ok(pem)
}

/// The certificates of a PEM buffer, in order.
pub fn certificates(
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem).collect()
}

/// The first private key of a PEM buffer.
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, rustls::pki_types::pem::Error> {
    PrivateKeyDer::from_pem_slice(pem)
}

/// The client side: whom to trust, and who we are for mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM of the CA(s) the coordinator's certificate must chain to.
    pub ca: Vec<u8>,
    /// PEM certificate and key presented to a coordinator that asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// From the flags `--tls-ca FILE [--tls-cert FILE --tls-key FILE]`; `None` without `--tls-ca`.
    pub fn from_files(
        ca: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> Result<Option<Self>, TlsFileError> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read_certs("--tls-cert", c)?, read_key("--tls-key", k)?)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(TlsFileError {
                    flag: "--tls-cert",
                    path: c.to_string(),
                    why: "a client certificate needs its key (--tls-key)".into(),
                })
            }
            (None, Some(k)) => {
                return Err(TlsFileError {
                    flag: "--tls-key",
                    path: k.to_string(),
                    why: "a client key needs its certificate (--tls-cert)".into(),
                })
            }
        };
        let Some(ca) = ca else {
            if let Some((_, _)) = identity {
                return Err(TlsFileError {
                    flag: "--tls-cert",
                    path: cert.unwrap_or_default().to_string(),
                    why: "mutual TLS needs the coordinator's CA too (--tls-ca)".into(),
                });
            }
            return Ok(None);
        };
        Ok(Some(Self {
            ca: read_certs("--tls-ca", ca)?,
            identity,
        }))
    }

    pub fn config(&self) -> tonic::transport::ClientTlsConfig {
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        c
    }

    /// A rustls client config trusting only this CA (the HTTP side in tests and tools).
    pub fn rustls_config(&self) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certificates(&self.ca).map_err(|e| rustls::Error::General(e.to_string()))? {
            roots.add(c)?;
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        Ok(Arc::new(b.with_no_client_auth()))
    }
}

/// The coordinator URL as the client dials it: `https://` with TLS, `http://` without. A URL
/// without a scheme gets the right one; a scheme that contradicts the TLS flags is an error.
pub fn coordinator_url(url: &str, tls: bool) -> Result<String, String> {
    match (url.split_once("://"), tls) {
        (None, true) => Ok(format!("https://{url}")),
        (None, false) => Ok(format!("http://{url}")),
        (Some(("https", _)), true) | (Some(("http", _)), false) => Ok(url.to_string()),
        (Some(("http", rest)), true) => Ok(format!("https://{rest}")),
        (Some(("https", _)), false) => Err(format!(
            "coordinator URL {url} is https:// but no --tls-ca (FERROCLIP_TLS_CA) says whom to trust"
        )),
        (Some((scheme, _)), _) => Err(format!(
            "coordinator URL {url}: scheme {scheme:?} is neither http nor https"
        )),
    }
}

/// The coordinator URL `url` (as `coordinator_url` made it) with the port `port`: the
/// heartbeat port a Join answer names is on the host the worker reached.
pub fn with_port(url: &str, port: u32) -> Result<String, String> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e| format!("coordinator URL {url:?}: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some(scheme), Some(host)) => Ok(format!("{scheme}://{host}:{port}")),
        _ => Err(format!("coordinator URL {url:?} has no scheme or host")),
    }
}

/// A status's message followed by its causes (a TLS refusal is in the causes: "invalid peer
/// certificate: certificate expired …", "… not valid for name …", "UnknownIssuer").
pub fn describe(status: &tonic::Status) -> String {
    let mut out = status.message().to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Whether a failed call failed in the TLS handshake over the server's certificate (retrying
/// cannot help; the message says why).
pub fn is_certificate_error(described: &str) -> bool {
    described.contains("invalid peer certificate")
        || described.contains("peer sent no certificates")
        || described.contains("CertificateRequired")
        || described.contains("UnknownCA")
        || described.contains("BadCertificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_tls_flags() {
        assert_eq!(coordinator_url("h:1", true).unwrap(), "https://h:1");
        assert_eq!(coordinator_url("http://h:1", true).unwrap(), "https://h:1");
        assert_eq!(coordinator_url("http://h:1", false).unwrap(), "http://h:1");
        assert!(coordinator_url("https://h:1", false).is_err());
        assert!(coordinator_url("ftp://h:1", false).is_err());
    }

    #[test]
    fn the_heartbeat_port_is_on_the_host_the_worker_reached() {
        let cases = [
            ("http://coordinator:50051", "http://coordinator:50052"),
            ("https://c.example.org:443/", "https://c.example.org:50052"),
            ("http://10.0.0.1", "http://10.0.0.1:50052"),
            ("http://[fd00::1]:50051", "http://[fd00::1]:50052"),
        ];
        for (url, want) in cases {
            assert_eq!(with_port(url, 50052).unwrap(), want, "{url}");
        }
        assert!(with_port("coordinator:50051", 1).is_err());
    }

    #[test]
    fn missing_files_are_named() {
        let e = ClientTls::from_files(Some("/nonexistent/ca.pem"), None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("reading --tls-ca /nonexistent/ca.pem: "),
            "{e}"
        );
        let e = ClientTls::from_files(Some("/x"), Some("/c.pem"), None).unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");
    }
}
