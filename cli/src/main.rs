//! `ferroclip`: the control plane and data tools. Never links libtorch.

mod bench;
mod certs;
mod coordinator;
mod k8s;
mod status;
mod train;

use anyhow::Result;
use std::process::ExitCode;

// See Cargo.toml: mimalloc keeps freed image buffers for reuse instead of unmapping them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferroclip",
    version,
    about = "Multimodal pretraining control plane and data tools"
)]
struct Cli {
    #[command(flatten)]
    log: ferroclip_telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, inspect, verify and preview dataset shards.
    Shards(ferroclip_shards::cli::ShardsArgs),
    /// Serve one run: membership, data plan, step commits, checkpoints, metrics.
    Coordinator(coordinator::CoordinatorArgs),
    /// Train on this machine: an in-process coordinator plus N worker processes.
    Train(train::TrainArgs),
    /// Summary of a running coordinator.
    Status(status::StatusArgs),
    /// Load generators: `bench coordinator` drives a real coordinator with simulated workers.
    Bench(bench::BenchArgs),
    /// A self-signed CA and the coordinator's and workers' TLS certificates.
    Certs(certs::CertsArgs),
    /// Kubernetes manifests for a run.
    K8s(k8s::K8sArgs),
    /// Check a run configuration file and print it with every default filled in.
    Config {
        /// Path to run.toml.
        file: String,
    },
}

/// Exit codes: 0 done, 1 failed, 2 a usage or config error (retrying cannot help; a Job's
/// podFailurePolicy fails at once on it), 128 + n stopped by signal n before the work was done.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    // The coordinator's step path yields to its heartbeat thread (`liveness`); the load
    // generator's simulated workers to theirs. Only the runtime's own threads are lowered:
    // the main thread (which starts the benchmark's coordinator process) keeps its priority.
    if matches!(cli.command, Command::Coordinator(_) | Command::Bench(_)) {
        rt.on_thread_start(ferroclip_coordinator::liveness::yield_to_heartbeats);
    }
    let result = match rt.build() {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the async runtime")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("Error: {e:?}");
            let usage = e
                .chain()
                .any(|c| c.is::<ferroclip_proto::config::ConfigError>());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let service = match cli.command {
        Command::Coordinator(_) => "ferroclip-coordinator",
        _ => "ferroclip",
    };
    // Held to the end of main: dropping it flushes spans still queued for OTLP.
    let _telemetry = ferroclip_telemetry::init(service, cli.log.log_format)?;
    match cli.command {
        Command::Shards(args) => ferroclip_shards::cli::run(args).await?,
        Command::Coordinator(args) => return coordinator::run(args).await,
        Command::Train(args) => train::run(args).await?,
        Command::Status(args) => status::run(args).await?,
        Command::Certs(args) => certs::run(args)?,
        Command::K8s(args) => k8s::run(args)?,
        Command::Bench(args) => bench::run(args).await?,
        Command::Config { file } => {
            let cfg = ferroclip_proto::config::RunConfig::load(&file)?;
            print!("{}", cfg.to_toml());
        }
    }
    Ok(0)
}
