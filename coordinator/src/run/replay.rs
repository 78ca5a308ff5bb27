//! Journal replay: the records a run wrote (`Run::journal`), applied in order over the
//! snapshot before them, give the state after them. Each record redoes exactly the ledger and
//! checkpoint change its live rule made; assignments are re-computed from (step, world, batch).

use ferroclip_plan::DataState;

use super::Run;
use crate::journal::{CheckpointRecord, Record, Rollback, Settle};
use crate::membership::{Membership, Phase};

impl Run {
    /// Applies journaled records after `restore`. Err names the first record that does not
    /// fit the state (a journal of another run or a damaged one).
    pub fn replay(&mut self, records: &[Record]) -> Result<(), String> {
        for (i, r) in records.iter().enumerate() {
            self.apply(r)
                .map_err(|e| format!("journal record {i} ({r:?}): {e}"))?;
        }
        Ok(())
    }

    fn apply(&mut self, r: &Record) -> Result<(), String> {
        match r {
            Record::Formed { generation, settle } => {
                self.members = Membership::new(super::limits(&self.config), *generation);
                if let Settle::Rollback { step } = *settle {
                    self.rollbacks.push(Rollback {
                        generation: *generation,
                        step,
                    });
                }
                match *settle {
                    Settle::Regroup { applied } => self.ledger.regroup(applied),
                    Settle::Rollback { step: 0 } => self.ledger.rollback(0, DataState::default()),
                    Settle::Rollback { step } => {
                        let c = self
                            .checkpoints
                            .iter()
                            .rev()
                            .find(|c| c.step == step)
                            .ok_or_else(|| format!("no recorded checkpoint of step {step}"))?;
                        self.ledger.rollback(c.step, c.data.clone());
                    }
                }
            }
            Record::Assigned(p) => self.ledger.reassign(p)?,
            Record::Committed { step } => {
                if !self.ledger.commit(*step) {
                    return Err(format!("step {step} is not pending"));
                }
            }
            Record::Checkpoint { step, url } => self.checkpoints.push(CheckpointRecord {
                step: *step,
                url: url.clone(),
                data: self.ledger.committed_state().clone(),
            }),
            Record::Pruned { count } => {
                let n = (*count as usize).min(self.checkpoints.len());
                self.checkpoints.drain(..n);
            }
            Record::Finished => self.members.set_phase(Phase::Finished),
        }
        Ok(())
    }
}
