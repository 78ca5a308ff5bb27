//! `ferroclip coordinator`: serve one run until it finishes (or forever, for dashboards).

use std::net::SocketAddr;

use anyhow::Result;
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
    #[command(flatten)]
    pub token: TokenArgs,
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
    let handle = ferroclip_coordinator::serve(ferroclip_coordinator::ServeOptions {
        config,
        grpc_addr: args.grpc_addr,
        http_addr: Some(args.http_addr),
        token: args.token.resolve()?,
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
