//! `ferroclip coordinator`: serve one run until it finishes (or forever, for dashboards).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use ferroclip_proto::config::RunConfig;

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// The run configuration (run.toml).
    #[arg(long)]
    pub config: String,
    /// gRPC listen address for workers.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (probes, /metrics, dashboard).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Heartbeat listen address: Heartbeat served on a thread of its own, so a beat is not
    /// queued behind a step's reports (Join answers name the port). Default: the gRPC
    /// address's IP and any free port; set it where a Service must expose the port.
    #[arg(long)]
    pub heartbeat_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub viewer: ViewerArgs,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Journal directory URL (default: <run.dir>/journal).
    #[arg(long)]
    pub journal: Option<String>,
    /// Start the run over even if the journal holds one. Without it, an existing journal of the
    /// same run (name, seed, dataset) is resumed: a coordinator restarted with the same
    /// arguments (a Kubernetes pod restart) continues the run unattended.
    #[arg(long)]
    pub fresh: bool,
    /// Accepted for compatibility: resuming an existing journal is the default.
    #[arg(long, hide = true)]
    pub resume: bool,
    /// Exit once the run is finished (default: keep serving the dashboard).
    #[arg(long)]
    pub exit_when_done: bool,
    #[command(flatten)]
    pub store: ferroclip_shards::StoreArgs,
}

/// The run token: a shared secret every RPC and page must present.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// File holding the run token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "FERROCLIP_TOKEN_FILE")]
    pub token_file: Option<String>,
    /// The run token itself (prefer --token-file; visible in process lists).
    #[arg(long, env = "FERROCLIP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The read-only viewer token: the dashboard, /metrics, /api/status and `ferroclip status`.
#[derive(Args, Debug, Clone)]
pub struct ViewerArgs {
    /// File holding the viewer token (without one, the worker token grants viewing too).
    #[arg(long, env = "FERROCLIP_VIEWER_TOKEN_FILE")]
    pub viewer_token_file: Option<String>,
    /// The viewer token itself (prefer --viewer-token-file).
    #[arg(long, env = "FERROCLIP_VIEWER_TOKEN", hide_env_values = true)]
    pub viewer_token: Option<String>,
}

impl ViewerArgs {
    pub fn resolve(&self, worker_token: &str) -> Result<Option<String>> {
        if self.viewer_token_file.is_none() && self.viewer_token.is_none() {
            return Ok(None);
        }
        let t = ferroclip_proto::token::resolve(
            self.viewer_token_file.as_deref(),
            self.viewer_token.as_deref(),
        )
        .context("the viewer token")?;
        if t == worker_token {
            anyhow::bail!("the viewer token must differ from the worker token (it is read-only)");
        }
        Ok(Some(t))
    }
}

/// The coordinator's TLS files (e.g. a mounted Kubernetes Secret of type kubernetes.io/tls).
#[derive(Args, Debug, Clone)]
pub struct ServerTlsArgs {
    /// PEM certificate (chain) of both ports; without it they serve plaintext.
    #[arg(long, env = "FERROCLIP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FERROCLIP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// Mutual TLS: gRPC clients must present a certificate signed by this CA (PEM).
    #[arg(long, env = "FERROCLIP_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<String>,
}

impl ServerTlsArgs {
    pub fn load(&self) -> Result<Option<ferroclip_coordinator::tls::ServerTls>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some(ferroclip_coordinator::tls::ServerTls::from_files(
                c,
                k,
                self.tls_client_ca.as_deref(),
            )?)),
            _ => Ok(None),
        }
    }
}

impl TokenArgs {
    pub fn resolve(&self) -> Result<String> {
        Ok(ferroclip_proto::token::resolve(
            self.token_file.as_deref(),
            self.token.as_deref(),
        )?)
    }
}

/// Serves the run; returns the process's exit code. A signal before the run has finished
/// exits 128 + signal (143 for SIGTERM), as a supervisor expects of work that was stopped, not
/// done: a Job replaces the pod (and the new coordinator resumes from the journal) instead of
/// counting the run's coordinator as succeeded.
pub async fn run(args: CoordinatorArgs) -> Result<u8> {
    let config = RunConfig::load(&args.config)?;
    let token = args.token.resolve()?;
    let viewer_token = args.viewer.resolve(&token)?;
    let tls = args.tls.load()?;
    let handle = ferroclip_coordinator::serve(ferroclip_coordinator::ServeOptions {
        config,
        grpc_addr: args.grpc_addr,
        http_addr: Some(args.http_addr),
        heartbeat_addr: args.heartbeat_addr,
        token,
        viewer_token,
        tls,
        journal: args.journal,
        fresh: args.fresh,
        store: args.store.options(),
    })
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = tokio::select! {
        _ = handle.finished(), if args.exit_when_done => {
            tracing::info!("run finished");
            None
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: journaling and exiting");
            Some(2)
        }
        _ = term.recv() => {
            tracing::info!("SIGTERM: journaling and exiting");
            Some(15)
        }
        why = handle.fatal() => {
            // Another coordinator holds the journal now (or its store stayed down): this one
            // must not acknowledge anything more, nor write the journal on its way out.
            anyhow::bail!("stopping: {why}");
        }
        _ = std::future::pending::<()>(), if !args.exit_when_done => None,
    };
    let done = handle.is_finished().await;
    handle.shutdown().await;
    Ok(match signal {
        Some(sig) if !done => 128 + sig,
        _ => 0,
    })
}
