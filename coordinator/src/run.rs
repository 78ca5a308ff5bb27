//! The state of one run: membership + sample ledger + checkpoints + metrics, and the rules that
//! tie them together. The gRPC service (`service.rs`) is a thin layer over these methods.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1;
use tonic::Status;

use crate::journal::{CheckpointRecord, Snapshot, FORMAT_VERSION};
use crate::ledger::Ledger;
use crate::membership::{Limits, Member, Membership, Phase, WorkerInfo};

/// Pending (assigned, uncommitted) steps at most. Workers load step s + 1 while step s runs;
/// a rank that committed s may already ask for s + 2 while a slower peer has not reported s
/// yet, hence 3.
const LOOKAHEAD: usize = 3;
const HISTORY: usize = 2000;
const EVENTS: usize = 500;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub unix_s: f64,
    pub kind: String,
    pub message: String,
}

/// Per-step metrics after a commit: means over ranks, samples summed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub unix_s: f64,
    pub samples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// A worker's figures from its last CommitStep (seconds, bytes per second).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStats {
    pub step: u64,
    pub step_time_s: f64,
    pub data_wait_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub allreduce_s: f64,
    pub optimizer_s: f64,
    pub allreduce_busbw: f64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counters {
    pub worker_deaths: u64,
    pub recoveries: u64,
    pub last_recovery_s: f64,
    pub rejected_rpcs: u64,
    pub generations: u64,
}

pub struct Run {
    pub config: RunConfig,
    pub config_toml: String,
    pub ledger: Ledger,
    pub members: Membership,
    pub checkpoints: Vec<CheckpointRecord>,
    /// Checkpoints written for steps not yet committed.
    pending_checkpoints: Vec<(u64, String)>,
    /// step → ranks that reported it, this generation.
    reports: BTreeMap<u64, BTreeSet<u32>>,
    /// step → (samples, metrics) of each rank that reported it.
    rank_metrics: BTreeMap<u64, Vec<(u32, Vec<v1::Metric>)>>,
    placements: HashMap<String, v1::JoinResponse>,
    pub worker_stats: HashMap<String, WorkerStats>,
    pub history: VecDeque<StepRecord>,
    pub events: VecDeque<Event>,
    pub counters: Counters,
    /// When the last failure ended a generation (for recovery time).
    failure_at: Option<Instant>,
    /// When the newest checkpoint was recorded (checkpoint age).
    pub last_checkpoint_at: Option<Instant>,
    pub started: Instant,
    epoch_len: u64,
    pub block_count: u32,
    /// Ctrl-C / SIGTERM: end the run at the next step boundary.
    stop_requested: bool,
    /// Ranks of the current generation (members who leave a finishing run still count).
    generation_world: usize,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Run {
    pub fn new(config: RunConfig, block_rows: Vec<u32>) -> Self {
        let c = &config.cluster;
        let limits = Limits {
            min_workers: c.min_workers,
            max_workers: c.max_workers,
            settle: Duration::from_secs_f64(c.settle_s),
            rejoin_timeout: Duration::from_secs_f64(c.heartbeat_timeout_s),
        };
        let epochs = (config.run.steps == 0).then_some(config.run.epochs);
        let block_count = block_rows.len() as u32;
        let mut ledger = Ledger::new(
            config.run.seed,
            config.data.shuffle_window_blocks,
            block_rows,
            epochs,
        );
        let epoch_len = ledger.epoch_len();
        Self {
            config_toml: config.to_toml(),
            config,
            ledger,
            members: Membership::new(limits, 0),
            checkpoints: Vec::new(),
            pending_checkpoints: Vec::new(),
            reports: BTreeMap::new(),
            rank_metrics: BTreeMap::new(),
            placements: HashMap::new(),
            worker_stats: HashMap::new(),
            history: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            failure_at: None,
            last_checkpoint_at: None,
            started: Instant::now(),
            epoch_len,
            block_count,
            stop_requested: false,
            generation_world: 0,
        }
    }

    /// Ends the run at the next step boundary: rank 0 checkpoints, everyone leaves.
    pub fn request_stop(&mut self) {
        self.stop_requested = true;
        if self.members.phase() == Phase::Forming {
            self.members.set_phase(Phase::Finished);
        }
        self.event(
            "stop",
            "stop requested: finishing at the next step boundary".into(),
        );
    }

    /// Steps the whole run will take, if known.
    pub fn total_steps(&self) -> Option<u64> {
        if self.config.run.steps > 0 {
            return Some(self.config.run.steps);
        }
        let samples = self.epoch_len * self.config.run.epochs as u64;
        Some(samples.div_ceil(self.config.optim.global_batch.max(1) as u64))
    }

    /// Continues from a journal snapshot (coordinator restart or `--resume`).
    pub fn restore(&mut self, snap: Snapshot) {
        self.ledger
            .restore(snap.committed_step, snap.data, snap.pending);
        self.checkpoints = snap.checkpoints;
        self.members = Membership::new(self.limits(), snap.generation);
        if snap.finished {
            self.members.set_phase(Phase::Finished);
        }
        self.event(
            "resume",
            format!(
                "resumed from journal at step {} (generation {})",
                snap.committed_step, snap.generation
            ),
        );
    }

    fn limits(&self) -> Limits {
        let c = &self.config.cluster;
        Limits {
            min_workers: c.min_workers,
            max_workers: c.max_workers,
            settle: Duration::from_secs_f64(c.settle_s),
            rejoin_timeout: Duration::from_secs_f64(c.heartbeat_timeout_s),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            format_version: FORMAT_VERSION,
            run_name: self.config.run.name.clone(),
            generation: self.members.generation(),
            committed_step: self.ledger.committed_step(),
            data: self.ledger.committed_state().clone(),
            pending: self.ledger.pending().cloned().collect(),
            checkpoints: self.checkpoints.clone(),
            finished: self.members.phase() == Phase::Finished,
        }
    }

    pub fn event(&mut self, kind: &str, message: String) {
        tracing::info!(kind, "{message}");
        self.events.push_back(Event {
            unix_s: unix_now(),
            kind: kind.to_string(),
            message,
        });
        while self.events.len() > EVENTS {
            self.events.pop_front();
        }
    }

    pub fn epoch_progress(&self) -> (u32, f64) {
        let state = self.ledger.committed_state();
        let done_before = self.epoch_len * state.epoch as u64;
        let frac = if self.epoch_len == 0 {
            0.0
        } else {
            (state.consumed.saturating_sub(done_before)) as f64 / self.epoch_len as f64
        };
        (state.epoch, frac.min(1.0))
    }

    /// Samples per second over the last steps (one step's rate is noisy).
    pub fn throughput(&self) -> f64 {
        const WINDOW: usize = 20;
        let n = self.history.len();
        if n < 2 {
            return 0.0;
        }
        let first = &self.history[n.saturating_sub(WINDOW + 1)];
        let Some(last) = self.history.back() else {
            return 0.0;
        };
        let dt = last.unix_s - first.unix_s;
        let samples = last.samples_total().saturating_sub(first.samples_total());
        if dt > 0.0 {
            samples as f64 / dt
        } else {
            0.0
        }
    }

    /// Seconds since the newest checkpoint was recorded by this coordinator.
    pub fn checkpoint_age_s(&self) -> Option<f64> {
        self.last_checkpoint_at.map(|t| t.elapsed().as_secs_f64())
    }

    fn member(&self, worker_id: &str, generation: u64) -> Result<&Member, Status> {
        self.members.current(worker_id, generation).ok_or_else(|| {
            Status::failed_precondition(format!(
                "worker {worker_id:?} is not in generation {generation} (current generation {}): join again",
                self.members.generation()
            ))
        })
    }

    // ---- Join / formation ----

    pub fn join(&mut self, info: WorkerInfo, now: Instant) {
        self.placements.remove(&info.worker_id);
        let id = info.worker_id.clone();
        let was_training = self.members.phase() == Phase::Training;
        if self.members.join(info, now) && was_training {
            self.generation_failed(format!("worker {id} re-joined: its generation ended"), now);
        } else {
            self.event("join", format!("worker {id} asks to join"));
        }
    }

    /// The worker's place once its generation has formed.
    pub fn placement(&self, worker_id: &str) -> Option<v1::JoinResponse> {
        self.placements.get(worker_id).cloned()
    }

    /// A Join call went away (the worker died while waiting).
    pub fn abandon_join(&mut self, worker_id: &str, now: Instant) {
        if self.members.phase() == Phase::Forming && !self.placements.contains_key(worker_id) {
            self.members.leave(worker_id, now);
        }
    }

    fn generation_failed(&mut self, why: String, now: Instant) {
        self.counters.worker_deaths += 1;
        self.failure_at.get_or_insert(now);
        self.event("generation-end", why);
    }

    /// Periodic work: dead-worker detection and generation formation. Returns true if a
    /// generation formed (Join callers should look for their placement).
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.members.phase() == Phase::Training {
            let timeout = Duration::from_secs_f64(self.config.cluster.heartbeat_timeout_s);
            if let Some(dead) = self.members.silent(timeout, now).into_iter().next() {
                self.members.end_generation(Some(&dead), now);
                self.generation_failed(
                    format!("worker {dead} missed its heartbeats: declared dead"),
                    now,
                );
            }
        }
        if self.members.phase() == Phase::Forming && self.members.try_form(now).is_some() {
            self.on_formed();
            return true;
        }
        false
    }

    fn on_formed(&mut self) {
        let members: Vec<Member> = self.members.members().to_vec();
        let generation = self.members.generation();
        self.generation_world = members.len();
        self.counters.generations += 1;
        self.reports.clear();
        self.rank_metrics.clear();
        let lineage = members
            .iter()
            .map(|m| m.info.last_applied)
            .max()
            .unwrap_or(0);
        let committed = self.ledger.committed_step();
        let mut resume_checkpoint = String::new();
        if lineage >= committed && (lineage > 0 || committed == 0) {
            // Survivors carry the model: steps they applied are committed, the rest abandoned.
            self.ledger.regroup(lineage);
        } else {
            // Nobody holds the newest state: restart from the latest checkpoint (or the beginning).
            match self.checkpoints.last().cloned() {
                Some(c) => {
                    self.ledger.rollback(c.step, c.data.clone());
                    resume_checkpoint = c.url.clone();
                    self.event(
                        "restore",
                        format!("resuming from checkpoint {} (step {})", c.url, c.step),
                    );
                }
                None => {
                    self.ledger.rollback(0, Default::default());
                    if committed > 0 {
                        self.event("restore", "no checkpoint: restarting from step 0".into());
                    }
                }
            }
        }
        self.pending_checkpoints
            .retain(|(s, _)| *s <= self.ledger.committed_step());
        let next_step = self.ledger.committed_step() + 1;
        let (state_source, needs_state) = if resume_checkpoint.is_empty() {
            let target = self.ledger.committed_step();
            let source = members
                .iter()
                .find(|m| m.info.last_applied == target)
                .map(|m| m.rank)
                .unwrap_or(0);
            let needs = members.iter().any(|m| m.info.last_applied != target);
            (source, needs)
        } else {
            (0, false)
        };
        let peers: Vec<v1::Peer> = members
            .iter()
            .map(|m| v1::Peer {
                rank: m.rank,
                worker_id: m.info.worker_id.clone(),
                collective_addr: m.info.collective_addr.clone(),
            })
            .collect();
        self.placements.clear();
        for m in &members {
            self.placements.insert(
                m.info.worker_id.clone(),
                v1::JoinResponse {
                    generation,
                    rank: m.rank,
                    world_size: members.len() as u32,
                    peers: peers.clone(),
                    run_config_toml: self.config_toml.clone(),
                    next_step,
                    state_source_rank: state_source,
                    needs_state,
                    nccl_unique_id: Vec::new(),
                    resume_checkpoint: resume_checkpoint.clone(),
                },
            );
        }
        let ids: Vec<&str> = members.iter().map(|m| m.info.worker_id.as_str()).collect();
        let msg = format!(
            "generation {generation}: {} workers {:?}, next step {next_step}{}",
            members.len(),
            ids,
            if needs_state {
                format!(", state from rank {state_source}")
            } else {
                String::new()
            }
        );
        self.event("generation", msg);
    }

    // ---- Steps ----

    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        generation: u64,
        now: Instant,
    ) -> Result<v1::HeartbeatResponse, Status> {
        self.member(worker_id, generation)?;
        self.members.touch(worker_id, now);
        Ok(v1::HeartbeatResponse {
            generation_over: false,
            stop: self.members.phase() == Phase::Finished,
        })
    }

    /// Whether the step `step` needs a journal write before it is answered.
    pub fn next_step(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Result<(v1::NextStepResponse, bool), Status> {
        let rank = self.member(worker_id, generation)?.rank;
        self.members.touch(worker_id, now);
        let committed = self.ledger.committed_step();
        if step <= committed {
            return Err(Status::invalid_argument(format!(
                "step {step} is already committed (committed step {committed})"
            )));
        }
        let mut wrote = false;
        if self.ledger.assignment(step).is_none() {
            let next_unassigned = committed + self.ledger.pending().count() as u64 + 1;
            if step != next_unassigned {
                return Err(Status::out_of_range(format!(
                    "step {step} cannot be assigned yet: next assignable step is {next_unassigned}"
                )));
            }
            if self.ledger.pending().count() >= LOOKAHEAD {
                return Err(Status::out_of_range(format!(
                    "step {step} is more than {LOOKAHEAD} steps ahead of the committed step {committed}"
                )));
            }
            let finishing = self.members.phase() == Phase::Finishing || self.stop_requested;
            let limit = self.config.run.steps;
            if finishing || (limit > 0 && step > limit) {
                return Ok((self.end_of_run(step), false));
            }
            if self.members.regroup_requested {
                self.members.end_generation(None, now);
                self.event("regroup", format!("admitting joiners before step {step}"));
                return Ok((
                    v1::NextStepResponse {
                        step,
                        regroup: true,
                        ..Default::default()
                    },
                    false,
                ));
            }
            let world = self.members.world_size();
            let batch = self.config.optim.global_batch;
            if self.ledger.assign_next(world, batch).is_none() {
                return Ok((self.end_of_run(step), false));
            }
            wrote = true;
        }
        let Some(a) = self.ledger.assignment(step).cloned() else {
            return Err(Status::internal("assignment vanished"));
        };
        let spans = a.ranks.get(rank as usize).cloned().unwrap_or_default();
        let mut samples = Vec::new();
        for span in &spans {
            samples.extend(
                self.ledger
                    .span_samples(span)
                    .into_iter()
                    .map(|(epoch, s)| v1::SampleRef {
                        epoch,
                        block: s.block,
                        row: s.row,
                    }),
            );
        }
        let prefetch = self.prefetch_blocks(rank, &a);
        let rank_batches = a.rank_batches();
        Ok((
            v1::NextStepResponse {
                step,
                samples,
                global_batch: rank_batches.iter().sum(),
                end_of_run: false,
                regroup: false,
                prefetch_blocks: prefetch,
                rank_batches,
            },
            wrote,
        ))
    }

    /// Blocks of the chunks `rank` holds after step `a`: what it reads next.
    fn prefetch_blocks(&mut self, rank: u32, a: &crate::ledger::StepAssignment) -> Vec<u32> {
        let held = a.after.leases.get(&rank).cloned().unwrap_or_default();
        let mut blocks = Vec::new();
        for chunk in held {
            let from = a.after.open.get(&chunk).copied().unwrap_or(0);
            let to = self.ledger.chunk_rows(chunk);
            for (_, s) in self
                .ledger
                .span_samples(&crate::ledger::Span { chunk, from, to })
            {
                if !blocks.contains(&s.block) {
                    blocks.push(s.block);
                }
            }
        }
        blocks
    }

    fn end_of_run(&mut self, step: u64) -> v1::NextStepResponse {
        if self.members.phase() == Phase::Training {
            self.members.set_phase(Phase::Finishing);
            self.event(
                "finishing",
                format!("no step {step}: the run's data or step limit is reached"),
            );
        }
        v1::NextStepResponse {
            step,
            end_of_run: true,
            ..Default::default()
        }
    }

    /// Records a rank's report; returns true if the step committed (journal it).
    pub fn commit_step(
        &mut self,
        req: &v1::CommitStepRequest,
        now: Instant,
    ) -> Result<bool, Status> {
        let rank = self.member(&req.worker_id, req.generation)?.rank;
        self.members.touch(&req.worker_id, now);
        if self.ledger.assignment(req.step).is_none() {
            return Err(Status::invalid_argument(format!(
                "step {} is not pending (committed step {})",
                req.step,
                self.ledger.committed_step()
            )));
        }
        let stats = self.worker_stats.entry(req.worker_id.clone()).or_default();
        stats.step = req.step;
        for m in &req.metrics {
            match m.name.as_str() {
                "time/step_s" => stats.step_time_s = m.value,
                "time/data_wait_s" => stats.data_wait_s = m.value,
                "time/forward_s" => stats.forward_s = m.value,
                "time/backward_s" => stats.backward_s = m.value,
                "time/allreduce_s" => stats.allreduce_s = m.value,
                "time/optimizer_s" => stats.optimizer_s = m.value,
                "allreduce/busbw_bytes_per_s" => stats.allreduce_busbw = m.value,
                _ => {}
            }
        }
        self.reports.entry(req.step).or_default().insert(rank);
        self.rank_metrics
            .entry(req.step)
            .or_default()
            .push((req.samples, req.metrics.clone()));
        let world = self.generation_world;
        let all = self.reports.get(&req.step).map(|r| r.len()).unwrap_or(0) == world;
        if !all || !self.ledger.commit(req.step) {
            return Ok(false);
        }
        let samples = self.history_samples();
        let metrics = self.rank_metrics.remove(&req.step).unwrap_or_default();
        self.reports = self.reports.split_off(&(req.step + 1));
        self.record_history(req.step, samples, &metrics, world);
        if let Some(t) = self.failure_at.take() {
            let secs = now.duration_since(t).as_secs_f64();
            self.counters.recoveries += 1;
            self.counters.last_recovery_s = secs;
            self.event(
                "recovered",
                format!("step {} committed {secs:.2}s after the failure", req.step),
            );
        }
        let ready: Vec<(u64, String)> = self
            .pending_checkpoints
            .iter()
            .filter(|(s, _)| *s == req.step)
            .cloned()
            .collect();
        self.pending_checkpoints.retain(|(s, _)| *s > req.step);
        for (step, url) in ready {
            self.record_checkpoint(step, url);
        }
        Ok(true)
    }

    /// Samples of the step just committed.
    fn history_samples(&self) -> u64 {
        let now = self.ledger.committed_state().consumed;
        let before = self.history.back().map(|h| h.samples_total()).unwrap_or(0);
        now.saturating_sub(before)
    }

    fn record_history(
        &mut self,
        step: u64,
        samples: u64,
        ranks: &[(u32, Vec<v1::Metric>)],
        world: usize,
    ) {
        // Losses are local means: weighted by the rank's samples (a rank without rows reports
        // 0, which is no estimate). Everything else (times, lr) is a plain mean over ranks.
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (rows, metrics) in ranks {
            for m in metrics {
                let w = if m.name.starts_with("loss/") {
                    *rows as f64
                } else {
                    1.0
                };
                let e = sums.entry(m.name.clone()).or_default();
                e.0 += w * m.value;
                e.1 += w;
            }
        }
        let mut out: BTreeMap<String, f64> = sums
            .into_iter()
            .filter(|(_, (_, w))| *w > 0.0)
            .map(|(k, (sum, w))| (k, sum / w))
            .collect();
        out.insert(
            "samples_total".into(),
            self.ledger.committed_state().consumed as f64,
        );
        out.insert("workers".into(), world as f64);
        let unix_s = unix_now();
        if let Some(prev) = self.history.back() {
            let dt = unix_s - prev.unix_s;
            if dt > 0.0 {
                out.insert("samples_per_s".into(), samples as f64 / dt);
            }
        }
        self.history.push_back(StepRecord {
            step,
            unix_s,
            samples,
            metrics: out,
        });
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    pub fn report_failure(
        &mut self,
        req: &v1::ReportFailureRequest,
        now: Instant,
    ) -> Result<(), Status> {
        self.member(&req.worker_id, req.generation)?;
        let suspect = self
            .members
            .members()
            .iter()
            .find(|m| m.rank == req.suspect_rank)
            .map(|m| m.info.worker_id.clone());
        let Some(suspect) = suspect else {
            return Err(Status::invalid_argument(format!(
                "no rank {} in generation {}",
                req.suspect_rank, req.generation
            )));
        };
        self.members.end_generation(Some(&suspect), now);
        self.generation_failed(
            format!(
                "worker {} reports rank {} ({suspect}) failed: {}",
                req.worker_id, req.suspect_rank, req.reason
            ),
            now,
        );
        Ok(())
    }

    /// Rank 0 wrote a checkpoint for `step`; it counts once the step is committed.
    pub fn commit_checkpoint(&mut self, req: &v1::CommitCheckpointRequest) -> Result<bool, Status> {
        self.member(&req.worker_id, req.generation)?;
        if req.url.is_empty() {
            return Err(Status::invalid_argument("checkpoint url is empty"));
        }
        if req.step <= self.ledger.committed_step() {
            if req.step != self.ledger.committed_step() {
                return Err(Status::invalid_argument(format!(
                    "checkpoint of step {} is older than the committed step {}",
                    req.step,
                    self.ledger.committed_step()
                )));
            }
            self.record_checkpoint(req.step, req.url.clone());
            return Ok(true);
        }
        self.pending_checkpoints.push((req.step, req.url.clone()));
        Ok(false)
    }

    fn record_checkpoint(&mut self, step: u64, url: String) {
        self.last_checkpoint_at = Some(Instant::now());
        self.checkpoints.push(CheckpointRecord {
            step,
            url: url.clone(),
            data: self.ledger.committed_state().clone(),
        });
        self.event(
            "checkpoint",
            format!("checkpoint of step {step} recorded: {url}"),
        );
    }

    /// Checkpoints beyond the last `keep` (to delete from the store).
    pub fn prune_checkpoints(&mut self) -> Vec<String> {
        let keep = self.config.checkpoint.keep.max(1) as usize;
        if self.checkpoints.len() <= keep {
            return Vec::new();
        }
        let old = self.checkpoints.len() - keep;
        self.checkpoints.drain(..old).map(|c| c.url).collect()
    }

    pub fn leave(&mut self, req: &v1::LeaveRequest, now: Instant) -> Result<(), Status> {
        let phase = self.members.phase();
        if phase != Phase::Forming {
            self.member(&req.worker_id, req.generation)?;
        }
        if phase == Phase::Training {
            self.failure_at.get_or_insert(now);
            self.event(
                "leave",
                format!("worker {} leaves: {}", req.worker_id, req.reason),
            );
        }
        self.members.leave(&req.worker_id, now);
        if self.members.phase() == Phase::Finished && phase != Phase::Finished {
            self.event("finished", "every worker left: the run is finished".into());
        }
        Ok(())
    }

    pub fn status(&self) -> v1::StatusResponse {
        let now = Instant::now();
        let (epoch, progress) = self.epoch_progress();
        let workers = self
            .members
            .members()
            .iter()
            .map(|m| {
                let s = self
                    .worker_stats
                    .get(&m.info.worker_id)
                    .cloned()
                    .unwrap_or_default();
                v1::WorkerStatus {
                    rank: m.rank,
                    worker_id: m.info.worker_id.clone(),
                    host: m.info.host.clone(),
                    device: m.info.device.clone(),
                    seconds_since_heartbeat: now.duration_since(m.last_seen).as_secs_f64(),
                    step_time_s: s.step_time_s,
                    data_wait_s: s.data_wait_s,
                    allreduce_s: s.allreduce_s,
                }
            })
            .collect();
        let metrics = self
            .history
            .back()
            .map(|h| {
                h.metrics
                    .iter()
                    .map(|(k, v)| v1::Metric {
                        name: k.clone(),
                        value: *v,
                    })
                    .collect()
            })
            .unwrap_or_default();
        v1::StatusResponse {
            generation: self.members.generation(),
            step: self.ledger.committed_step(),
            epoch,
            epoch_progress: progress,
            workers,
            metrics,
            state: self.phase_name().into(),
            last_checkpoint: self
                .checkpoints
                .last()
                .map(|c| c.url.clone())
                .unwrap_or_default(),
        }
    }

    pub fn phase_name(&self) -> &'static str {
        match self.members.phase() {
            Phase::Forming => "waiting",
            Phase::Training => "training",
            Phase::Finishing => "finishing",
            Phase::Finished => "finished",
        }
    }

    pub fn finished(&self) -> bool {
        self.members.phase() == Phase::Finished
    }
}

impl StepRecord {
    fn samples_total(&self) -> u64 {
        self.metrics.get("samples_total").copied().unwrap_or(0.0) as u64
    }
}
