//! `ferroclip status`: a running coordinator's summary in the terminal.

use anyhow::{Context, Result};
use clap::Args;
use ferroclip_proto::tls::{coordinator_url, describe, ClientTls};
use ferroclip_proto::v1::{coordinator_client::CoordinatorClient, StatusRequest};
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use crate::coordinator::TokenArgs;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Coordinator gRPC URL, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub coordinator: String,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// A client's TLS flags: whom to trust, and who we are when the coordinator wants mutual TLS.
#[derive(Args, Debug, Clone)]
pub struct ClientTlsArgs {
    /// PEM CA the coordinator's certificate must chain to; turns TLS on (https://).
    #[arg(long, env = "FERROCLIP_TLS_CA")]
    pub tls_ca: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "FERROCLIP_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// Key of --tls-cert (PEM).
    #[arg(long, env = "FERROCLIP_TLS_KEY")]
    pub tls_key: Option<String>,
}

impl ClientTlsArgs {
    pub fn load(&self) -> Result<Option<ClientTls>> {
        Ok(ClientTls::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )?)
    }
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let token = args.token.resolve()?;
    let tls = args.tls.load()?;
    let url = coordinator_url(&args.coordinator, tls.is_some()).map_err(anyhow::Error::msg)?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("coordinator URL {url:?}"))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30));
    if let Some(tls) = &tls {
        endpoint = endpoint
            .tls_config(tls.config())
            .context("the client's TLS configuration")?;
    }
    let mut client = CoordinatorClient::new(endpoint.connect_lazy());
    let mut req = tonic::Request::new(StatusRequest {});
    req.metadata_mut().insert(
        ferroclip_proto::AUTH_HEADER,
        MetadataValue::try_from(format!("Bearer {token}"))
            .context("run token has invalid characters")?,
    );
    let s = client
        .status(req)
        .await
        .map_err(|e| {
            let mut why = describe(&e);
            let refused = matches!(
                e.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            );
            if tls.is_none() && !refused {
                why.push_str(" (if the coordinator serves TLS, pass --tls-ca)");
            }
            anyhow::anyhow!("status from {url}: {why}")
        })?
        .into_inner();
    println!(
        "state {}  step {}  epoch {} ({:.0}%)  generation {}  workers {}",
        s.state,
        s.step,
        s.epoch,
        s.epoch_progress * 100.0,
        s.generation,
        s.workers.len()
    );
    for m in &s.metrics {
        println!("  {:<28} {:.5}", m.name, m.value);
    }
    println!(
        "  {:>4}  {:<20} {:<16} {:<8} {:>9} {:>10} {:>11} {:>11}",
        "rank", "worker", "host", "device", "heartbeat", "step_s", "data_wait_s", "allreduce_s"
    );
    for w in &s.workers {
        println!(
            "  {:>4}  {:<20} {:<16} {:<8} {:>8.1}s {:>10.3} {:>11.3} {:>11.3}",
            w.rank,
            w.worker_id,
            w.host,
            w.device,
            w.seconds_since_heartbeat,
            w.step_time_s,
            w.data_wait_s,
            w.allreduce_s
        );
    }
    if !s.last_checkpoint.is_empty() {
        println!("last checkpoint: {}", s.last_checkpoint);
    }
    Ok(())
}
