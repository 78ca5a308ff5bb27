//! The state of one run: membership + sample ledger + checkpoints, and the rules that tie them
//! together (who trains which step, when a step commits, when the run is over). Pure state
//! over an explicit clock: no I/O, so the gRPC service (`service.rs`) journals what changed
//! outside the lock, and the rules can be unit tested (`run/tests.rs`).
//!
//! The step contract: every step feeds the full global batch (the ledger's), every sample of
//! an epoch is used in exactly one committed step, and every run ends: a death, a join or a
//! restart in the last steps re-forms the generation and the remaining steps run in it; the
//! run is finished only once the final step's checkpoint is recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use ferroclip_plan::{Bound, Ledger, StepAssignment};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1;
use tonic::Status;

use crate::journal::{CheckpointRecord, Identity, Owner, Snapshot, FORMAT_VERSION};
use crate::membership::{Limits, Member, Membership, Phase, WorkerInfo};
use crate::stats::{self, push_bounded, unix_now, EVENTS, HISTORY};
pub use crate::stats::{Counters, Event, StepRecord, WorkerStats};

/// Pending (assigned, uncommitted) steps at most. Workers load step s + 1 while step s runs;
/// a rank that committed s may already ask for s + 2 while a slower peer has not reported s
/// yet, hence 3.
const LOOKAHEAD: usize = 3;

/// What CommitStep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This report completed the step (or a retry found it committed already).
    Step,
    /// Recorded; other ranks have not reported yet (or this was a retried report).
    Waiting,
}

pub struct Run {
    pub config: RunConfig,
    pub config_toml: String,
    pub identity: Identity,
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
    pub worker_stats: stats::WorkerTable,
    pub history: VecDeque<StepRecord>,
    pub events: VecDeque<Event>,
    pub counters: Counters,
    /// When the last failure ended a generation (for recovery time).
    failure_at: Option<Instant>,
    /// When the newest checkpoint was recorded (checkpoint age).
    pub last_checkpoint_at: Option<Instant>,
    pub started: Instant,
    epoch_len: u64,
    /// Steps the run takes (the LR schedule's length; every one a full global batch but the
    /// last of an epoch-limited run).
    total_steps: u64,
    pub block_count: u32,
    /// Ctrl-C / SIGTERM of the launcher: end the run at the next step boundary.
    stop_requested: bool,
    /// Ranks of the current generation.
    generation_world: usize,
    /// Where checkpoints must be (`<run.dir>/checkpoints`): records elsewhere are refused.
    checkpoint_root: String,
}

impl Run {
    pub fn new(config: RunConfig, block_rows: Vec<u32>) -> Self {
        let identity = Identity::new(
            &config.run.name,
            config.run.seed,
            &config.data.root,
            &config.data.train_split,
            &block_rows,
        );
        let block_count = block_rows.len() as u32;
        let mut ledger = Ledger::new(
            config.run.seed,
            config.data.shuffle_window_blocks,
            block_rows,
            Bound::of(config.run.steps, config.run.epochs),
        );
        let epoch_len = ledger.epoch_len();
        let total_steps = ledger.total_steps(config.optim.global_batch);
        let limits = limits(&config);
        Self {
            config_toml: config.to_toml(),
            checkpoint_root: ferroclip_shards::checkpoints::root_url(&config.run.dir),
            config,
            identity,
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
            total_steps,
            block_count,
            stop_requested: false,
            generation_world: 0,
        }
    }

    /// Ends the run at the next step boundary: rank 0 checkpoints, then everyone leaves.
    pub fn request_stop(&mut self) {
        self.stop_requested = true;
        if self.members.phase() == Phase::Forming && self.ledger.committed_step() == 0 {
            self.members.set_phase(Phase::Finished);
        }
        self.event(
            "stop",
            "stop requested: finishing at the next step boundary".into(),
        );
    }

    /// Steps the whole run takes.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// What bounds the run (shown so a step-limited run's epochs make sense).
    pub fn bound(&self) -> Bound {
        self.ledger.bound()
    }

    /// Continues from a journal snapshot (coordinator restart).
    pub fn restore(&mut self, snap: Snapshot) {
        self.ledger
            .restore(snap.committed_step, snap.data, snap.pending);
        self.checkpoints = snap.checkpoints;
        self.last_checkpoint_at = (!self.checkpoints.is_empty()).then(Instant::now);
        self.members = Membership::new(limits(&self.config), snap.generation);
        if snap.finished {
            self.members.set_phase(Phase::Finished);
        }
        self.event(
            "resume",
            format!(
                "resumed from the journal at step {} (generation {})",
                snap.committed_step, snap.generation
            ),
        );
    }

    /// What the journal keeps (the owner and time are the journal's to fill in).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            format_version: FORMAT_VERSION,
            identity: self.identity.clone(),
            owner: Owner {
                host: String::new(),
                pid: 0,
                nonce: 0,
            },
            written_unix_s: 0.0,
            released: false,
            generation: self.members.generation(),
            committed_step: self.ledger.committed_step(),
            data: self.ledger.committed_state().clone(),
            pending: self.ledger.pending().cloned().collect(),
            checkpoints: self.checkpoints.clone(),
            finished: self.finished(),
        }
    }

    pub fn event(&mut self, kind: &str, message: String) {
        tracing::info!(kind, "{message}");
        let e = Event {
            unix_s: unix_now(),
            kind: kind.to_string(),
            message,
        };
        push_bounded(&mut self.events, e, EVENTS);
    }

    /// (epoch, fraction of it used) of the committed data position.
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

    /// Samples per second over the last steps.
    pub fn throughput(&self) -> f64 {
        stats::throughput(&self.history)
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
        let was_running = matches!(self.members.phase(), Phase::Training | Phase::Finishing);
        if self.members.join(info, now) && was_running {
            self.generation_failed(format!("worker {id} re-joined: its generation ended"), now);
        } else {
            self.event("join", format!("worker {id} asks to join"));
        }
    }

    /// The worker's place once its generation has formed.
    pub fn placement(&self, worker_id: &str) -> Option<v1::JoinResponse> {
        self.placements.get(worker_id).cloned()
    }

    /// A retried Join (its answer was lost, or came back UNAVAILABLE while the journal could
    /// not be written): the same worker (same details) is already placed in the current
    /// generation and has not started it (`last_generation` is older). It gets the same place
    /// instead of ending the generation it has not even begun.
    pub fn placed_again(
        &self,
        info: &WorkerInfo,
        last_generation: u64,
    ) -> Option<v1::JoinResponse> {
        let current = self.members.generation();
        let running = matches!(self.members.phase(), Phase::Training | Phase::Finishing);
        let same = self.members.members().iter().any(|m| m.info == *info);
        let p = self.placements.get(&info.worker_id)?;
        (running && same && last_generation < current && p.generation == current).then(|| p.clone())
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

    /// Periodic work: dead-worker detection (in the last steps too) and generation formation.
    /// Returns true if a generation formed (Join callers should look for their placement).
    pub fn tick(&mut self, now: Instant) -> bool {
        if matches!(self.members.phase(), Phase::Training | Phase::Finishing) {
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
                    resume_checkpoint: resume_checkpoint.clone(),
                    total_steps: self.total_steps,
                },
            );
        }
        // Workers that left the run: their figures go.
        let ids: BTreeSet<&str> = members.iter().map(|m| m.info.worker_id.as_str()).collect();
        self.worker_stats.retain(|id, _| ids.contains(id.as_str()));
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
        // A restart can find the last step done and its checkpoint recorded.
        self.maybe_finish();
    }

    // ---- Steps ----

    pub fn heartbeat(
        &mut self,
        req: &v1::HeartbeatRequest,
        now: Instant,
    ) -> Result<v1::HeartbeatResponse, Status> {
        if self.finished() {
            // Whoever still beats may leave: there is nothing left to do.
            return Ok(v1::HeartbeatResponse { stop: true });
        }
        self.member(&req.worker_id, req.generation)?;
        self.members.touch(&req.worker_id, now);
        let s = self.worker_stats.entry(req.worker_id.clone()).or_default();
        s.store_wait_s = if req.store_wait_s.is_finite() {
            req.store_wait_s.max(0.0)
        } else {
            0.0
        };
        Ok(v1::HeartbeatResponse { stop: false })
    }

    /// This rank's samples of `step`. Idempotent: asking again for an assigned step gives the
    /// same answer (the service journals a new assignment before answering).
    pub fn next_step(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Result<v1::NextStepResponse, Status> {
        let rank = self.member(worker_id, generation)?.rank;
        self.members.touch(worker_id, now);
        let committed = self.ledger.committed_step();
        if step <= committed {
            return Err(Status::invalid_argument(format!(
                "step {step} is already committed (committed step {committed})"
            )));
        }
        if self.ledger.assignment(step).is_none() {
            let next_unassigned = self.ledger.next_unassigned();
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
            if self.stop_requested {
                return Ok(self.end_of_run(step));
            }
            if self.members.regroup_requested {
                self.members.end_generation(None, now);
                self.event("regroup", format!("admitting joiners before step {step}"));
                return Ok(v1::NextStepResponse {
                    step,
                    regroup: true,
                    ..Default::default()
                });
            }
            let world = self.members.world_size();
            let batch = self.config.optim.global_batch;
            if self.ledger.assign_next(world, batch).is_none() {
                return Ok(self.end_of_run(step));
            }
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
                    .map(|s| v1::SampleRef {
                        epoch: s.epoch,
                        block: s.block,
                        row: s.row,
                    }),
            );
        }
        let prefetch = self.prefetch_blocks(rank, &a);
        let rank_batches = a.rank_batches();
        Ok(v1::NextStepResponse {
            step,
            samples,
            global_batch: rank_batches.iter().sum(),
            end_of_run: false,
            regroup: false,
            prefetch_blocks: prefetch,
            rank_batches,
        })
    }

    /// Blocks of the chunks `rank` holds after step `a`: what it reads next.
    fn prefetch_blocks(&mut self, rank: u32, a: &StepAssignment) -> Vec<u32> {
        let held = a.after.leases.get(&rank).cloned().unwrap_or_default();
        let mut blocks = Vec::new();
        for chunk in held {
            for b in self.ledger.chunk_blocks(chunk) {
                if !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
        }
        blocks
    }

    /// No step `step`: the run's data or step limit is reached (or a stop was asked for).
    fn end_of_run(&mut self, step: u64) -> v1::NextStepResponse {
        if self.members.phase() == Phase::Training {
            self.members.set_phase(Phase::Finishing);
            self.event(
                "finishing",
                format!(
                    "no step {step}: the run's last steps commit and rank 0 writes the final checkpoint"
                ),
            );
        }
        v1::NextStepResponse {
            step,
            end_of_run: true,
            ..Default::default()
        }
    }

    /// Records a rank's report of an applied step. Idempotent: a retried report of a step this
    /// rank already reported, or of one already committed, changes nothing.
    pub fn commit_step(
        &mut self,
        req: &v1::CommitStepRequest,
        now: Instant,
    ) -> Result<Committed, Status> {
        let rank = self.member(&req.worker_id, req.generation)?.rank;
        self.members.touch(&req.worker_id, now);
        if req.step <= self.ledger.committed_step() {
            return Ok(Committed::Step);
        }
        if self.ledger.assignment(req.step).is_none() {
            return Err(Status::invalid_argument(format!(
                "step {} was never assigned (committed step {})",
                req.step,
                self.ledger.committed_step()
            )));
        }
        if !self.reports.entry(req.step).or_default().insert(rank) {
            return Ok(Committed::Waiting);
        }
        self.worker_stats
            .entry(req.worker_id.clone())
            .or_default()
            .take_metrics(req.step, &req.metrics);
        self.rank_metrics
            .entry(req.step)
            .or_default()
            .push((req.samples, req.metrics.clone()));
        let world = self.generation_world;
        let all = self.reports.get(&req.step).map_or(0, |r| r.len()) == world;
        if !all || !self.ledger.commit(req.step) {
            return Ok(Committed::Waiting);
        }
        let consumed = self.ledger.committed_state().consumed;
        let before = self.history.back().map_or(0, |h| h.samples_total());
        let metrics = self.rank_metrics.remove(&req.step).unwrap_or_default();
        self.rank_metrics = self.rank_metrics.split_off(&(req.step + 1));
        self.reports = self.reports.split_off(&(req.step + 1));
        let record = stats::step_record(
            req.step,
            consumed.saturating_sub(before),
            consumed,
            &metrics,
            world,
            self.history.back(),
        );
        push_bounded(&mut self.history, record, HISTORY);
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
        self.maybe_finish();
        Ok(Committed::Step)
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

    // ---- Checkpoints and the end of the run ----

    /// Rank 0 wrote a checkpoint for `step`; it counts once the step is committed. Only
    /// `<run.dir>/checkpoints/step-N` of that very step is accepted (pruning deletes only
    /// what was recorded here). Idempotent: the same record twice is one record.
    pub fn commit_checkpoint(&mut self, req: &v1::CommitCheckpointRequest) -> Result<(), Status> {
        self.member(&req.worker_id, req.generation)?;
        let root = &self.checkpoint_root;
        if ferroclip_shards::checkpoints::step_of(root, &req.url) != Some(req.step) {
            return Err(Status::invalid_argument(format!(
                "checkpoint {:?} of step {} is not {}",
                req.url,
                req.step,
                ferroclip_shards::checkpoints::step_url(root, req.step)
            )));
        }
        let committed = self.ledger.committed_step();
        if req.step < committed {
            return Err(Status::invalid_argument(format!(
                "checkpoint of step {} is older than the committed step {committed}",
                req.step
            )));
        }
        if req.step == committed {
            self.record_checkpoint(req.step, req.url.clone());
            self.maybe_finish();
        } else if !self.pending_checkpoints.iter().any(|(s, _)| *s == req.step) {
            self.pending_checkpoints.push((req.step, req.url.clone()));
        }
        Ok(())
    }

    fn record_checkpoint(&mut self, step: u64, url: String) {
        if self.checkpoints.last().is_some_and(|c| c.step == step) {
            return; // the final step's checkpoint is recorded once
        }
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

    /// The run is finished when no step is left (or a stop was asked for), nothing is pending,
    /// and the last committed step's checkpoint is recorded.
    fn maybe_finish(&mut self) {
        if self.finished() || self.ledger.pending().count() > 0 {
            return;
        }
        let step = self.ledger.committed_step();
        let recorded = self.checkpoints.last().is_some_and(|c| c.step == step);
        if step > 0 && recorded && (self.stop_requested || !self.ledger.has_more()) {
            self.members.set_phase(Phase::Finished);
            self.event(
                "finished",
                format!("the run is finished at step {step}: its checkpoint is recorded"),
            );
        }
    }

    /// Recorded checkpoints beyond the newest `checkpoint.keep` (never the newest), to delete
    /// from the store; they are forgotten here first.
    pub fn prune_checkpoints(&mut self) -> Vec<String> {
        let keep = self.config.checkpoint.keep.max(1) as usize;
        if self.checkpoints.len() <= keep {
            return Vec::new();
        }
        let old = self.checkpoints.len() - keep;
        self.checkpoints.drain(..old).map(|c| c.url).collect()
    }

    /// Where recorded checkpoints live (what pruning may touch).
    pub fn checkpoint_root(&self) -> &str {
        &self.checkpoint_root
    }

    pub fn leave(&mut self, req: &v1::LeaveRequest, now: Instant) -> Result<(), Status> {
        let phase = self.members.phase();
        if matches!(phase, Phase::Training | Phase::Finishing) {
            self.member(&req.worker_id, req.generation)?;
            self.failure_at.get_or_insert(now);
            self.event(
                "leave",
                format!("worker {} leaves: {}", req.worker_id, req.reason),
            );
        }
        self.members.leave(&req.worker_id, now);
        self.worker_stats.remove(&req.worker_id);
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
                    store_wait_s: s.store_wait_s,
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
            total_steps: self.total_steps,
            store_wait_s: 0.0,
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

fn limits(config: &RunConfig) -> Limits {
    let c = &config.cluster;
    Limits {
        min_workers: c.min_workers,
        max_workers: c.max_workers,
        settle: Duration::from_secs_f64(c.settle_s),
        rejoin_timeout: Duration::from_secs_f64(c.heartbeat_timeout_s),
    }
}

#[cfg(test)]
mod tests;
