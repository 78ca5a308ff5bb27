//! Test-only entry point: the same `cli::run` as `ferroclip shards`, so this crate's integration
//! tests can spawn (and SIGKILL) a real build process without depending on the `cli` crate.

use clap::Parser;

#[derive(Parser)]
#[command(name = "ferroclip-shards")]
struct Cli {
    #[command(flatten)]
    args: ferroclip_shards::cli::ShardsArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    ferroclip_shards::cli::run(Cli::parse().args).await
}
