//! Distributed training: `ferroclip-worker join`. Joins the coordinator, forms the ring with its
//! peers, and loops over steps: samples from the coordinator → batch → gradients over the global
//! batch → optimizer → CommitStep (sent off the loop while the next step computes). On a
//! collective failure or a generation change it abandons the uncommitted step (no update
//! happened) and re-joins keeping its in-memory state. When the run's steps are done, rank 0
//! writes the final checkpoint and every rank waits until the coordinator has recorded it (or a
//! death ends the generation and the remaining steps run in a new one), then leaves.
//!
//! `fetch` gets a step's batch, `step` trains it, `commit` reports it, `state` moves the
//! trainer's state (broadcast, checkpoints), `finish` ends the run (checkpoints recorded, the
//! final wait, Leave), `client` speaks to the coordinator.

pub mod audit;
pub mod cli;
pub mod client;
mod commit;
mod fetch;
mod finish;
pub mod gpu;
mod state;
mod step;
pub mod tensorboard;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::{stagger, v1};
use ferroclip_shards::StoreOptions;
use tch::Device;

use crate::collective::ring::{RingCollective, RingKey, RingOptions};
use crate::collective::Collective;
use crate::data::{pipeline, Loader};
use crate::train::Trainer;
use audit::Audit;
use client::{CallError, Client};
use commit::Commit;
use fetch::{Ahead, Fetcher, Next};
use step::{Outcome, StepInfo};

/// How this worker reaches the run.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub coordinator: String,
    pub token: String,
    /// TLS to the coordinator (`--tls-ca`, optionally a client certificate); plaintext without.
    pub tls: Option<ferroclip_proto::tls::ClientTls>,
    pub worker_id: String,
    pub device: Device,
    pub device_name: String,
    /// Port for ring connections (0 = any free port).
    pub collective_port: u16,
    /// Host peers use to reach this worker.
    pub advertise_host: String,
    pub store: StoreOptions,
    /// Set by SIGTERM: finish or abandon the current step, Leave, exit 0.
    pub stop: Arc<AtomicBool>,
}

/// Why a generation's loop ended.
enum Exit {
    /// Join again (generation over, collective failure).
    Regroup,
    /// The run is over or this worker was asked to stop.
    Done,
}

/// The worker process: its link to the coordinator and its place in the run.
struct Worker {
    opts: JoinOptions,
    rt: tokio::runtime::Runtime,
    client: Client,
    listener: TcpListener,
    collective_addr: String,
    /// Built at the first Join, when the coordinator has sent the run's config.
    session: Option<Session>,
    last_applied: u64,
    generation: u64,
    /// The generation its model is of (`JoinRequest.state_generation`).
    state_generation: u64,
}

/// Stops a task when dropped: the generation's heartbeats end on every way out of it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The run as this worker trains it: built once and kept across generations (survivors keep
/// their parameters and optimizer state in memory).
struct Session {
    cfg: RunConfig,
    /// The command line's store options with the run's `store.retry_budget_s`.
    store: StoreOptions,
    trainer: Trainer,
    gpu: gpu::Plan,
    loader: Arc<Loader>,
    audit: Option<Audit>,
    /// Rank 0's TensorBoard event file, opened the first time this worker is rank 0
    /// (`Some(None)`: opening failed, already reported).
    tensorboard: Option<Option<tensorboard::EventWriter>>,
    /// The newest checkpoint this worker wrote: its step, URL, and whether the coordinator
    /// recorded it (a generation that ended meanwhile refuses the record: it is sent again, the
    /// files are not written again).
    last_checkpoint: Option<(u64, String, bool)>,
}

/// What the heartbeat task has learnt about this generation.
#[derive(Default)]
struct Beat {
    /// The coordinator no longer knows this generation: join again.
    over: AtomicBool,
    /// The run is finished: leave.
    finished: AtomicBool,
}

pub fn run(opts: JoinOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = {
        let _ctx = rt.enter();
        Client::new(
            &opts.coordinator,
            &opts.token,
            opts.tls.as_ref(),
            Duration::from_secs(120),
        )?
    };
    let listener = bind_collective(&opts.advertise_host, opts.collective_port)?;
    let collective_addr = format!("{}:{}", opts.advertise_host, listener.local_addr()?.port());
    let mut w = Worker {
        opts,
        rt,
        client,
        listener,
        collective_addr,
        session: None,
        last_applied: 0,
        generation: 0,
        state_generation: 0,
    };
    w.main_loop()
}

/// The ring's listener on the address this worker advertises (not every interface); a host
/// name that resolves to no local address falls back to all interfaces, with a warning.
fn bind_collective(host: &str, port: u16) -> Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let advertised = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next());
    if let Some(addr) = advertised {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => tracing::warn!(
                %addr,
                error = %e,
                "cannot bind the advertised address; the ring port listens on every interface"
            ),
        }
    }
    TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("binding the collective port {port}"))
}

impl Worker {
    fn main_loop(&mut self) -> Result<()> {
        loop {
            if self.opts.stop.load(Ordering::Relaxed) {
                return self.leave("SIGTERM");
            }
            let req = v1::JoinRequest {
                worker_id: self.opts.worker_id.clone(),
                host: hostname(),
                device: self.opts.device_name.clone(),
                collective_addr: self.collective_addr.clone(),
                last_generation: self.generation,
                last_applied_step: self.last_applied,
                state_generation: self.state_generation,
            };
            let place = self
                .rt
                .block_on(self.client.join(req))
                .map_err(anyhow::Error::from)?;
            if place.world_size == 0 {
                tracing::info!("the run is finished");
                return Ok(());
            }
            self.generation = place.generation;
            tracing::info!(
                generation = place.generation,
                rank = place.rank,
                world = place.world_size,
                next_step = place.next_step,
                total_steps = place.total_steps,
                "joined"
            );
            self.prepare(&place)?;
            match self.generation_loop(&place)? {
                Exit::Regroup => continue,
                Exit::Done => return Ok(()),
            }
        }
    }

    /// Builds the session at the first Join; loads a checkpoint when the coordinator says so.
    fn prepare(&mut self, place: &v1::JoinResponse) -> Result<()> {
        if self.session.is_none() {
            let cfg = RunConfig::parse(&place.run_config_toml, "coordinator's run config")?;
            let session = Session::build(cfg, place, &self.opts, self.rt.handle().clone())?;
            // Wait out a coordinator whose journal waits out a store outage.
            let budget = session.store.retry_budget;
            self.client = self
                .client
                .with_patience(budget.max(Duration::from_secs(60)) + Duration::from_secs(60));
            self.session = Some(session);
        }
        if !place.resume_checkpoint.is_empty() {
            let s = self.session.as_mut().context("session")?;
            state::load_checkpoint(&mut s.trainer, &place.resume_checkpoint, &s.store)
                .with_context(|| format!("loading checkpoint {}", place.resume_checkpoint))?;
            self.last_applied = place.next_step.saturating_sub(1);
        }
        Ok(())
    }

    fn generation_loop(&mut self, place: &v1::JoinResponse) -> Result<Exit> {
        let s = self.session.as_ref().context("session")?;
        let timeout = Duration::from_secs_f64(s.cfg.cluster.collective_timeout_s);
        // Beats from the Join on: forming the ring or receiving the state can outlast the
        // heartbeat timeout (a peer that does not answer is waited for up to `timeout`).
        let every = Duration::from_secs_f64(s.cfg.cluster.heartbeat_interval_s);
        let beat = Arc::new(Beat::default());
        let _beats = AbortOnDrop(self.spawn_heartbeats(place.generation, every, beat.clone()));
        // The answer names only the peer this rank dials (its right neighbour); the ring's
        // other addresses are never used here.
        anyhow::ensure!(
            place.world_size <= 1 << 20,
            "the coordinator placed this worker in a world of {} ranks",
            place.world_size
        );
        let mut peers = vec![String::new(); place.world_size as usize];
        for p in &place.peers {
            if let Some(slot) = peers.get_mut(p.rank as usize) {
                slot.clone_from(&p.collective_addr);
            }
        }
        let ring_opts = RingOptions {
            timeout,
            dtype: s.cfg.cluster.allreduce_dtype,
            generation: place.generation,
            transport: s.cfg.cluster.transport,
            key: RingKey::from_token(&self.opts.token),
            ..RingOptions::default()
        };
        let use_nccl = s.gpu.nccl;
        let listener = self.listener.try_clone()?;
        crate::fault::point("ring");
        let mut ring =
            match RingCollective::connect(place.rank as usize, &peers, listener, ring_opts) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("forming the ring failed: {e}");
                    self.report(place, &e);
                    return Ok(Exit::Regroup);
                }
            };
        // GPU workers: this generation's NCCL group, its id handed out over the ring.
        let mut nccl = None;
        if let (true, Device::Cuda(gpu)) = (use_nccl, self.opts.device) {
            match gpu::nccl_group(&mut ring, gpu, timeout) {
                Ok(c) => nccl = Some(c),
                Err(e) => {
                    tracing::warn!("forming the NCCL group failed: {e}");
                    self.report(place, &e);
                    return Ok(Exit::Regroup);
                }
            }
        }
        let coll: &mut dyn Collective = match nccl.as_mut() {
            Some(c) => c,
            None => &mut ring,
        };
        if place.needs_state {
            let s = self.session.as_mut().context("session")?;
            if let Err(e) = state::broadcast(&mut s.trainer, coll, place.state_source_rank as usize)
            {
                tracing::warn!("state broadcast failed: {e}");
                self.report(place, &e);
                return Ok(Exit::Regroup);
            }
            self.last_applied = place.next_step.saturating_sub(1);
            tracing::info!(from = place.state_source_rank, "received the run's state");
        }
        // The model is now this generation's (loaded, received, or already its state).
        self.state_generation = place.generation;
        let s = self.session.as_mut().context("session")?;
        s.trainer.set_step(place.next_step.saturating_sub(1));
        self.step_loop(place, coll, &beat)
    }

    /// Heartbeats on the runtime: a stale answer ends the generation for the step loop, a
    /// finished run ends it for good. They carry how long this worker waits on its store. A
    /// beat is skipped when a step call was answered within the period: the coordinator took
    /// that as a sign of life, and at thousands of workers heartbeats would be a third of its
    /// RPCs (bench/README-coordinator.md). A worker stuck on its store makes no step calls, so
    /// its beats (and its store wait) go out.
    fn spawn_heartbeats(
        &self,
        generation: u64,
        every: Duration,
        beat: Arc<Beat>,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let id = self.opts.worker_id.clone();
        self.rt.spawn(async move {
            loop {
                if client.answered_within(every) {
                    tokio::time::sleep(every).await;
                    continue;
                }
                let req = v1::HeartbeatRequest {
                    worker_id: id.clone(),
                    generation,
                    store_wait_s: ferroclip_shards::retry::waiting_s(),
                };
                match client.heartbeat(req).await {
                    Err(CallError::Stale(_)) => {
                        beat.over.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(r) if r.stop => {
                        beat.finished.store(true, Ordering::Relaxed);
                        return;
                    }
                    _ => {}
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    fn step_loop(
        &mut self,
        place: &v1::JoinResponse,
        coll: &mut dyn Collective,
        beat: &Beat,
    ) -> Result<Exit> {
        let (gen, rank) = (place.generation, place.rank);
        let mut step = place.next_step;
        let mut ahead = Ahead::none();
        // The first steps' samples, answered with the Join (where they were assignable).
        let mut carried = place.first_steps.clone();
        let mut carried_for = |step: u64| {
            let i = carried.iter().position(|r| r.step == step)?;
            Some(carried.swap_remove(i))
        };
        // The previous step's report, in flight: its answer carries step + 1's samples.
        let mut report: Option<Commit> = None;
        loop {
            if beat.over.load(Ordering::Relaxed) || beat.finished.load(Ordering::Relaxed) {
                return Ok(Exit::Regroup);
            }
            if self.opts.stop.load(Ordering::Relaxed) {
                self.settle(report.take());
                self.leave("SIGTERM")?;
                return Ok(Exit::Done);
            }
            let started = Instant::now();
            let _step_span = tracing::info_span!("step", step, generation = gen, rank).entered();
            let data_span = tracing::info_span!("data_wait").entered();
            let fetcher = self.fetcher(gen)?;
            // The batch the previous step loaded ahead, or (first step, or the lookahead was
            // refused because a slower rank had not committed yet) load it now.
            let next = match (ahead.take(step), carried_for(step)) {
                (Some(n), _) => n,
                (None, Some(resp)) => fetcher.load(resp)?,
                (None, None) => fetcher.fetch(step)?,
            };
            let (global_batch, refs, batch) = match next {
                // A regroup or the end answered for this step: every rank ran the steps
                // before it (they were assigned), none runs this one.
                Next::Regroup => {
                    self.settle(report.take());
                    return Ok(Exit::Regroup);
                }
                Next::End => {
                    self.settle(report.take());
                    return self.finish(place, step - 1, beat);
                }
                Next::Batch {
                    global_batch,
                    refs,
                    batch,
                } => (global_batch, refs, batch),
            };
            // The coordinator assigns steps ahead of the committed one: step + 1's samples are
            // fetched, decoded and copied to the device while this step computes, as soon as
            // the previous step's report is answered.
            ahead = Ahead::start(fetcher, step + 1, carried_for(step + 1), report.clone());
            let data_wait_s = started.elapsed().as_secs_f64();
            drop(data_span);
            let at = StepInfo {
                worker_id: &self.opts.worker_id,
                generation: gen,
                rank,
                world_size: place.world_size,
                step,
                started,
                data_wait_s,
            };
            let s = self.session.as_mut().context("session")?;
            let req = match s.train_step(&at, global_batch, &refs, &batch, coll)? {
                // The step after next rides on the report: one call per step, not two
                // (at thousands of ranks the coordinator's core is the limit).
                Outcome::Applied(req) => v1::CommitStepRequest {
                    next_step: step + 2,
                    ..req
                },
                Outcome::Abandoned(ce) => {
                    tracing::warn!(step, "step abandoned: {ce}");
                    self.report(place, &ce);
                    return Ok(Exit::Regroup);
                }
            };
            self.last_applied = step;
            // The previous report is answered by now (it had this step's time); reports go
            // in step order. A stale one: the generation is over (this step is applied, and
            // the next Join says so).
            if let Some(prev) = report.take() {
                match &*prev.wait(self.rt.handle()) {
                    Ok(_) => {}
                    Err(CallError::Stale(_)) => return Ok(Exit::Regroup),
                    Err(e) => anyhow::bail!("reporting step {}: {e}", step - 1),
                }
            }
            let delay = stagger::report_delay(rank, place.world_size, started.elapsed());
            report = Some(Commit::send(
                self.rt.handle(),
                self.client.clone(),
                req,
                delay,
            ));
            let every = self
                .session
                .as_ref()
                .map_or(0, |s| s.cfg.checkpoint.every_steps);
            if rank == 0 && every > 0 && step.is_multiple_of(every) {
                self.checkpoint(gen, step)?;
            }
            step += 1;
        }
    }

    /// Waits for the report in flight when the step loop ends: the coordinator hears of every
    /// step applied (a stale answer changes nothing: the next Join carries the step).
    fn settle(&self, report: Option<Commit>) {
        if let Some(r) = report {
            if let Err(e) = &*r.wait(self.rt.handle()) {
                tracing::debug!("the last step report was not taken: {e}");
            }
        }
    }

    fn fetcher(&self, generation: u64) -> Result<Fetcher> {
        Ok(Fetcher {
            client: self.client.clone(),
            rt: self.rt.handle().clone(),
            loader: self.session.as_ref().context("session")?.loader.clone(),
            worker_id: self.opts.worker_id.clone(),
            device: self.opts.device,
            generation,
        })
    }

    fn report(&self, place: &v1::JoinResponse, err: &crate::collective::CollectiveError) {
        let Some(peer) = err.suspect() else {
            return;
        };
        let req = v1::ReportFailureRequest {
            worker_id: self.opts.worker_id.clone(),
            generation: place.generation,
            suspect_rank: peer as u32,
            reason: err.to_string(),
        };
        if let Err(e) = self.rt.block_on(self.client.report_failure(req)) {
            tracing::debug!("failure report not taken: {e}");
        }
    }
}

impl Session {
    /// The model, data pipeline and audit log for the run's config, on this worker's device.
    fn build(
        cfg: RunConfig,
        place: &v1::JoinResponse,
        opts: &JoinOptions,
        rt: tokio::runtime::Handle,
    ) -> Result<Self> {
        // The device must fit the run's backend before anything is opened or built.
        let plan = gpu::plan(opts.device, &cfg)?;
        if plan.nccl {
            crate::collective::nccl::probe().context("cluster.backend = \"nccl\"")?;
        }
        let store = pipeline::run_store(&cfg, &opts.store);
        let (loader, _) = pipeline::train_loader(&cfg, &store)?;
        // The coordinator's ledger says how long the run is (the LR schedule's length).
        let mut trainer = Trainer::new(&cfg, place.total_steps)?;
        if opts.device != Device::Cpu {
            trainer.to_device(opts.device);
        }
        if plan.autocast_bf16 {
            crate::device::set_autocast_bf16().context("optim.precision: bf16 autocast")?;
            trainer.set_autocast(true);
        }
        tracing::info!(device = ?opts.device, nccl = plan.nccl, bf16_autocast = plan.autocast_bf16, "model built");
        let audit = if cfg.run.audit {
            Some(Audit::open(&cfg.run.dir, &opts.worker_id, &store, rt)?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            store,
            trainer,
            gpu: plan,
            loader: Arc::new(loader),
            audit,
            tensorboard: None,
            last_checkpoint: None,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
