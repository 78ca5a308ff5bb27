use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferroclip-worker", about = "ferroclip training worker (libtorch)", version = VERSION.as_str())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a tiny model for a few steps on random data: a smoke test of libtorch.
    Smoke {
        #[arg(long, default_value_t = 20)]
        steps: usize,
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
    match cli.command {
        Command::Smoke { steps } => {
            let losses = ferroclip_worker::smoke::train(steps, 0);
            for (i, l) in losses.iter().enumerate() {
                println!("step {i:>3} loss {l:.4}");
            }
        }
    }
    Ok(())
}
