//! What each step feeds and when it commits: heartbeats, NextStep (assignments made once and
//! answered again to a retry), CommitStep (a step commits when every rank of the generation
//! has reported it; a retried report changes nothing).

use std::time::Instant;

use ferroclip_plan::ChunkId;

use super::{Answer, Committed, Refusal, Run, StepPlan, StepReport, StepShape};
use crate::journal::Record;
use crate::membership::Phase;
use crate::stats::{self, push_bounded, HISTORY};

/// Pending (assigned, uncommitted) steps at most. Workers load step s + 1 while step s runs;
/// a rank that committed s may already ask for s + 2 while a slower peer has not reported s
/// yet, hence 3.
const LOOKAHEAD: usize = 3;

impl Run {
    /// Records a heartbeat; answers whether the run is finished (the worker leaves). Anyone
    /// may hear that a finished run is finished.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        generation: u64,
        store_wait_s: f64,
        now: Instant,
    ) -> Answer<bool> {
        if self.finished() {
            return Ok(true);
        }
        self.member(worker_id, generation)?;
        self.members.touch(worker_id, now);
        if !self.worker_stats.contains_key(worker_id) {
            self.worker_stats
                .insert(worker_id.to_string(), Default::default());
        }
        let Some(s) = self.worker_stats.get_mut(worker_id) else {
            return Ok(false);
        };
        s.store_wait_s = if store_wait_s.is_finite() {
            store_wait_s.max(0.0)
        } else {
            0.0
        };
        Ok(false)
    }

    /// This rank's samples of `step`. Idempotent: asking again for an assigned step gives the
    /// same answer (the service journals a new assignment before answering).
    pub fn next_step(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Answer<StepPlan> {
        let rank = self.member(worker_id, generation)?.rank;
        self.members.touch(worker_id, now);
        let committed = self.ledger.committed_step();
        if step <= committed {
            return Err(Refusal::Invalid(format!(
                "step {step} is already committed (committed step {committed})"
            )));
        }
        if self.ledger.assignment(step).is_none() {
            let next_unassigned = self.ledger.next_unassigned();
            if step != next_unassigned {
                return Err(Refusal::NotYet(format!(
                    "step {step} cannot be assigned yet: next assignable step is {next_unassigned}"
                )));
            }
            if self.ledger.pending().count() >= LOOKAHEAD {
                return Err(Refusal::NotYet(format!(
                    "step {step} is more than {LOOKAHEAD} steps ahead of the committed step {committed}"
                )));
            }
            if self.stop_requested {
                return Ok(self.end_of_run(step));
            }
            if self.members.regroup_requested {
                self.members.end_generation(None, now);
                self.event("regroup", format!("admitting joiners before step {step}"));
                return Ok(StepPlan::Regroup);
            }
            let world = self.members.world_size();
            let batch = self.config.optim.global_batch;
            let Some(key) = self.ledger.assign_next(world, batch).map(|a| a.key()) else {
                return Ok(self.end_of_run(step));
            };
            self.journal(Record::Assigned(key));
        }
        // Only this rank's part of the assignment is copied: all ranks ask, so copying the
        // whole of it would cost O(world²) per step.
        let Some(a) = self.ledger.assignment(step) else {
            return Err(Refusal::Invalid(format!("step {step} has no assignment")));
        };
        let spans = a.ranks.get(rank as usize).cloned().unwrap_or_default();
        let held = self.ledger.held_by(a, rank);
        let shape = match self.rank_batches.get(&step) {
            Some(s) => s.clone(),
            None => {
                let s = StepShape::new(a.rank_batches());
                self.rank_batches.insert(step, s.clone());
                s
            }
        };
        let mut samples = Vec::new();
        for span in &spans {
            samples.extend(self.ledger.span_samples(span));
        }
        Ok(StepPlan::Samples {
            step,
            samples,
            shape,
            prefetch_blocks: self.prefetch_blocks(&held),
        })
    }

    /// The first steps of a rank's generation, answered with its Join: the step it starts at
    /// and the one after (the report of step s carries s + 2), so a newly formed world of N
    /// ranks does not ask NextStep 2N times at once. Only what NextStep would answer now;
    /// nothing when a regroup or stop is pending (that answer ends the generation, which is
    /// NextStep's to do once every rank has its place), and up to the first non-sample plan.
    pub fn first_steps(
        &mut self,
        worker_id: &str,
        generation: u64,
        from: u64,
        now: Instant,
    ) -> Vec<(u64, StepPlan)> {
        let mut plans = Vec::new();
        if self.stop_requested || self.members.regroup_requested {
            return plans;
        }
        for step in from..from + 2 {
            match self.next_step(worker_id, generation, step, now) {
                Ok(plan @ StepPlan::Samples { .. }) => plans.push((step, plan)),
                Ok(plan) => {
                    plans.push((step, plan));
                    break;
                }
                Err(_) => break,
            }
        }
        plans
    }

    /// Blocks of the chunks a rank holds after the step: what it reads next.
    fn prefetch_blocks(&mut self, held: &[ChunkId]) -> Vec<u32> {
        let mut blocks = Vec::new();
        for &chunk in held {
            for b in self.ledger.chunk_blocks(chunk) {
                if !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
        }
        blocks
    }

    /// No step `step`: the run's data or step limit is reached (or a stop was asked for).
    fn end_of_run(&mut self, step: u64) -> StepPlan {
        if self.members.phase() == Phase::Training {
            self.members.set_phase(Phase::Finishing);
            self.event(
                "finishing",
                format!(
                    "no step {step}: the run's last steps commit and rank 0 writes the final checkpoint"
                ),
            );
        }
        StepPlan::End
    }

    /// Records a rank's report of an applied step. Idempotent: a retried report of a step this
    /// rank already reported, or of one already committed, changes nothing.
    pub fn commit_step(
        &mut self,
        worker_id: &str,
        generation: u64,
        report: StepReport,
        now: Instant,
    ) -> Answer<Committed> {
        let rank = self.member(worker_id, generation)?.rank;
        self.members.touch(worker_id, now);
        let step = report.step;
        if step <= self.ledger.committed_step() {
            return Ok(Committed::Step);
        }
        if self.ledger.assignment(step).is_none() {
            return Err(Refusal::Invalid(format!(
                "step {step} was never assigned (committed step {})",
                self.ledger.committed_step()
            )));
        }
        if !self.reports.entry(step).or_default().insert(rank) {
            return Ok(Committed::Waiting);
        }
        let stats = self.worker_stats.entry(worker_id.to_string()).or_default();
        stats.take_metrics(step, &report.metrics);
        // A rank that applies steps is not waiting on its store (its heartbeats, which report
        // the wait, pause while it makes step calls).
        stats.store_wait_s = 0.0;
        self.rank_metrics
            .entry(step)
            .or_default()
            .push((report.samples, report.metrics));
        let world = self.generation_world;
        let all = self.reports.get(&step).map_or(0, |r| r.len()) == world;
        if !all || !self.ledger.commit(step) {
            return Ok(Committed::Waiting);
        }
        self.journal(Record::Committed { step });
        self.on_committed(step, now);
        Ok(Committed::Step)
    }

    /// Step `step` committed: its record, the recovery it ends, the checkpoints waiting for it.
    fn on_committed(&mut self, step: u64, now: Instant) {
        let consumed = self.ledger.committed_state().consumed;
        let before = self.history.back().map_or(0, |h| h.samples_total());
        let metrics = self.rank_metrics.remove(&step).unwrap_or_default();
        self.rank_metrics = self.rank_metrics.split_off(&(step + 1));
        self.reports = self.reports.split_off(&(step + 1));
        self.rank_batches = self.rank_batches.split_off(&(step + 1));
        let record = stats::step_record(
            step,
            consumed.saturating_sub(before),
            consumed,
            &metrics,
            self.generation_world,
            self.history.back(),
        );
        push_bounded(&mut self.history, record, HISTORY);
        if let Some(t) = self.failure_at.take() {
            let secs = now.duration_since(t).as_secs_f64();
            self.counters.recoveries += 1;
            self.counters.last_recovery_s = secs;
            self.event(
                "recovered",
                format!("step {step} committed {secs:.2}s after the failure"),
            );
        }
        let ready: Vec<(u64, String)> = self
            .pending_checkpoints
            .iter()
            .filter(|(s, _)| *s == step)
            .cloned()
            .collect();
        self.pending_checkpoints.retain(|(s, _)| *s > step);
        for (step, url) in ready {
            self.record_checkpoint(step, url);
        }
        self.maybe_finish();
    }
}
