//! Checkpoints and the end of the run: a checkpoint counts once its step is committed; only
//! `<run.dir>/checkpoints/step-N` of that step is accepted (pruning deletes only what was
//! recorded, never the newest); the run is finished once no step is left and the last
//! committed step's checkpoint is recorded.

use std::time::Instant;

use ferroclip_shards::checkpoints;

use super::{Answer, Refusal, Run};
use crate::journal::{CheckpointRecord, Record};
use crate::membership::Phase;

impl Run {
    /// Ends the run at the next step boundary: rank 0 checkpoints, then everyone leaves.
    pub fn request_stop(&mut self) {
        self.stop_requested = true;
        if self.members.phase() == Phase::Forming && self.ledger.committed_step() == 0 {
            self.members.set_phase(Phase::Finished);
            self.journal(Record::Finished);
        }
        self.event(
            "stop",
            "stop requested: finishing at the next step boundary".into(),
        );
    }

    /// Rank 0 wrote a checkpoint for `step`; it counts once the step is committed.
    /// Idempotent: the same record twice is one record.
    pub fn commit_checkpoint(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
        url: &str,
    ) -> Answer<()> {
        self.member(worker_id, generation)?;
        let root = &self.checkpoint_root;
        if checkpoints::step_of(root, url) != Some(step) {
            return Err(Refusal::Invalid(format!(
                "checkpoint {url:?} of step {step} is not {}",
                checkpoints::step_url(root, step)
            )));
        }
        let committed = self.ledger.committed_step();
        if step < committed {
            return Err(Refusal::Invalid(format!(
                "checkpoint of step {step} is older than the committed step {committed}"
            )));
        }
        if step == committed {
            self.record_checkpoint(step, url.to_string());
            self.maybe_finish();
        } else if !self.pending_checkpoints.iter().any(|(s, _)| *s == step) {
            self.pending_checkpoints.push((step, url.to_string()));
        }
        Ok(())
    }

    pub(super) fn record_checkpoint(&mut self, step: u64, url: String) {
        if self.checkpoints.last().is_some_and(|c| c.step == step) {
            return; // the final step's checkpoint is recorded once
        }
        self.last_checkpoint_at = Some(Instant::now());
        self.journal(Record::Checkpoint {
            step,
            url: url.clone(),
        });
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
    pub(super) fn maybe_finish(&mut self) {
        if self.finished() || self.ledger.pending().count() > 0 {
            return;
        }
        let step = self.ledger.committed_step();
        let recorded = self.checkpoints.last().is_some_and(|c| c.step == step);
        if step > 0 && recorded && (self.stop_requested || !self.ledger.has_more()) {
            self.members.set_phase(Phase::Finished);
            self.journal(Record::Finished);
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
        self.journal(Record::Pruned { count: old as u32 });
        self.checkpoints.drain(..old).map(|c| c.url).collect()
    }

    /// Where recorded checkpoints live (what pruning may touch).
    pub fn checkpoint_root(&self) -> &str {
        &self.checkpoint_root
    }
}
