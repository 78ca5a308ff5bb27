//! `ferroclip train --workers N`: the local launcher. Runs the coordinator in this process and
//! N `ferroclip-worker` processes on this machine, shows progress, and stops cleanly on Ctrl-C
//! (the run finishes its step, rank 0 writes a checkpoint, everyone leaves).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::metrics as metric;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::process::{Child, Command};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run configuration (run.toml).
    #[arg(long)]
    pub config: String,
    /// Worker processes to start on this machine.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Start the run over even if run.dir holds one (by default its journal is resumed, with
    /// the latest checkpoint).
    #[arg(long)]
    pub fresh: bool,
    /// Accepted for compatibility: resuming is the default.
    #[arg(long, hide = true)]
    pub resume: bool,
    /// HTTP address of the dashboard and /metrics (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_addr: std::net::SocketAddr,
    /// Path of the ferroclip-worker binary (default: beside this binary, then PATH).
    #[arg(long, env = "FERROCLIP_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Libtorch threads per worker (default: cores / workers).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve the control plane in plaintext on loopback (default: TLS with a CA made for
    /// this run, in a temporary directory removed at the end).
    #[arg(long)]
    pub plaintext: bool,
    /// `cpu`, or `cuda`: worker i on GPU i (the config's cluster.backend must be nccl).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
    #[command(flatten)]
    pub store: ferroclip_shards::StoreArgs,
}

fn worker_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let beside = std::env::current_exe()?.with_file_name("ferroclip-worker");
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from("ferroclip-worker"))
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
        .collect()
}

/// A directory removed when dropped (the run's certificates and keys).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "ferroclip-train-{}-{}",
            std::process::id(),
            &random_token()[..8]
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Owner-only: it holds the server's key.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(args: TrainArgs) -> Result<()> {
    let mut config = RunConfig::load(&args.config)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    // Locally we know how many workers come: form the first generation as soon as they are in.
    config.cluster.max_workers = config.cluster.max_workers.max(args.workers);
    let token = random_token();
    // TLS on loopback by default: a CA for this run, the server certificate for 127.0.0.1
    // and localhost; the workers trust that CA only.
    let certs = if args.plaintext {
        None
    } else {
        let dir = TempDir::new()?;
        let files = crate::certs::generate(
            &dir.0,
            &["127.0.0.1".into(), "localhost".into(), "::1".into()],
            crate::certs::Validity::Days(30),
        )?;
        Some((dir, files))
    };
    let tls = match &certs {
        Some((_, f)) => Some(ferroclip_coordinator::tls::ServerTls::from_files(
            &f.server.to_string_lossy(),
            &f.server_key.to_string_lossy(),
            None,
        )?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let handle = ferroclip_coordinator::serve(ferroclip_coordinator::ServeOptions {
        config: config.clone(),
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: Some(args.http_addr),
        heartbeat_addr: None,
        token: token.clone(),
        viewer_token: None,
        tls,
        journal: None,
        fresh: args.fresh,
        store: args.store.options(),
    })
    .await?;
    let url = format!("{scheme}://{}", handle.grpc_addr);
    if let Some(http) = handle.http_addr {
        // A one-time link: it sets an HttpOnly session cookie and redirects to the dashboard,
        // so no credential stays in the address bar or the history.
        let code = handle.shared.logins.one_time_code();
        eprintln!("dashboard: {scheme}://{http}/login?once={code}");
        if let Some((_, f)) = &certs {
            eprintln!(
                "  (its certificate is signed by this run's own CA, {}: the browser asks to accept it)",
                f.ca.display()
            );
        }
    }
    let bin = worker_binary(args.worker_bin.clone())?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = args
        .threads
        .unwrap_or((cores / args.workers as usize).max(1));
    let mut children: Vec<Child> = Vec::new();
    for i in 0..args.workers {
        let device = match args.device.as_str() {
            "cuda" => format!("cuda:{i}"),
            other => other.to_string(),
        };
        let mut cmd = Command::new(&bin);
        cmd.args(["join", "--coordinator", &url, "--device", &device]);
        // The launcher decides the workers' TLS, not the environment it was started in.
        for var in [
            "FERROCLIP_TLS_CA",
            "FERROCLIP_TLS_CERT",
            "FERROCLIP_TLS_KEY",
        ] {
            cmd.env_remove(var);
        }
        if let Some((_, f)) = &certs {
            cmd.arg("--tls-ca").arg(&f.ca);
        }
        let child = cmd
            .args(["--threads", &threads.to_string()])
            .args(["--worker-id", &format!("local-{i}")])
            // The workers read the same data and run directory.
            .args(args.store.to_args())
            .env("FERROCLIP_TOKEN", &token)
            // Own process group: a terminal's Ctrl-C reaches only the launcher, which then
            // stops the run in order.
            .process_group(0)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {} ({})", i, bin.display()))?;
        children.push(child);
    }

    let bar = ProgressBar::new(handle.shared.run.lock().await.total_steps().max(1));
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} {wide_bar} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                bar.println("interrupted: finishing the step, writing a checkpoint, stopping");
                handle.shared.run.lock().await.request_stop();
            }
        }
        let (step, msg, finished, total) = {
            let run = handle.shared.run.lock().await;
            let s = run.status();
            let m = |k: &str| s.metrics.get(k).copied();
            let msg = format!(
                "loss {:.4}  {:.0} samples/s  {} workers  gen {}",
                m(metric::LOSS_TOTAL).unwrap_or(f64::NAN),
                m(metric::SAMPLES_PER_S).unwrap_or(0.0),
                s.workers.len(),
                s.generation
            );
            (s.step, msg, run.finished(), run.total_steps())
        };
        bar.set_length(total.max(1));
        bar.set_position(step);
        bar.set_message(msg);
        if finished {
            break;
        }
        let mut all_exited = true;
        for c in children.iter_mut() {
            if c.try_wait()?.is_none() {
                all_exited = false;
            }
        }
        if all_exited {
            bar.abandon();
            handle.shutdown().await;
            bail!("every worker exited before the run finished (see their logs above)");
        }
    }
    bar.finish();
    for mut c in children {
        let status = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
        if !matches!(status, Ok(Ok(s)) if s.success()) {
            tracing::warn!("a worker did not exit cleanly: {status:?}");
        }
    }
    let summary = {
        let run = handle.shared.run.lock().await;
        let s = run.status();
        (
            s.step,
            s.last_checkpoint.clone().unwrap_or_default(),
            run.history.back().cloned(),
        )
    };
    handle.shutdown().await;
    println!("finished at step {}", summary.0);
    if let Some(last) = summary.2 {
        for (k, v) in &last.metrics {
            if k.starts_with(metric::LOSS_PREFIX) {
                println!("  {k} = {v:.4}");
            }
        }
    }
    if summary.1.is_empty() {
        println!("no checkpoint was recorded");
    } else {
        println!("checkpoint: {}", summary.1);
    }
    Ok(())
}
