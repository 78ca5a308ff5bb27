//! Who trains: joins, deaths, leaves, and the generations they form. A new generation commits
//! the steps its survivors applied and abandons the rest, or rolls back to the latest recorded
//! checkpoint when nobody holds the newest state.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Answer, Peer, Placement, Refusal, Run};
use crate::journal::{Record, Rollback, Settle};
use crate::membership::{Member, Phase, WorkerInfo};

impl Run {
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
    pub fn placement(&self, worker_id: &str) -> Option<Placement> {
        self.placements.get(worker_id).cloned()
    }

    /// A retried Join (its answer was lost, or came back UNAVAILABLE while the journal could
    /// not be written): the same worker (same details) is already placed in the current
    /// generation and has not started it (`last_generation` is older). It gets the same place
    /// instead of ending the generation it has not even begun.
    pub fn placed_again(&self, info: &WorkerInfo, last_generation: u64) -> Option<Placement> {
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

    pub(super) fn generation_failed(&mut self, why: String, now: Instant) {
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
        self.rank_batches.clear();
        let resume_checkpoint = self.settle_the_data(&members);
        self.pending_checkpoints
            .retain(|(s, _)| *s <= self.ledger.committed_step());
        let next_step = self.ledger.committed_step() + 1;
        let (state_source, needs_state) = if resume_checkpoint.is_none() {
            let target = self.ledger.committed_step();
            let holds = |m: &Member| m.info.last_applied == target && self.on_lineage(&m.info);
            let source = members
                .iter()
                .find(|m| holds(m))
                .map(|m| m.rank)
                .unwrap_or(0);
            let needs = members.iter().any(|m| !holds(m));
            (source, needs)
        } else {
            (0, false)
        };
        // One list shared by every placement: N copies of N peers would be O(N²) memory.
        let peers: Arc<Vec<Peer>> = Arc::new(
            members
                .iter()
                .map(|m| Peer {
                    rank: m.rank,
                    worker_id: m.info.worker_id.clone(),
                    collective_addr: m.info.collective_addr.clone(),
                })
                .collect(),
        );
        self.placements.clear();
        for m in &members {
            self.placements.insert(
                m.info.worker_id.clone(),
                Placement {
                    generation,
                    rank: m.rank,
                    world_size: members.len() as u32,
                    peers: peers.clone(),
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
        // Thousands of ids would make one event tens of KB: the first few say enough.
        let shown: Vec<&str> = ids.iter().take(16).copied().collect();
        let more = if ids.len() > shown.len() { " …" } else { "" };
        let msg = format!(
            "generation {generation}: {} workers {shown:?}{more}, next step {next_step}{}",
            members.len(),
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

    /// Where the new generation's data starts: survivors carry the model (the steps they
    /// applied are committed, later ones abandoned), else the latest checkpoint (returned: the
    /// members load it), else the beginning.
    fn settle_the_data(&mut self, members: &[Member]) -> Option<String> {
        let lineage = members
            .iter()
            .filter(|m| self.on_lineage(&m.info))
            .map(|m| m.info.last_applied)
            .max()
            .unwrap_or(0);
        let committed = self.ledger.committed_step();
        let generation = self.members.generation();
        if lineage >= committed && (lineage > 0 || committed == 0) {
            self.ledger.regroup(lineage);
            self.journal(Record::Formed {
                generation,
                settle: Settle::Regroup { applied: lineage },
            });
            return None;
        }
        let step = self.checkpoints.last().map_or(0, |c| c.step);
        self.journal(Record::Formed {
            generation,
            settle: Settle::Rollback { step },
        });
        self.rollbacks.push(Rollback { generation, step });
        match self.checkpoints.last().cloned() {
            Some(c) => {
                self.ledger.rollback(c.step, c.data.clone());
                self.event(
                    "restore",
                    format!("resuming from checkpoint {} (step {})", c.url, c.step),
                );
                Some(c.url)
            }
            None => {
                self.ledger.rollback(0, Default::default());
                if committed > 0 {
                    self.event("restore", "no checkpoint: restarting from step 0".into());
                }
                None
            }
        }
    }

    /// Whether a member's model is of the run's history: a rollback in a later generation
    /// than its last re-ran the steps after its checkpoint, so a model past that checkpoint
    /// from before it is another history's, whatever its step number (it receives the state,
    /// never gives it, and commits nothing). A generation the run has not reached yet is no
    /// claim to trust (a journal lost, a confused client): that model holds nothing either.
    pub(super) fn on_lineage(&self, info: &WorkerInfo) -> bool {
        info.state_generation <= self.members.generation()
            && self
                .rollbacks
                .iter()
                .filter(|r| r.generation > info.state_generation)
                .all(|r| info.last_applied <= r.step)
    }

    pub fn report_failure(
        &mut self,
        worker_id: &str,
        generation: u64,
        suspect_rank: u32,
        reason: &str,
        now: Instant,
    ) -> Answer<()> {
        self.member(worker_id, generation)?;
        let suspect = self
            .members
            .members()
            .iter()
            .find(|m| m.rank == suspect_rank)
            .map(|m| m.info.worker_id.clone());
        let Some(suspect) = suspect else {
            return Err(Refusal::Invalid(format!(
                "no rank {suspect_rank} in generation {generation}"
            )));
        };
        self.members.end_generation(Some(&suspect), now);
        self.generation_failed(
            format!("worker {worker_id} reports rank {suspect_rank} ({suspect}) failed: {reason}"),
            now,
        );
        Ok(())
    }

    pub fn leave(
        &mut self,
        worker_id: &str,
        generation: u64,
        reason: &str,
        now: Instant,
    ) -> Answer<()> {
        let phase = self.members.phase();
        if matches!(phase, Phase::Training | Phase::Finishing) {
            self.member(worker_id, generation)?;
            self.failure_at.get_or_insert(now);
            self.event("leave", format!("worker {worker_id} leaves: {reason}"));
        }
        self.members.leave(worker_id, now);
        self.worker_stats.remove(worker_id);
        Ok(())
    }
}
