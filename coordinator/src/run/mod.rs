//! The state of one run: membership + sample ledger + checkpoints, and the rules that tie them
//! together. Pure state over an explicit clock, answering in the run's own terms (`types`): no
//! I/O, no wire types, so the gRPC service journals what changed outside the lock and the rules
//! are unit tested without a process (`tests.rs`).
//!
//! `formation` is who trains (joins, deaths, leaves, generations), `steps` what each step feeds
//! and when it commits, `finish` checkpoints and the end of the run.
//!
//! The step contract: every step feeds the full global batch (the ledger's), every sample of
//! an epoch is used in exactly one committed step, and every run ends: a death, a join or a
//! restart in the last steps re-forms the generation and the remaining steps run in it; the
//! run is finished only once the final step's checkpoint is recorded.

mod finish;
mod formation;
mod replay;
mod steps;
pub mod types;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use ferroclip_plan::{Bound, Ledger, Source};
use ferroclip_proto::config::RunConfig;

use crate::journal::{CheckpointRecord, Identity, Record, Rollback, Snapshot, Summary};
use crate::membership::{Limits, Member, Membership, Phase};
use crate::stats::{self, push_bounded, unix_now, EVENTS};
pub use crate::stats::{Counters, Event, StepRecord, WorkerStats};
pub use types::*;

/// One rank's named metrics for one step.
type RankMetrics = (u32, Vec<(String, f64)>);

pub struct Run {
    pub config: RunConfig,
    pub identity: Identity,
    pub ledger: Ledger,
    pub members: Membership,
    pub checkpoints: Vec<CheckpointRecord>,
    /// Checkpoints written for steps not yet committed.
    pending_checkpoints: Vec<(u64, String)>,
    /// step → ranks that reported it, this generation.
    reports: BTreeMap<u64, BTreeSet<u32>>,
    /// step → the metrics each rank reported for it.
    rank_metrics: BTreeMap<u64, Vec<RankMetrics>>,
    placements: HashMap<String, Placement>,
    /// step → samples of each rank (every NextStep answer carries them: computed once).
    rank_batches: BTreeMap<u64, StepShape>,
    /// Changes to the journaled state not yet handed to the journal (`take_records`).
    journal_out: Vec<Record>,
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
    /// The roots of `data.sources` in plan order (per-source counts are labelled by them).
    source_roots: Vec<String>,
    /// Ctrl-C / SIGTERM of the launcher: end the run at the next step boundary.
    stop_requested: bool,
    /// Ranks of the current generation.
    generation_world: usize,
    /// Where checkpoints must be (`<run.dir>/checkpoints`): records elsewhere are refused.
    checkpoint_root: String,
    /// Every rollback to a checkpoint, oldest first (journaled: `Formed` records, snapshots).
    rollbacks: Vec<Rollback>,
}

impl Run {
    /// A run over one dataset with these block sizes (tests; `mixed` is the general case).
    pub fn new(config: RunConfig, block_rows: Vec<u32>) -> Self {
        Self::mixed(config, Source::single(block_rows))
    }

    /// A run over `config.data.sources()`, whose train splits have `sources`' block sizes.
    pub fn mixed(config: RunConfig, sources: Vec<Source>) -> Self {
        let named: Vec<(String, f64)> = config
            .data
            .sources()
            .into_iter()
            .map(|s| (s.root, s.weight))
            .collect();
        let identity = Identity::of_sources(
            &config.run.name,
            config.run.seed,
            &named,
            &config.data.train_split,
            &sources,
        )
        .with_order(config.data.shuffle_window_blocks, config.data.lanes);
        let block_count = sources.iter().map(|s| s.block_rows.len() as u32).sum();
        let mut ledger = Ledger::mixed(
            config.run.seed,
            config.data.shuffle_window_blocks,
            sources,
            Bound::of(config.run.steps, config.run.epochs),
        )
        .with_lanes(config.data.lanes);
        let epoch_len = ledger.epoch_len();
        let total_steps = ledger.total_steps(config.optim.global_batch);
        let limits = limits(&config);
        Self {
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
            rank_batches: BTreeMap::new(),
            journal_out: Vec::new(),
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
            source_roots: named.into_iter().map(|(root, _)| root).collect(),
            stop_requested: false,
            generation_world: 0,
            rollbacks: Vec::new(),
        }
    }

    /// Steps the whole run takes.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// What bounds the run (shown so a step-limited run's epochs make sense).
    pub fn bound(&self) -> Bound {
        self.ledger.bound()
    }

    /// Continues from a journal snapshot (coordinator restart); `replay` then applies the
    /// records after it. Err when its pending steps do not re-compute (another manifest).
    pub fn restore(&mut self, snap: Snapshot) -> Result<(), String> {
        self.ledger
            .restore_keys(snap.committed_step, snap.data, &snap.pending)?;
        self.checkpoints = snap.checkpoints;
        self.rollbacks = snap.rollbacks;
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
        Ok(())
    }

    /// Everything the journal keeps (a compaction): O(world size), so taken only when the
    /// journal compacts; steps journal `take_records`.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            identity: self.identity.clone(),
            generation: self.members.generation(),
            committed_step: self.ledger.committed_step(),
            data: self.ledger.committed_state().clone(),
            pending: self.ledger.pending_keys(),
            checkpoints: self.checkpoints.clone(),
            finished: self.finished(),
            rollbacks: self.rollbacks.clone(),
        }
    }

    /// The journaled state in a few numbers (every journal entry carries it).
    pub fn summary(&self) -> Summary {
        Summary {
            generation: self.members.generation(),
            committed_step: self.ledger.committed_step(),
            pending: self.ledger.pending_keys(),
        }
    }

    /// The changes to the journaled state since the last call, in order.
    pub fn take_records(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.journal_out)
    }

    fn journal(&mut self, r: Record) {
        self.journal_out.push(r);
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

    /// (root, samples of it used by committed steps) per source of `data.sources`.
    pub fn source_samples(&self) -> Vec<(&str, u64)> {
        let counts = self.ledger.source_samples(self.ledger.committed_state());
        self.source_roots
            .iter()
            .map(String::as_str)
            .zip(counts)
            .collect()
    }

    /// Samples per second over the last steps.
    pub fn throughput(&self) -> f64 {
        stats::throughput(&self.history)
    }

    /// Seconds since the newest checkpoint was recorded by this coordinator.
    pub fn checkpoint_age_s(&self) -> Option<f64> {
        self.last_checkpoint_at.map(|t| t.elapsed().as_secs_f64())
    }

    /// The member `worker_id` of `generation`, or `Stale`: join again.
    fn member(&self, worker_id: &str, generation: u64) -> Answer<&Member> {
        self.members.current(worker_id, generation).ok_or_else(|| {
            Refusal::Stale(format!(
                "worker {worker_id:?} is not in generation {generation} (current generation {}): join again",
                self.members.generation()
            ))
        })
    }

    pub fn status(&self) -> RunStatus {
        let now = Instant::now();
        let (epoch, epoch_progress) = self.epoch_progress();
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
                WorkerView {
                    rank: m.rank,
                    worker_id: m.info.worker_id.clone(),
                    host: m.info.host.clone(),
                    device: m.info.device.clone(),
                    seconds_since_heartbeat: now.duration_since(m.last_seen).as_secs_f64(),
                    step_time_s: s.step_time_s,
                    data_wait_s: s.data_wait_s,
                    allreduce_s: s.allreduce_s,
                    store_wait_s: s.store_wait_s,
                    last_step: s.step,
                }
            })
            .collect();
        RunStatus {
            state: self.phase_name(),
            generation: self.members.generation(),
            step: self.ledger.committed_step(),
            total_steps: self.total_steps,
            epoch,
            epoch_progress,
            workers,
            metrics: self
                .history
                .back()
                .map(|h| h.metrics.clone())
                .unwrap_or_default(),
            last_checkpoint: self.checkpoints.last().map(|c| c.url.clone()),
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
mod fuzz_tests;
#[cfg(test)]
mod replay_tests;
#[cfg(test)]
mod tests;
