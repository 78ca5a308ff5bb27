//! `ferroclip-worker join …`: flags of the distributed worker.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::JoinOptions;

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Coordinator gRPC URL, e.g. http://ferroclip-coordinator:50051.
    #[arg(long)]
    pub coordinator: String,
    /// File holding the run token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "FERROCLIP_TOKEN_FILE")]
    pub token_file: Option<String>,
    /// The run token itself (prefer --token-file).
    #[arg(long, env = "FERROCLIP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA the coordinator's certificate must chain to; turns TLS on (https://).
    #[arg(long, env = "FERROCLIP_TLS_CA")]
    pub tls_ca: Option<String>,
    /// This worker's certificate (PEM) for a coordinator that wants mutual TLS.
    #[arg(long, env = "FERROCLIP_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// Key of --tls-cert (PEM).
    #[arg(long, env = "FERROCLIP_TLS_KEY")]
    pub tls_key: Option<String>,
    /// "cpu", "cuda" (GPU $LOCAL_RANK) or "cuda:N".
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Port peers connect to for the collective ring (0 = any free port).
    #[arg(long, default_value_t = 0)]
    pub collective_port: u16,
    /// Host peers use to reach this worker (default: $POD_IP, else this host's name).
    #[arg(long, env = "POD_IP")]
    pub advertise_host: Option<String>,
    /// Stable id of this worker process (default: host-pid).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    #[command(flatten)]
    pub store: ferroclip_shards::StoreArgs,
}

pub fn run(args: JoinArgs) -> Result<()> {
    let token = ferroclip_proto::token::resolve(args.token_file.as_deref(), args.token.as_deref())?;
    let tls = ferroclip_proto::tls::ClientTls::from_files(
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    let device = crate::device::select(&args.device)?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n.max(1));
    }
    let host = super::hostname();
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook_flag(&stop)?;
    super::run(JoinOptions {
        coordinator: args.coordinator,
        token,
        tls,
        worker_id: args
            .worker_id
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        device,
        device_name: args.device,
        collective_port: args.collective_port,
        advertise_host: args.advertise_host.unwrap_or(host),
        store: args.store.options(),
        stop,
    })
}

/// SIGTERM sets `stop`: the worker finishes or abandons its step, leaves, and exits 0.
fn signal_hook_flag(stop: &Arc<AtomicBool>) -> Result<()> {
    let flag = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                    tracing::info!("SIGTERM: leaving the run after this step");
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })?;
    Ok(())
}
