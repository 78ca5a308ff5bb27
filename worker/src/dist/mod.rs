//! Distributed training: `ferroclip-worker join`. Joins the coordinator, forms the ring with its
//! peers, and loops over steps: samples from the coordinator → batch → gradients over the global
//! batch → optimizer → CommitStep. On a collective failure or a generation change it abandons
//! the uncommitted step (no update happened) and re-joins keeping its in-memory state.

pub mod audit;
pub mod cli;
pub mod client;
pub mod fault;
pub mod gpu;
pub mod tensorboard;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1;
use tch::Device;

use crate::collective::ring::{RingCollective, RingOptions, WireDtype};
use crate::collective::Collective;
use crate::data::{ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};
use crate::model::ModelConfig;
use crate::train::{TrainError, Trainer};
use audit::{Audit, Record};
use client::{CallError, Client};

/// How this worker reaches the run.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub coordinator: String,
    pub token: String,
    pub worker_id: String,
    pub device: Device,
    pub device_name: String,
    /// Port for ring connections (0 = any free port).
    pub collective_port: u16,
    /// Host peers use to reach this worker.
    pub advertise_host: String,
    pub store: ferroclip_shards::StoreOptions,
    /// Set by SIGTERM: finish or abandon the current step, Leave, exit 0.
    pub stop: Arc<AtomicBool>,
}

/// Why the inner step loop ended.
enum Exit {
    /// Join again (generation over, collective failure).
    Regroup,
    /// The run is over or this worker was asked to stop.
    Done,
}

struct Worker {
    opts: JoinOptions,
    rt: tokio::runtime::Runtime,
    client: Client,
    listener: TcpListener,
    collective_addr: String,
    trainer: Option<Trainer>,
    /// Backend and precision for this device (set with the trainer).
    plan: Option<gpu::Plan>,
    loader: Option<Arc<Loader>>,
    audit: Option<Audit>,
    last_applied: u64,
    generation: u64,
    /// Rank 0's TensorBoard event file, opened the first time this worker is rank 0
    /// (`Some(None)`: opening failed, already reported).
    tensorboard: Option<Option<tensorboard::EventWriter>>,
}

pub fn run(opts: JoinOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = {
        let _ctx = rt.enter();
        Client::new(&opts.coordinator, &opts.token, Duration::from_secs(120))?
    };
    let listener = TcpListener::bind(("0.0.0.0", opts.collective_port))
        .with_context(|| format!("binding the collective port {}", opts.collective_port))?;
    let collective_addr = format!("{}:{}", opts.advertise_host, listener.local_addr()?.port());
    let mut w = Worker {
        opts,
        rt,
        client,
        listener,
        collective_addr,
        trainer: None,
        plan: None,
        loader: None,
        audit: None,
        last_applied: 0,
        generation: 0,
        tensorboard: None,
    };
    w.main_loop()
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
                "joined"
            );
            let cfg = RunConfig::parse(&place.run_config_toml, "coordinator's run config")?;
            self.prepare(&cfg, &place)?;
            match self.generation_loop(&cfg, &place)? {
                Exit::Regroup => continue,
                Exit::Done => return Ok(()),
            }
        }
    }

    /// Builds the model and data pipeline once; loads a checkpoint when the coordinator says so.
    fn prepare(&mut self, cfg: &RunConfig, place: &v1::JoinResponse) -> Result<()> {
        if self.trainer.is_none() {
            // The device must fit the run's backend before anything is opened or built.
            let plan = gpu::plan(self.opts.device, cfg)?;
            if plan.nccl {
                crate::collective::nccl::probe().context("cluster.backend = \"nccl\"")?;
            }
            let ctx = ModelConfig::from_section(&cfg.model)?;
            let tokenizer = Arc::new(Tokenizer::from_config(
                &cfg.data.tokenizer,
                ctx.context_length as usize,
            )?);
            let mut transform = ImageTransform::train(ctx.image_size, cfg.run.seed);
            transform.scale = (cfg.data.crop_scale[0], cfg.data.crop_scale[1]);
            let loader = Loader::open(
                &cfg.data.root,
                &self.opts.store,
                &cfg.data.train_split,
                transform,
                tokenizer,
                &LoaderOptions {
                    threads: cfg.data.decode_threads as usize,
                    prefetch_blocks: cfg.data.prefetch_blocks.max(1) as usize,
                    ..LoaderOptions::default()
                },
            )?;
            let total_steps = if cfg.run.steps > 0 {
                cfg.run.steps
            } else {
                let rows: u64 = loader.block_rows().iter().map(|&r| r as u64).sum();
                (rows * cfg.run.epochs as u64).div_ceil(cfg.optim.global_batch.max(1) as u64)
            };
            let mut trainer = Trainer::new(cfg, total_steps)?;
            if self.opts.device != Device::Cpu {
                trainer.to_device(self.opts.device);
            }
            if plan.autocast_bf16 {
                crate::gpu_check::set_autocast_bf16().context("optim.precision: bf16 autocast")?;
                trainer.set_autocast(true);
            }
            tracing::info!(device = ?self.opts.device, nccl = plan.nccl, bf16_autocast = plan.autocast_bf16, "model built");
            self.plan = Some(plan);
            if cfg.run.audit {
                let dir = PathBuf::from(&cfg.run.dir).join("audit");
                self.audit = Some(Audit::open(&dir, &self.opts.worker_id)?);
            }
            self.trainer = Some(trainer);
            self.loader = Some(Arc::new(loader));
        }
        if !place.resume_checkpoint.is_empty() {
            let trainer = self.trainer.as_mut().context("trainer")?;
            load_checkpoint(trainer, &place.resume_checkpoint)
                .with_context(|| format!("loading checkpoint {}", place.resume_checkpoint))?;
            self.last_applied = place.next_step.saturating_sub(1);
        }
        Ok(())
    }

    fn generation_loop(&mut self, cfg: &RunConfig, place: &v1::JoinResponse) -> Result<Exit> {
        let peers: Vec<String> = place
            .peers
            .iter()
            .map(|p| p.collective_addr.clone())
            .collect();
        let ring_opts = RingOptions {
            timeout: ring_opts_timeout(cfg),
            dtype: if cfg.cluster.allreduce_dtype == "bf16" {
                WireDtype::Bf16
            } else {
                WireDtype::F32
            },
            generation: place.generation,
            transport: cfg.cluster.transport.parse().map_err(anyhow::Error::msg)?,
            ..RingOptions::default()
        };
        let listener = self.listener.try_clone()?;
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
        if let (Some(true), Device::Cuda(gpu)) = (self.plan.map(|p| p.nccl), self.opts.device) {
            match gpu::nccl_group(&mut ring, gpu, ring_opts_timeout(cfg)) {
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
            let trainer = self.trainer.as_mut().context("trainer")?;
            if let Err(e) = broadcast_state(trainer, coll, place.state_source_rank as usize) {
                tracing::warn!("state broadcast failed: {e}");
                self.report(place, &e);
                return Ok(Exit::Regroup);
            }
            self.last_applied = place.next_step.saturating_sub(1);
            tracing::info!(from = place.state_source_rank, "received the run's state");
        }
        let trainer = self.trainer.as_mut().context("trainer")?;
        trainer.set_step(place.next_step.saturating_sub(1));

        // Heartbeats on the runtime; a stale answer ends the generation for the step loop.
        let over = Arc::new(AtomicBool::new(false));
        let hb_gen = Arc::new(AtomicU64::new(place.generation));
        let hb = {
            let client = self.client.clone();
            let over = over.clone();
            let id = self.opts.worker_id.clone();
            let every = Duration::from_secs_f64(cfg.cluster.heartbeat_interval_s.max(0.05));
            self.rt.spawn(async move {
                loop {
                    let req = v1::HeartbeatRequest {
                        worker_id: id.clone(),
                        generation: hb_gen.load(Ordering::Relaxed),
                    };
                    if let Err(CallError::Stale(_)) = client.heartbeat(req).await {
                        over.store(true, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        let result = self.step_loop(cfg, place, coll, &over);
        hb.abort();
        result
    }

    fn step_loop(
        &mut self,
        cfg: &RunConfig,
        place: &v1::JoinResponse,
        coll: &mut dyn Collective,
        over: &AtomicBool,
    ) -> Result<Exit> {
        let gen = place.generation;
        let rank = place.rank;
        let mut step = place.next_step;
        let mut ahead = Ahead(None);
        loop {
            if over.load(Ordering::Relaxed) {
                return Ok(Exit::Regroup);
            }
            if self.opts.stop.load(Ordering::Relaxed) {
                self.leave("SIGTERM")?;
                return Ok(Exit::Done);
            }
            let t0 = Instant::now();
            // Spans of the step and its parts (exported over OTLP when it is configured).
            let _step_span = tracing::info_span!("step", step, generation = gen, rank).entered();
            let data_span = tracing::info_span!("data_wait").entered();
            let fetcher = self.fetcher(gen)?;
            // The batch the previous step loaded ahead, or (first step, or the lookahead was
            // refused because a slower rank had not committed yet) load it now.
            let early = match ahead.take().map(|h| h.join()) {
                Some(Ok(Ok(n))) => Some(n),
                Some(Ok(Err(e))) => {
                    tracing::debug!(step, "lookahead fetch not taken: {e:#}");
                    None
                }
                Some(Err(_)) => {
                    tracing::warn!(step, "the lookahead thread panicked");
                    None
                }
                None => None,
            };
            let next = match early {
                Some(n) => n,
                None => fetcher.fetch(step)?,
            };
            let (global_batch, refs, batch) = match next {
                Next::Regroup => return Ok(Exit::Regroup),
                Next::End => {
                    self.finish(cfg, place, step - 1)?;
                    return Ok(Exit::Done);
                }
                Next::Batch {
                    global_batch,
                    refs,
                    batch,
                } => (global_batch, refs, batch),
            };
            // The coordinator assigns steps ahead of the committed one: step + 1's samples are
            // fetched, decoded and copied to the device while this step computes.
            ahead = Ahead(Some(std::thread::spawn(move || fetcher.fetch(step + 1))));
            let data_wait = t0.elapsed().as_secs_f64();
            drop(data_span);
            if let Some(a) = self.audit.as_mut() {
                a.write(&Record::Fed {
                    generation: gen,
                    step,
                    rank,
                    keys: batch.keys.clone(),
                })?;
            }
            let trainer = self.trainer.as_mut().context("trainer")?;
            let t1 = Instant::now();
            // forward, backward and the all-reduce run inside the trainer: their times are
            // recorded on this span.
            let compute_span = tracing::info_span!(
                "compute_grads",
                forward_s = tracing::field::Empty,
                backward_s = tracing::field::Empty,
                allreduce_s = tracing::field::Empty
            )
            .entered();
            let losses = match trainer.compute_grads(&batch, global_batch, coll) {
                Ok(l) => l,
                Err(TrainError::Collective(ce)) => {
                    tracing::warn!(step, "step abandoned: {ce}");
                    self.report(place, &ce);
                    return Ok(Exit::Regroup);
                }
                Err(e) => return Err(e.into()),
            };
            let compute = t1.elapsed().as_secs_f64();
            let phases = trainer.last_times;
            compute_span.record("forward_s", phases.forward_s);
            compute_span.record("backward_s", phases.backward_s);
            compute_span.record(
                "allreduce_s",
                (compute - phases.forward_s - phases.backward_s).max(0.0),
            );
            drop(compute_span);
            let t2 = Instant::now();
            let update = tracing::info_span!("optimizer").in_scope(|| trainer.apply_update())?;
            let optimizer_s = t2.elapsed().as_secs_f64();
            fault::point("applied");
            self.last_applied = step;
            if let Some(a) = self.audit.as_mut() {
                let checksum = trainer_checksum(self.trainer.as_ref());
                a.write(&Record::Applied {
                    generation: gen,
                    step,
                    checksum,
                })?;
            }
            let mut metrics: Vec<(String, f64)> = vec![
                ("loss/total".into(), losses.total),
                ("lr".into(), update.lr),
                ("grad_norm".into(), update.grad_norm),
                (
                    "logit_scale".into(),
                    trainer_logit_scale(self.trainer.as_ref()),
                ),
            ];
            let o = &cfg.objectives;
            for (name, w, v) in [
                ("loss/contrastive", o.contrastive, losses.contrastive),
                ("loss/mlm", o.mlm, losses.mlm),
                ("loss/mae", o.mae, losses.mae),
            ] {
                if w > 0.0 {
                    metrics.push((name.into(), v));
                }
            }
            metrics.push(("time/step_s".into(), t0.elapsed().as_secs_f64()));
            metrics.push(("time/data_wait_s".into(), data_wait));
            metrics.push(("time/compute_s".into(), compute));
            metrics.push(("time/forward_s".into(), phases.forward_s));
            metrics.push(("time/backward_s".into(), phases.backward_s));
            metrics.push(("time/optimizer_s".into(), optimizer_s));
            if place.world_size > 1 {
                // compute_grads = forward + backward + the gradient all-reduce.
                let allreduce_s = (compute - phases.forward_s - phases.backward_s).max(0.0);
                let n = place.world_size as f64;
                let bytes = grad_bytes(self.trainer.as_ref()) as f64;
                metrics.push(("time/allreduce_s".into(), allreduce_s));
                metrics.push(("allreduce/bytes".into(), bytes));
                if allreduce_s > 0.0 {
                    let busbw = bytes * 2.0 * (n - 1.0) / n / allreduce_s;
                    metrics.push(("allreduce/busbw_bytes_per_s".into(), busbw));
                }
            }
            if rank == 0 {
                // A rank without rows reports losses of 0, which are no estimate: left out.
                let scalars: Vec<(String, f64)> = metrics
                    .iter()
                    .filter(|(k, _)| !refs.is_empty() || !k.starts_with("loss/"))
                    .cloned()
                    .collect();
                self.log_scalars(cfg, step, &scalars);
            }
            let req = v1::CommitStepRequest {
                worker_id: self.opts.worker_id.clone(),
                generation: gen,
                step,
                samples: refs.len() as u32,
                metrics: metrics
                    .into_iter()
                    .map(|(name, value)| v1::Metric { name, value })
                    .collect(),
            };
            let committed = tracing::info_span!("commit")
                .in_scope(|| self.rt.block_on(self.client.commit_step(req)));
            match committed {
                Ok(_) => {}
                Err(CallError::Stale(_)) => return Ok(Exit::Regroup),
                Err(e) => return Err(e.into()),
            }
            let every = cfg.checkpoint.every_steps;
            if rank == 0 && every > 0 && step.is_multiple_of(every) {
                self.checkpoint(cfg, gen, step)?;
            }
            step += 1;
        }
    }

    fn fetcher(&self, generation: u64) -> Result<Fetcher> {
        Ok(Fetcher {
            client: self.client.clone(),
            rt: self.rt.handle().clone(),
            loader: self.loader.clone().context("loader")?,
            worker_id: self.opts.worker_id.clone(),
            device: self.opts.device,
            generation,
        })
    }

    /// Rank 0 writes the final checkpoint; everyone leaves.
    fn finish(&mut self, cfg: &RunConfig, place: &v1::JoinResponse, last_step: u64) -> Result<()> {
        if place.rank == 0 && last_step > 0 {
            self.checkpoint(cfg, place.generation, last_step)?;
        }
        self.leave("finished")
    }

    fn checkpoint(&mut self, cfg: &RunConfig, generation: u64, step: u64) -> Result<()> {
        let _span = tracing::info_span!("checkpoint", step).entered();
        let trainer = self.trainer.as_ref().context("trainer")?;
        let url = save_checkpoint(trainer, cfg, step).with_context(|| {
            format!(
                "writing the checkpoint of step {step} under {}",
                cfg.run.dir
            )
        })?;
        let req = v1::CommitCheckpointRequest {
            worker_id: self.opts.worker_id.clone(),
            generation,
            step,
            url,
        };
        match self.rt.block_on(self.client.commit_checkpoint(req)) {
            Ok(()) | Err(CallError::Stale(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Rank 0's scalars to TensorBoard; a failing disk must not stop training.
    fn log_scalars(&mut self, cfg: &RunConfig, step: u64, metrics: &[(String, f64)]) {
        let writer = self.tensorboard.get_or_insert_with(|| {
            let dir = tensorboard::events_dir(&cfg.run.dir)
                .map_err(|e| tracing::warn!("no TensorBoard events: {e}"))
                .ok()?;
            tensorboard::EventWriter::create(&dir, &self.opts.worker_id)
                .map_err(|e| tracing::warn!("no TensorBoard events in {}: {e}", dir.display()))
                .ok()
        });
        if let Some(w) = writer {
            if let Err(e) = w.scalars(step, metrics) {
                tracing::warn!("TensorBoard event write failed: {e}");
            }
        }
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

    fn leave(&self, reason: &str) -> Result<()> {
        let req = v1::LeaveRequest {
            worker_id: self.opts.worker_id.clone(),
            generation: self.generation,
            reason: reason.into(),
        };
        // Leaving is a courtesy (missed heartbeats say the same, later): never outwait a pod's
        // termination grace period retrying it against a coordinator that is gone.
        // The timer must be created inside the runtime.
        let call = async { tokio::time::timeout(LEAVE_TIMEOUT, self.client.leave(req)).await };
        match self.rt.block_on(call) {
            Ok(Ok(())) | Ok(Err(CallError::Stale(_))) => Ok(()),
            Ok(Err(e)) => bail!("leaving the run: {e}"),
            Err(_) => {
                tracing::warn!(
                    "the coordinator did not answer Leave within {LEAVE_TIMEOUT:?}; exiting anyway"
                );
                Ok(())
            }
        }
    }
}

const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the coordinator says of a step, with its batch loaded.
enum Next {
    Regroup,
    End,
    Batch {
        global_batch: usize,
        refs: Vec<SampleRef>,
        batch: crate::data::Batch,
    },
}

/// Asks for a step's samples and loads them; runs on the step loop or on a lookahead thread.
struct Fetcher {
    client: Client,
    rt: tokio::runtime::Handle,
    loader: Arc<Loader>,
    worker_id: String,
    device: Device,
    generation: u64,
}

impl Fetcher {
    fn fetch(&self, step: u64) -> Result<Next> {
        let req = v1::NextStepRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step,
        };
        let resp = match self.rt.block_on(self.client.next_step(req)) {
            Ok(r) => r,
            Err(CallError::Stale(_)) => return Ok(Next::Regroup),
            Err(e) => return Err(e.into()),
        };
        if resp.regroup {
            return Ok(Next::Regroup);
        }
        if resp.end_of_run {
            return Ok(Next::End);
        }
        self.loader.prefetch(&resp.prefetch_blocks);
        if let Some(first) = resp.samples.first() {
            self.loader.set_epoch(first.epoch as u64);
        }
        let refs: Vec<SampleRef> = resp
            .samples
            .iter()
            .map(|s| SampleRef {
                block: s.block,
                row: s.row,
            })
            .collect();
        fault::point("load");
        let batch = self.loader.load(&refs)?.to_device(self.device)?;
        Ok(Next::Batch {
            global_batch: resp.global_batch as usize,
            refs,
            batch,
        })
    }
}

/// The lookahead thread; waited for when the step loop ends, so no fetch outlives its generation.
struct Ahead(Option<std::thread::JoinHandle<Result<Next>>>);

impl Ahead {
    fn take(&mut self) -> Option<std::thread::JoinHandle<Result<Next>>> {
        self.0.take()
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

fn ring_opts_timeout(cfg: &RunConfig) -> Duration {
    Duration::from_secs_f64(cfg.cluster.collective_timeout_s)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A cheap fingerprint of the parameters: equal on ranks that applied the same updates.
fn trainer_checksum(trainer: Option<&Trainer>) -> f64 {
    let Some(t) = trainer else { return f64::NAN };
    t.model
        .params
        .iter()
        .map(|(_, p)| {
            p.to_kind(tch::Kind::Double)
                .sum(tch::Kind::Double)
                .double_value(&[])
        })
        .sum()
}

/// Bytes of gradient each all-reduce moves (f32 parameters that train).
fn grad_bytes(trainer: Option<&Trainer>) -> u64 {
    let Some(t) = trainer else { return 0 };
    t.model
        .params
        .iter()
        .filter(|(_, p)| p.requires_grad())
        .map(|(_, p)| p.numel() as u64 * 4)
        .sum()
}

fn trainer_logit_scale(trainer: Option<&Trainer>) -> f64 {
    trainer
        .map(|t| t.model.logit_scale.double_value(&[]).exp())
        .unwrap_or(f64::NAN)
}

/// Every rank takes `root`'s parameters, optimizer state and step counter.
fn broadcast_state(
    trainer: &mut Trainer,
    coll: &mut dyn Collective,
    root: usize,
) -> std::result::Result<(), crate::collective::CollectiveError> {
    let _guard = tch::no_grad_guard();
    for mut t in trainer.state_tensors() {
        coll.broadcast(&mut t, root)?;
    }
    let device = trainer.model.logit_scale.device();
    let mut step = tch::Tensor::from_slice(&[trainer.step() as f64]).to_device(device);
    coll.broadcast(&mut step, root)?;
    trainer.set_step(step.double_value(&[0]) as u64);
    Ok(())
}

fn save_checkpoint(trainer: &Trainer, cfg: &RunConfig, step: u64) -> Result<String> {
    let dir = PathBuf::from(&cfg.run.dir).join("checkpoints");
    let state = crate::checkpoint::TrainerState {
        step,
        epoch: 0,
        cursor: 0,
        seed: cfg.run.seed,
        model: trainer.model.config.clone(),
        config: cfg.to_toml(),
    };
    // keep = 0: the coordinator prunes, because only it knows which checkpoints are recorded.
    let path = crate::checkpoint::save(&dir, trainer, &state, 0)?;
    Ok(path.to_string_lossy().to_string())
}

fn load_checkpoint(trainer: &mut Trainer, url: &str) -> Result<()> {
    let state = crate::checkpoint::load(std::path::Path::new(url), trainer)?;
    trainer.set_step(state.step);
    Ok(())
}
