use clap::{Parser, Subcommand};
use ferroclip_worker::cmd;

#[derive(Parser)]
#[command(name = "ferroclip-worker", about = "ferroclip training worker (libtorch)", version = VERSION.as_str())]
struct Cli {
    #[command(flatten)]
    log: ferroclip_telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a run's coordinator and train as one data-parallel worker.
    Join(cmd::join::cli::JoinArgs),
    /// Train in this process, without a coordinator (checkpoints, --resume, periodic eval).
    Train(cmd::train::TrainArgs),
    /// L2-normalised image or text embeddings of a checkpoint, as .npy or .parquet.
    Embed(cmd::embed::EmbedArgs),
    /// Zero-shot classification and retrieval recall of a checkpoint on a dataset split.
    Eval(cmd::eval::EvalArgs),
    /// GPU facts, a 1-rank NCCL self-test and bf16 training throughput/MFU (scripts/gpu-check.sh).
    GpuCheck(cmd::gpu_check::GpuCheckArgs),
    /// Train a tiny model for a few steps on random data: a smoke test of libtorch.
    Smoke {
        #[arg(long, default_value_t = 20)]
        steps: usize,
    },
    /// Time training steps of a preset on random data (forward, backward, optimizer), one process.
    BenchStep(cmd::bench_step::BenchStepArgs),
}

static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (libtorch {})",
        env!("CARGO_PKG_VERSION"),
        ferroclip_worker::libtorch::version()
    )
});

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The one log set-up of every command. Held to the end of main: dropping it flushes spans
    // still queued for OTLP.
    let _telemetry = ferroclip_telemetry::init("ferroclip-worker", cli.log.log_format)?;
    match cli.command {
        Command::Join(args) => cmd::join::cli::run(args)?,
        Command::Train(args) => {
            cmd::train::run_cli(args)?;
        }
        Command::Embed(args) => cmd::embed::run_cli(args)?,
        Command::Eval(args) => {
            cmd::eval::run(args)?;
        }
        Command::GpuCheck(args) => cmd::gpu_check::run(args)?,
        Command::Smoke { steps } => cmd::smoke::run(steps),
        Command::BenchStep(args) => cmd::bench_step::run(args)?,
    }
    Ok(())
}
