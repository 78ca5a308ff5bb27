//! One simulated worker: the real protocol of `ferroclip-worker join` without the training.
//! Join (with its ring address), heartbeats at the configured rate (skipped, as the worker
//! skips them, when a step call was answered within the period), the step's samples (carried
//! by the Join answer for a generation's first two steps, else asked with NextStep) → the step's
//! barrier (where the all-reduce would be) → CommitStep with the worker's metric payload and
//! the step after next's NextStep riding on it, sent off the step loop after the rank's delay
//! (`ferroclip_proto::stagger`) and answered during the next step, rank 0's checkpoint commits,
//! a collective failure reported and re-joined, and the end of the run (final checkpoint,
//! heartbeats until `stop`, Leave).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferroclip_proto::metrics as m;
use ferroclip_proto::stagger;
use ferroclip_proto::v1::{self, coordinator_client::CoordinatorClient};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::gate::{Barrier, Gate};
use super::report::{Latencies, Rpc};
use super::setup::TOKEN;
use super::CoordinatorBench;

pub struct SimConfig {
    endpoint: String,
    checkpoints: String,
    step_period: Option<Duration>,
    heartbeat_period: Duration,
    heartbeat_always: bool,
    separate_next: bool,
    burst: bool,
    /// Where the heartbeat tasks run: a thread of their own, as each worker process's beats
    /// are its own (on the load generator's shared runtime a beat would queue behind
    /// thousands of simulated workers' step calls, and that wait would be in its latency).
    /// None: beat from the shared runtime on the main port (`--heartbeat-main`).
    beats: Option<tokio::runtime::Handle>,
    jitter: Duration,
    checkpoint_every: u64,
    verify: bool,
    /// The run's last step: once it commits, the end's calls are not the steady state.
    last_step: u64,
}

impl SimConfig {
    pub fn new(b: &CoordinatorBench, endpoint: String, run_dir: String) -> Result<Self> {
        Ok(Self {
            endpoint,
            checkpoints: ferroclip_shards::checkpoints::root_url(&run_dir),
            step_period: (b.step_hz > 0.0).then(|| Duration::from_secs_f64(1.0 / b.step_hz)),
            heartbeat_period: Duration::from_secs_f64(1.0 / b.heartbeat_hz.max(0.01)),
            heartbeat_always: b.heartbeat_always,
            separate_next: b.separate_next,
            burst: b.burst,
            beats: if b.heartbeat_main {
                None
            } else {
                Some(beat_runtime()?)
            },
            jitter: Duration::from_secs_f64(b.jitter_ms.max(0.0) / 1000.0),
            checkpoint_every: b.checkpoint_every,
            verify: b.verify,
            last_step: b.steps,
        })
    }
}

type Client = CoordinatorClient<Channel>;

/// A single-threaded runtime on a thread of its own that lives as long as the process, made
/// from the main thread: it keeps the priority the simulated workers' threads give up.
fn beat_runtime() -> Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("sim-heartbeats".into())
        .spawn(move || {
            rt.block_on(std::future::pending::<()>());
        })?;
    Ok(handle)
}

/// When a worker's last step call was answered (µs since the first use), which its heartbeat
/// task reads as the real worker's `Client::answered_within` does.
#[derive(Default)]
struct Answered(AtomicU64);

impl Answered {
    fn micros() -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
    }

    fn now(&self) {
        self.0.store(Self::micros(), Ordering::Relaxed);
    }

    fn within(&self, period: Duration) -> bool {
        let at = self.0.load(Ordering::Relaxed);
        at > 0 && Self::micros().saturating_sub(at) < period.as_micros() as u64
    }
}

/// A request with the worker token and, once joined, the member's session secret (as the
/// real worker sends them).
fn req<T>(msg: T, session: &str) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = format!("Bearer {TOKEN}").parse() {
        r.metadata_mut().insert(ferroclip_proto::AUTH_HEADER, v);
    }
    if let (false, Ok(v)) = (session.is_empty(), session.parse()) {
        r.metadata_mut().insert(ferroclip_proto::SESSION_HEADER, v);
    }
    r
}

/// Times one call of `rpc`, retrying what `retryable` says as the worker does.
async fn call<T, F, Fut>(lat: &Latencies, rpc: Rpc, client: &Client, f: F) -> Result<T, Status>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut tries = 0u32;
    loop {
        let (t, steady) = (Instant::now(), lat.steady());
        let r = f(client.clone()).await;
        lat.record(rpc, t.elapsed(), steady);
        match r {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(s) if retryable(&s) && tries < 2000 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// UNAVAILABLE (not durable yet), OUT_OF_RANGE (a step too far ahead), and a connection
/// lost (the coordinator restarts): the worker retries all of them.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::OutOfRange | Code::Unknown | Code::Cancelled
    )
}

/// What ended a generation for this worker.
enum Next {
    Rejoin,
    Died,
    Finished,
}

pub async fn worker(
    i: u32,
    cfg: Arc<SimConfig>,
    lat: Arc<Latencies>,
    gate: Arc<Gate>,
) -> Result<()> {
    let channel = Endpoint::from_shared(cfg.endpoint.clone())?
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(600))
        .connect_lazy();
    let client = CoordinatorClient::new(channel);
    let id = format!("sim-{i:05}");
    let (mut last_generation, mut last_applied) = (0, 0);
    let mut session = String::new();
    let answered = Arc::new(Answered::default());
    // The heartbeat port and its client, made on the heartbeat runtime at a Join naming it.
    let mut lane: Option<(u32, Lane, String)> = None;
    loop {
        let join = v1::JoinRequest {
            worker_id: id.clone(),
            host: "127.0.0.1".into(),
            device: "cuda:0".into(),
            collective_addr: format!("127.0.0.1:{}", 20000 + i % 40000),
            last_generation,
            last_applied_step: last_applied,
            // A simulated worker always holds its generation's state.
            state_generation: last_generation,
        };
        let sent = Instant::now();
        let p = call(&lat, Rpc::Join, &client, |mut c| {
            let r = req(join.clone(), &session);
            async move { c.join(r).await }
        })
        .await?;
        if p.world_size == 0 {
            return Ok(()); // the run is finished
        }
        gate.joined(p.generation, sent, Instant::now());
        // The worker counts a Join's answer as a step call's (members are seen at formation).
        answered.now();
        if !p.session.is_empty() {
            session = p.session.clone();
        }
        last_generation = p.generation;
        let (stop_tx, stop_rx) = watch::channel(false);
        let beat = v1::HeartbeatRequest {
            worker_id: id.clone(),
            generation: p.generation,
            store_wait_s: 0.0,
        };
        // On the heartbeat port, from the heartbeat runtime, where the Join names the port.
        let on_lane = match (&cfg.beats, p.heartbeat_port) {
            (Some(rt), port) if port > 0 => {
                if lane.as_ref().map(|l| l.0) != Some(port) {
                    let url = ferroclip_proto::tls::with_port(&cfg.endpoint, port)
                        .map_err(anyhow::Error::msg)?;
                    lane = Some((port, Lane::default(), url));
                }
                lane.as_ref().map(|l| (rt, l.1.clone(), l.2.clone()))
            }
            _ => None,
        };
        let beats = heartbeats(
            on_lane.as_ref().map(|l| (l.1.clone(), l.2.clone())),
            client.clone(),
            beat,
            session.clone(),
            cfg.heartbeat_period,
            (!cfg.heartbeat_always).then(|| answered.clone()),
            lat.clone(),
            stop_rx,
        );
        let beats = match on_lane {
            Some((rt, _, _)) => rt.spawn(beats),
            None => tokio::spawn(beats),
        };
        let mut at = Member {
            client: client.clone(),
            id: &id,
            p: &p,
            cfg: &cfg,
            lat: &lat,
            gate: &gate,
            last_applied: &mut last_applied,
            answered: &answered,
        };
        match at.steps().await? {
            Next::Rejoin => {
                let _ = stop_tx.send(true);
            }
            Next::Died => {
                beats.abort();
                return Ok(());
            }
            Next::Finished => {
                // Heartbeats go on until the coordinator says the run is finished.
                let _ = beats.await;
                let leave = v1::LeaveRequest {
                    worker_id: id.clone(),
                    generation: p.generation,
                    reason: "end of run".into(),
                };
                let _ = call(&lat, Rpc::Other, &client, |mut c| {
                    let r = req(leave.clone(), &session);
                    async move { c.leave(r).await }
                })
                .await;
                return Ok(());
            }
        }
    }
}

/// A worker's client of the heartbeat port, connected once by its first heartbeat task (on
/// the heartbeat runtime: a connection belongs to the runtime that polls its calls); None if
/// it could not be reached.
type Lane = Arc<tokio::sync::OnceCell<Option<Client>>>;

/// Connected at once, before the first beat is due (which would otherwise pay for the
/// handshake), but off the step loop: at formation, 4,096 handshakes would delay the first
/// steps (the step loop then catches up faster than its reports come back).
async fn connect_lane(url: String) -> Option<Client> {
    Endpoint::from_shared(url)
        .ok()?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .ok()
        .map(CoordinatorClient::new)
}

/// Beats on `lane` (the heartbeat port), or on `main` where there is none or once it fails,
/// as the worker does (a coordinator restarted on the same main port may have another
/// heartbeat port).
#[allow(clippy::too_many_arguments)]
async fn heartbeats(
    lane: Option<(Lane, String)>,
    mut main: Client,
    beat: v1::HeartbeatRequest,
    session: String,
    period: Duration,
    answered: Option<Arc<Answered>>,
    lat: Arc<Latencies>,
    mut stop: watch::Receiver<bool>,
) {
    let mut lane = match lane {
        Some((cell, url)) => cell.get_or_init(|| connect_lane(url)).await.clone(),
        None => None,
    };
    // Workers start at different instants: spread the beats over the period.
    let offset = period.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if answered.as_ref().is_some_and(|a| a.within(period)) {
            continue;
        }
        let (t, steady) = (Instant::now(), lat.steady());
        let mut r = match lane.as_mut() {
            Some(l) => l.heartbeat(req(beat.clone(), &session)).await,
            None => main.heartbeat(req(beat.clone(), &session)).await,
        };
        if lane.is_some()
            && r.as_ref()
                .is_err_and(|s| s.code() != Code::FailedPrecondition)
        {
            lane = None;
            r = main.heartbeat(req(beat.clone(), &session)).await;
        }
        lat.record(Rpc::Heartbeat, t.elapsed(), steady);
        if r.is_ok_and(|r| r.into_inner().stop) {
            return;
        }
    }
}

/// A step's CommitStep on its way.
type Report = tokio::task::JoinHandle<Result<v1::CommitStepResponse, Status>>;

/// A worker inside one generation.
struct Member<'a> {
    client: Client,
    id: &'a str,
    p: &'a v1::JoinResponse,
    cfg: &'a SimConfig,
    lat: &'a Arc<Latencies>,
    gate: &'a Arc<Gate>,
    last_applied: &'a mut u64,
    answered: &'a Arc<Answered>,
}

impl Member<'_> {
    async fn steps(&mut self) -> Result<Next> {
        let (generation, rank, world) = (self.p.generation, self.p.rank, self.p.world_size);
        // The world's clock: its first barrier's opening, the same instant for every rank
        // (from each rank's own Join, ranks answered early in a slow formation ran their first
        // steps without the step time, as no real rank can, and asked NextStep for steps their
        // reports had not brought yet).
        let mut start = None;
        let first = self.p.next_step;
        let mut step = first;
        // This step's samples as the report of step - 2 answered them.
        let mut answered: Option<v1::NextStepResponse> = None;
        // The first steps' samples, answered with the Join (as the worker takes them).
        // (`--separate-next`, the old protocol's baseline, asks NextStep for every step.)
        let mut carried = if self.cfg.separate_next {
            Vec::new()
        } else {
            self.p.first_steps.clone()
        };
        // The previous step's report, in flight (sent off the step loop, as the worker does).
        let mut report: Option<Report> = None;
        loop {
            let started = Instant::now();
            let ask = v1::NextStepRequest {
                worker_id: self.id.to_string(),
                generation,
                step,
            };
            let from_join = carried
                .iter()
                .position(|r| r.step == step)
                .map(|i| carried.swap_remove(i));
            let plan = match answered.take().filter(|p| p.step == step).or(from_join) {
                Some(plan) => plan,
                None => match call(self.lat, Rpc::NextStep, &self.client, |mut c| {
                    let r = req(ask.clone(), &self.p.session);
                    async move { c.next_step(r).await }
                })
                .await
                {
                    Ok(plan) => {
                        self.answered.now();
                        plan
                    }
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        self.settle(report.take()).await;
                        return Ok(self.leave_ring());
                    }
                    Err(s) => bail!("NextStep {step}: {s}"),
                },
            };
            // A regroup or the end answered for this step: every rank ran the steps before it.
            if plan.regroup {
                self.settle(report.take()).await;
                return Ok(self.leave_ring());
            }
            if plan.end_of_run {
                self.settle(report.take()).await;
                self.final_checkpoint(step.saturating_sub(1)).await?;
                return Ok(Next::Finished);
            }
            let samples = plan.samples.len() as u32;
            if self.cfg.verify {
                self.gate.fed(generation, world, step, rank, plan.samples);
            }
            if self.gate.dies(generation, rank, world, step) {
                self.lat.disturbed();
                return Ok(Next::Died);
            }
            match self.gate.barrier(generation, step, world).await {
                Barrier::Passed => {}
                Barrier::Failed { dead } => return self.collective_failed(dead).await,
                Barrier::Broken => return Ok(Next::Rejoin),
            }
            let start = *start.get_or_insert_with(|| {
                self.gate
                    .opened(generation)
                    .unwrap_or_else(tokio::time::Instant::now)
            });
            if let Some(period) = self.cfg.step_period {
                let jitter = self.cfg.jitter.mul_f64(rand::random::<f64>());
                let due = start + period * (step - first + 1) as u32 + jitter;
                tokio::time::sleep_until(due).await;
            }
            *self.last_applied = step;
            // The previous report had this step's time; its answer carries the next step.
            if let Some(prev) = report.take() {
                match self.answer(prev).await {
                    Ok(next) => answered = next,
                    Err(s) if s.code() == Code::FailedPrecondition => return Ok(self.leave_ring()),
                    Err(s) => bail!("CommitStep {}: {s}", step - 1),
                }
            }
            let commit = v1::CommitStepRequest {
                worker_id: self.id.to_string(),
                generation,
                step,
                samples,
                metrics: payload(world),
                // The next step rides on the commit, as the worker asks for its step after next.
                next_step: if self.cfg.separate_next { 0 } else { step + 2 },
            };
            let delay = if self.cfg.burst {
                Duration::ZERO
            } else {
                stagger::report_delay(rank, world, started.elapsed())
            };
            report = Some(self.send(commit, delay));
            if rank == 0
                && self.cfg.checkpoint_every > 0
                && step.is_multiple_of(self.cfg.checkpoint_every)
            {
                self.checkpoint(step).await?;
            }
            step += 1;
        }
    }

    /// Sends a step's report after `delay`, off the step loop.
    fn send(&self, commit: v1::CommitStepRequest, delay: Duration) -> Report {
        let (client, lat, gate, answered, session) = (
            self.client.clone(),
            self.lat.clone(),
            self.gate.clone(),
            self.answered.clone(),
            self.p.session.clone(),
        );
        let (step, last) = (commit.step, self.cfg.last_step);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let r = call(&lat, Rpc::CommitStep, &client, |mut c| {
                let r = req(commit.clone(), &session);
                async move { c.commit_step(r).await }
            })
            .await?;
            answered.now();
            if r.committed {
                gate.committed_step(step);
                lat.first_commit();
                if step >= last {
                    lat.disturbed();
                }
            }
            Ok(r)
        })
    }

    /// A report's answer: the next step's samples when it carried them.
    async fn answer(&self, report: Report) -> Result<Option<v1::NextStepResponse>, Status> {
        let r = report
            .await
            .map_err(|e| Status::cancelled(format!("CommitStep task: {e}")))??;
        Ok(r.next)
    }

    /// The report in flight when the generation ends: answered (or refused as stale) first.
    async fn settle(&self, report: Option<Report>) {
        if let Some(r) = report {
            let _ = self.answer(r).await;
        }
    }

    /// This worker's generation is over: it joins again, and its peers' collectives fail.
    fn leave_ring(&self) -> Next {
        self.gate.broken(self.p.generation);
        Next::Rejoin
    }

    /// The ring failed because rank `dead` is gone: its neighbours report it, everyone
    /// re-joins once it is reported.
    async fn collective_failed(&mut self, dead: u32) -> Result<Next> {
        let (generation, rank, world) = (self.p.generation, self.p.rank, self.p.world_size);
        if (rank + 1) % world == dead || (dead + 1) % world == rank {
            let report = v1::ReportFailureRequest {
                worker_id: self.id.to_string(),
                generation,
                suspect_rank: dead,
                reason: "simulated collective timeout".into(),
            };
            let r = call(self.lat, Rpc::Other, &self.client, |mut c| {
                let r = req(report.clone(), &self.p.session);
                async move { c.report_failure(r).await }
            })
            .await;
            if let Err(s) = r {
                if s.code() != Code::FailedPrecondition {
                    bail!("ReportFailure: {s}");
                }
            }
            self.gate.reported(generation);
        } else {
            self.gate
                .wait_reported(generation, Duration::from_secs(5))
                .await;
        }
        Ok(Next::Rejoin)
    }

    async fn checkpoint(&mut self, step: u64) -> Result<()> {
        let ckpt = v1::CommitCheckpointRequest {
            worker_id: self.id.to_string(),
            generation: self.p.generation,
            step,
            url: ferroclip_shards::checkpoints::step_url(&self.cfg.checkpoints, step),
        };
        match call(self.lat, Rpc::Other, &self.client, |mut c| {
            let r = req(ckpt.clone(), &self.p.session);
            async move { c.commit_checkpoint(r).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::FailedPrecondition => Ok(()),
            Err(s) => bail!("CommitCheckpoint {step}: {s}"),
        }
    }

    /// "No step N": rank 0 records the final checkpoint of step N - 1.
    async fn final_checkpoint(&mut self, last: u64) -> Result<()> {
        if self.p.rank == 0 && last > 0 {
            self.checkpoint(last).await?;
        }
        Ok(())
    }
}

/// The figures a real worker reports with CommitStep (`worker/src/cmd/join/step.rs`).
fn payload(world: u32) -> Vec<v1::Metric> {
    let mut out: Vec<(&str, f64)> = vec![
        (m::LOSS_TOTAL, 4.1),
        (m::LR, 5e-4),
        (m::GRAD_NORM, 1.3),
        (m::LOGIT_SCALE, 14.3),
        (m::LOSS_CONTRASTIVE, 4.1),
        (m::STEP_S, 0.98),
        (m::DATA_WAIT_S, 0.01),
        (m::COMPUTE_S, 0.9),
        (m::FORWARD_S, 0.3),
        (m::BACKWARD_S, 0.5),
        (m::OPTIMIZER_S, 0.05),
    ];
    if world > 1 {
        out.extend([
            (m::ALLREDUCE_S, 0.1),
            (m::ALLREDUCE_BYTES, 6.0e8),
            (m::ALLREDUCE_BUSBW, 1.2e10),
        ]);
    }
    out.into_iter()
        .map(|(name, value)| v1::Metric {
            name: name.to_string(),
            value,
        })
        .collect()
}
