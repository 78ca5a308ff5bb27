//! `ferroclip bench coordinator`: the coordinator at cluster scale. Starts a real
//! `ferroclip coordinator` process (pinned to one core when `taskset` exists) on a synthetic
//! manifest, then N simulated workers (on the other cores) as async gRPC clients over loopback
//! that follow the real
//! protocol (Join with peers, heartbeats, NextStep/CommitStep with the worker's metric payload,
//! checkpoint commits), and reports RPC latencies, steps per second, the coordinator's CPU and
//! memory, the journal's writes and the time to form a generation.

mod crash;
mod gate;
mod probe;
mod report;
mod setup;
mod sim;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use gate::Gate;
use report::{Latencies, Report};
use sim::SimConfig;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load-test a real coordinator process with N simulated workers (no libtorch).
    Coordinator(CoordinatorBench),
}

#[derive(Args, Debug, Clone)]
pub struct CoordinatorBench {
    /// Simulated workers (one gRPC connection each).
    #[arg(long, default_value_t = 64)]
    pub workers: u32,
    /// Optimizer steps of the run.
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Heartbeats per second per worker.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat_hz: f64,
    /// Send every heartbeat, even right after a step call was answered (the protocol before
    /// workers let step calls stand in for heartbeats): the baseline of that change.
    #[arg(long)]
    pub heartbeat_always: bool,
    /// Ask NextStep in a call of its own every step instead of with the previous CommitStep
    /// (the protocol before commits carried the next step): the baseline of that change.
    #[arg(long)]
    pub separate_next: bool,
    /// Send every step's report the instant the step ends, instead of after the rank's delay
    /// (`ferroclip_proto::stagger`, as workers do): the baseline of that change.
    #[arg(long)]
    pub burst: bool,
    /// Beat on the main gRPC port, as before the heartbeat port (the Join answer's
    /// `heartbeat_port`, served on a thread of its own): the baseline of that change.
    #[arg(long)]
    pub heartbeat_main: bool,
    /// `cluster.heartbeat_timeout_s` of the run.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_timeout_s: f64,
    /// Steps per second the simulated workers aim at (0: as fast as the coordinator answers).
    #[arg(long, default_value_t = 1.0)]
    pub step_hz: f64,
    /// Spread of the ranks' step ends, in ms (stragglers); 0: every rank ends the step at the
    /// same instant, as right after an all-reduce.
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Blocks (row groups) of the synthetic manifest.
    #[arg(long, default_value_t = 100_000)]
    pub blocks: u32,
    #[arg(long, default_value_t = 64)]
    pub rows_per_block: u32,
    /// Samples per rank per step (global batch = workers × this).
    #[arg(long, default_value_t = 32)]
    pub per_rank_batch: u32,
    /// `data.lanes` of the run (0: one lane per rank, the default).
    #[arg(long, default_value_t = 0)]
    pub lanes: u32,
    /// Rank 0 commits a checkpoint every this many steps.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// One simulated worker dies when it reaches this step; the report gives the time from
    /// its death to the next committed step.
    #[arg(long)]
    pub kill_at: Option<u64>,
    /// SIGKILL the coordinator once this step is committed (workers keep running) and restart
    /// it on the same journal and ports; the report compares what it resumed with what it
    /// had acknowledged.
    #[arg(long)]
    pub crash_at: Option<u64>,
    /// With --crash-at: leave a torn entry after the journal's newest (a write cut short).
    #[arg(long)]
    pub crash_tear: bool,
    /// After the run, SIGKILL the coordinator, restart it on the same journal and time how long
    /// it takes to serve the resumed state again.
    #[arg(long)]
    pub resume_check: bool,
    /// Check from the coordinator's answers that every committed step fed the full global
    /// batch and no sample twice (keeps every sample in memory: small runs).
    #[arg(long)]
    pub verify: bool,
    /// Core the coordinator is pinned to (`none`: not pinned).
    #[arg(long, default_value = "0")]
    pub coordinator_core: String,
    /// Give up after this many seconds (the report covers what was done).
    #[arg(long, default_value_t = 600.0)]
    pub max_seconds: f64,
    /// Working directory (manifest, run.toml, journal, coordinator log); default a temporary one.
    #[arg(long)]
    pub dir: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Coordinator(b) => {
            let report = coordinator(&b).await?;
            if b.json {
                println!("{}", serde_json::to_string(&report.json())?);
            } else {
                print!("{}", report.table());
            }
            if let Some(problem) = &report.problem {
                bail!("{problem}");
            }
            Ok(())
        }
    }
}

/// Runs one benchmark and returns its report (`problem` set when the run did not complete or
/// `--verify` found a violation).
pub async fn coordinator(b: &CoordinatorBench) -> Result<Report> {
    if b.workers == 0 || b.steps == 0 {
        bail!("--workers and --steps must be at least 1");
    }
    let tmp;
    let dir = match &b.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {d}"))?;
            std::path::PathBuf::from(d)
        }
        None => {
            tmp = tempfile_dir()?;
            tmp.path().to_path_buf()
        }
    };
    let world = setup::World::prepare(&dir, b)?;
    let mut coord = world.start_coordinator(b, 0)?;
    let endpoint = coord.endpoint.clone();
    coord.wait_ready(Duration::from_secs(60)).await?;
    let mut pid = coord.pid();
    // The simulated workers move to the other cores: the coordinator's core is its own.
    let load_cores = setup::keep_off_core(&b.coordinator_core);
    let mut starts = 1;
    let mut crashed = None;
    let mut crash_poll = tokio::time::interval(Duration::from_millis(5));
    let cpu0 = probe::cpu_seconds(pid).unwrap_or(0.0);
    let me = std::process::id();
    let load_cpu0 = probe::cpu_seconds(me).unwrap_or(0.0);
    let io0 = probe::journal_io(coord.http).await.unwrap_or_default();

    let lat = Arc::new(Latencies::default());
    let gate = Arc::new(Gate::new(b.kill_at));
    let cfg = Arc::new(SimConfig::new(b, endpoint, world.run_dir.clone())?);
    let t0 = Instant::now();
    let mut sims = tokio::task::JoinSet::new();
    for i in 0..b.workers {
        let (cfg, lat, gate) = (cfg.clone(), lat.clone(), gate.clone());
        sims.spawn(async move { sim::worker(i, cfg, lat, gate).await });
    }
    let deadline = tokio::time::sleep(Duration::from_secs_f64(b.max_seconds));
    tokio::pin!(deadline);
    let mut rss_samples = Vec::new();
    let mut sampler = tokio::time::interval(Duration::from_secs(1));
    let mut problem = None;
    loop {
        tokio::select! {
            done = sims.join_next() => match done {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { problem.get_or_insert(format!("a simulated worker failed: {e:#}")); }
                Some(Err(e)) => { problem.get_or_insert(format!("a simulated worker panicked: {e}")); }
            },
            _ = sampler.tick() => {
                if let Some(rss) = probe::rss_mb(pid) { rss_samples.push((gate.committed(), rss)); }
            }
            _ = crash_poll.tick() => {
                if crashed.is_some() || b.crash_at.is_none_or(|s| gate.committed() < s) {
                    continue;
                }
                lat.disturbed();
                let r = crash::crash(&world, b, &mut coord, starts, gate.committed()).await?;
                starts += 1;
                pid = coord.pid();
                if r.resumed_step < r.acked_step {
                    problem.get_or_insert(format!(
                        "the restarted coordinator resumed at step {}, below the acknowledged step {}",
                        r.resumed_step, r.acked_step
                    ));
                }
                crashed = Some(r);
            }
            _ = &mut deadline => {
                problem.get_or_insert(format!("stopped after --max-seconds {}", b.max_seconds));
                sims.abort_all();
                break;
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = probe::cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let load_cpu = probe::cpu_seconds(me).unwrap_or(0.0) - load_cpu0;
    let rss = probe::rss_mb(pid).unwrap_or(0.0);
    let io = probe::journal_io(coord.http).await.unwrap_or_default();
    let mut report = Report::new(b, &lat, &gate, wall, cpu, rss, rss_samples, io.since(&io0));
    report.crash = crashed;
    report.load_generator_cores = load_cores;
    // Latencies are measured by the load generator: past ~one core's worth it queues them too.
    report.load_generator_cpu_share = load_cpu / wall.max(1e-9);
    if b.resume_check {
        coord.kill();
        let t = Instant::now();
        let mut again = world.start_coordinator(b, starts)?;
        again.wait_ready(Duration::from_secs(60)).await?;
        report.resume_s = Some(t.elapsed().as_secs_f64());
        report.resume_step = probe::committed_step(again.http).await;
        report.resume_load_s = probe::journal_load_s(&world.log_path(starts));
        again.kill();
    }
    if b.verify {
        if let Err(e) = gate.verify(b.workers * b.per_rank_batch) {
            problem.get_or_insert(format!("verify: {e}"));
        }
    }
    if problem.is_none() && gate.committed() < b.steps {
        problem = Some(format!(
            "only {} of {} steps committed",
            gate.committed(),
            b.steps
        ));
    }
    report.problem = problem;
    coord.kill();
    Ok(report)
}

fn tempfile_dir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!("ferroclip-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(TempDir(base))
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
