use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferroclip-worker", about = "ferroclip training worker (libtorch)", version = VERSION.as_str())]
struct Cli {
    /// Log lines: pretty (a terminal) or json (one object per line); RUST_LOG filters.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "FERROCLIP_LOG_FORMAT"
    )]
    log_format: ferroclip_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a run's coordinator and train as one data-parallel worker.
    Join(ferroclip_worker::dist::cli::JoinArgs),
    /// Train in this process, without a coordinator (checkpoints, --resume, periodic eval).
    Train(ferroclip_worker::single::TrainArgs),
    /// L2-normalised image or text embeddings of a checkpoint, as .npy or .parquet.
    Embed(ferroclip_worker::embed::EmbedArgs),
    /// Zero-shot classification and retrieval recall of a checkpoint on a dataset split.
    Eval {
        /// A checkpoint (a `step-N` directory) or a directory holding them (the newest is
        /// used): a path or an object-store URL.
        #[arg(long)]
        checkpoint: String,
        /// Dataset URL (holds manifest.json; classes.json gives the zero-shot classes).
        #[arg(long)]
        data: String,
        #[arg(long, default_value = "val")]
        split: String,
        /// Evaluate at most this many samples (0 = all).
        #[arg(long, default_value_t = 0)]
        max_samples: usize,
        #[command(flatten)]
        store: ferroclip_shards::StoreArgs,
    },
    /// GPU facts, a 1-rank NCCL self-test and bf16 training throughput/MFU (scripts/gpu-check.sh).
    GpuCheck(ferroclip_worker::gpu_check::GpuCheckArgs),
    /// Train a tiny model for a few steps on random data: a smoke test of libtorch.
    Smoke {
        #[arg(long, default_value_t = 20)]
        steps: usize,
    },
    /// Time training steps of a preset on random data (forward, backward, optimizer), one process.
    BenchStep {
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, default_value_t = 64)]
        batch: i64,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// libtorch intra-op threads (0 = libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
    },
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
    // Held to the end of main: dropping it flushes spans still queued for OTLP.
    let _telemetry = ferroclip_telemetry::init("ferroclip-worker", cli.log_format)?;
    match cli.command {
        Command::Join(args) => ferroclip_worker::dist::cli::run(args)?,
        Command::Train(args) => {
            ferroclip_worker::single::run_cli(args)?;
        }
        Command::Embed(args) => ferroclip_worker::embed::run_cli(args)?,
        Command::Eval {
            checkpoint,
            data,
            split,
            max_samples,
            store,
        } => {
            ferroclip_worker::eval::run_cli(
                &checkpoint,
                &data,
                &split,
                max_samples,
                &store.options(),
            )?;
        }
        Command::GpuCheck(args) => ferroclip_worker::gpu_check::run(args)?,
        Command::Smoke { steps } => {
            let losses = ferroclip_worker::smoke::train(steps, 0);
            for (i, l) in losses.iter().enumerate() {
                println!("step {i:>3} loss {l:.4}");
            }
        }
        Command::BenchStep {
            preset,
            batch,
            steps,
            warmup,
            threads,
        } => bench_step(&preset, batch, steps, warmup, threads)?,
    }
    Ok(())
}

/// Mean seconds per phase over `steps` timed steps after `warmup` untimed ones. Batches are
/// made before timing, so data wait is zero here (the loader's wait is measured by train).
fn bench_step(
    preset: &str,
    batch: i64,
    steps: usize,
    warmup: usize,
    threads: i32,
) -> anyhow::Result<()> {
    use ferroclip_worker::collective::Single;
    use ferroclip_worker::train::Trainer;
    use std::time::Instant;
    use tch::{Device, Kind, Tensor};
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let mut cfg = ferroclip_proto::config::RunConfig::default();
    cfg.model.preset = preset.to_string();
    cfg.run.seed = 0;
    let mut tr = Trainer::new(&cfg, (steps + warmup) as u64)?;
    let c = tr.model.config.clone();
    let images = Tensor::randn(
        [batch, 3, c.image_size, c.image_size],
        (Kind::Float, Device::Cpu),
    );
    let tokens = Tensor::randint_low(
        1,
        49405,
        [batch, c.context_length],
        (Kind::Int64, Device::Cpu),
    );
    let _ = tokens.select(1, 0).fill_(49406);
    let _ = tokens.select(1, c.context_length - 1).fill_(49407);
    let (mut fwd, mut bwd, mut opt, mut total) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..steps + warmup {
        let t = Instant::now();
        let l = tr.compute_grads_tensors(&images, &tokens, batch as usize, &mut Single)?;
        let to = Instant::now();
        tr.apply_update()?;
        let o = to.elapsed().as_secs_f64();
        if i >= warmup {
            fwd += tr.last_times.forward_s;
            bwd += tr.last_times.backward_s;
            opt += o;
            total += t.elapsed().as_secs_f64();
        }
        tracing::debug!(step = i, loss = l.total);
    }
    let n = steps as f64;
    println!(
        "{{\"impl\": \"ferroclip\", \"preset\": \"{preset}\", \"batch\": {batch}, \"threads\": {}, \"params\": {}, \"data_s\": 0.0, \"forward_s\": {:.5}, \"backward_s\": {:.5}, \"optimizer_s\": {:.5}, \"step_s\": {:.5}}}",
        tch::get_num_threads(),
        tr.model.num_clip_params(),
        fwd / n,
        bwd / n,
        opt / n,
        total / n
    );
    Ok(())
}
