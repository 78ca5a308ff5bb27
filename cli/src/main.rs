//! `ferroclip`: the control plane and data tools. Never links libtorch.

mod k8s;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferroclip", version, about = "Multimodal pretraining control plane and data tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, inspect, verify and preview dataset shards.
    Shards(ferroclip_shards::cli::ShardsArgs),
    /// Kubernetes manifests for a run.
    K8s(k8s::K8sArgs),
    /// Check a run configuration file and print it with every default filled in.
    Config {
        /// Path to run.toml.
        file: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Shards(args) => ferroclip_shards::cli::run(args).await?,
        Command::K8s(args) => k8s::run(args)?,
        Command::Config { file } => {
            let cfg = ferroclip_proto::config::RunConfig::load(&file)?;
            print!("{}", cfg.to_toml());
        }
    }
    Ok(())
}
