//! The coordinator's TLS: one certificate and key (PEM files, e.g. a Kubernetes Secret) for the
//! gRPC port (tonic's rustls acceptor) and the HTTP port (tokio-rustls in front of axum), both on
//! rustls' ring provider. With a client CA, gRPC clients must present a certificate it signed
//! (mutual TLS for workers); the HTTP port never asks for one (Prometheus, browsers).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferroclip_proto::tls::{certificates, private_key, read_certs, read_key, TlsFileError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take over its TLS handshake on the HTTP port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's certificate chain and key, and the CA of client certificates (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From `--tls-cert`, `--tls-key` and `--tls-client-ca`, each file checked and named on error.
    pub fn from_files(
        cert: &str,
        key: &str,
        client_ca: Option<&str>,
    ) -> Result<Self, TlsFileError> {
        let s = Self {
            cert: read_certs("--tls-cert", cert)?,
            key: read_key("--tls-key", key)?,
            client_ca: client_ca
                .map(|p| read_certs("--tls-client-ca", p))
                .transpose()?,
        };
        // The pair must match: found now rather than at the first handshake.
        s.rustls_config().map_err(|e| TlsFileError {
            flag: "--tls-key",
            path: key.to_string(),
            why: format!("does not fit the certificate {cert}: {e}"),
        })?;
        Ok(s)
    }

    /// tonic's configuration for the gRPC port.
    pub fn grpc_config(&self) -> tonic::transport::ServerTlsConfig {
        let mut c = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key));
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        c
    }

    /// The HTTP port's rustls configuration (no client certificates; HTTP/1.1).
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let certs = certificates(&self.cert).map_err(|e| rustls::Error::General(e.to_string()))?;
        let key = private_key(&self.key).map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// A TLS listener for `axum::serve`: accepts TCP, runs each handshake on its own task (a slow
/// or plaintext client holds up nobody), and yields the connections that completed one.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    _accept: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("HTTP accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "HTTP TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "HTTP TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            local,
            ready,
            _accept: accept,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self._accept.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when aborted (on drop): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
