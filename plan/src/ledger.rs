//! The sample ledger: which samples of the epoch plans each step uses, and which steps are
//! committed. Exactly-once rests here: a step's samples leave the pool only when the step is
//! committed; an abandoned step's samples go back at the committed cursors.
//!
//! Chunks (see `epoch`) are leased to ranks within a generation, so a rank mostly reads its own
//! blocks. Every step feeds exactly the global batch while samples remain: at the tail of the
//! data, when every open chunk is leased to someone else, a rank reads from another rank's chunk
//! (without taking its lease). So only the very last step of an epoch-limited run can be short.
//! Assignments are computed for all ranks of a step at once, which makes them a pure function of
//! (committed state, pending steps, world size) and easy to journal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::epoch::{EpochPlan, SampleRef};

/// A chunk of one epoch's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkId {
    pub epoch: u32,
    pub chunk: u32,
}

/// Where the data stands after some step: the part of the ledger that is journaled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    /// The epoch whose fresh chunks are handed out next.
    pub epoch: u32,
    /// Chunks `< next_chunk` of `epoch` (and every chunk of earlier epochs) have been opened.
    pub next_chunk: u32,
    /// Opened chunks not yet fully used, with the offset of their next unused sample.
    /// Serialised as a list: JSON maps need string keys.
    #[serde(with = "open_chunks")]
    pub open: BTreeMap<ChunkId, u32>,
    /// Lease holders within the current generation (rank → chunks, oldest first).
    pub leases: BTreeMap<u32, Vec<ChunkId>>,
    /// Samples used by the steps up to this state.
    pub consumed: u64,
    /// Set when every epoch of the run is used up.
    pub exhausted: bool,
}

/// A contiguous run of one chunk's sample order, fed by one rank in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub chunk: ChunkId,
    pub from: u32,
    pub to: u32,
}

/// What one step feeds: per rank, spans in feed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAssignment {
    pub step: u64,
    pub ranks: Vec<Vec<Span>>,
    /// The data state once this step is applied.
    pub after: DataState,
}

impl StepAssignment {
    pub fn rank_batches(&self) -> Vec<u32> {
        self.ranks
            .iter()
            .map(|spans| spans.iter().map(|s| s.to - s.from).sum())
            .collect()
    }

    pub fn total(&self) -> u32 {
        self.rank_batches().iter().sum()
    }
}

/// What ends a run: a number of steps (the data repeats epoch after epoch), or whole epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Steps(u64),
    Epochs(u32),
}

impl Bound {
    /// `run.steps` when set (> 0), else `run.epochs`.
    pub fn of(steps: u64, epochs: u32) -> Self {
        if steps > 0 {
            Bound::Steps(steps)
        } else {
            Bound::Epochs(epochs)
        }
    }
}

/// Sample ledger over the epoch plans of one dataset split.
#[derive(Debug)]
pub struct Ledger {
    seed: u64,
    window: u32,
    block_rows: Vec<u32>,
    bound: Bound,
    plans: BTreeMap<u32, EpochPlan>,
    committed_step: u64,
    committed: DataState,
    pending: BTreeMap<u64, StepAssignment>,
}

impl Ledger {
    pub fn new(seed: u64, window: u32, block_rows: Vec<u32>, bound: Bound) -> Self {
        Self {
            seed,
            window,
            block_rows,
            bound,
            plans: BTreeMap::new(),
            committed_step: 0,
            committed: DataState::default(),
            pending: BTreeMap::new(),
        }
    }

    /// Restores a journaled position.
    pub fn restore(&mut self, committed_step: u64, state: DataState, pending: Vec<StepAssignment>) {
        self.committed_step = committed_step;
        self.committed = state;
        self.pending = pending.into_iter().map(|a| (a.step, a)).collect();
    }

    pub fn committed_step(&self) -> u64 {
        self.committed_step
    }

    pub fn committed_state(&self) -> &DataState {
        &self.committed
    }

    pub fn pending(&self) -> impl Iterator<Item = &StepAssignment> {
        self.pending.values()
    }

    pub fn assignment(&self, step: u64) -> Option<&StepAssignment> {
        self.pending.get(&step)
    }

    /// Samples in one epoch.
    pub fn epoch_len(&mut self) -> u64 {
        self.plan(0).len()
    }

    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// Steps the whole run takes with `global_batch` samples per step (see `total_steps`).
    pub fn total_steps(&mut self, global_batch: u32) -> u64 {
        match self.bound {
            Bound::Steps(n) => n,
            Bound::Epochs(e) => crate::total_steps(0, e, self.epoch_len(), global_batch),
        }
    }

    fn plan(&mut self, epoch: u32) -> &EpochPlan {
        let (seed, window) = (self.seed, self.window);
        let rows = &self.block_rows;
        self.plans
            .entry(epoch)
            .or_insert_with(|| EpochPlan::new(seed, epoch, rows, window))
    }

    /// The samples of a span, in feed order.
    pub fn span_samples(&mut self, span: &Span) -> Vec<SampleRef> {
        let mut samples = self
            .plan(span.chunk.epoch)
            .chunk_samples(span.chunk.chunk as usize);
        let to = (span.to as usize).min(samples.len());
        let from = (span.from as usize).min(to);
        samples.truncate(to);
        samples.drain(..from);
        samples
    }

    /// The blocks of a chunk, in plan order (what a rank holding its lease reads).
    pub fn chunk_blocks(&mut self, id: ChunkId) -> Vec<u32> {
        self.plan(id.epoch)
            .chunks()
            .get(id.chunk as usize)
            .map(|c| c.blocks.clone())
            .unwrap_or_default()
    }

    pub fn chunk_rows(&mut self, id: ChunkId) -> u32 {
        self.plan(id.epoch).chunks()[id.chunk as usize].rows
    }

    /// The step `assign_next` would assign.
    pub fn next_unassigned(&self) -> u64 {
        self.committed_step + self.pending.len() as u64 + 1
    }

    /// Assigns the next step (`committed_step + pending + 1`) for `world` ranks, `global_batch`
    /// samples split evenly. Returns `None` past the run's step limit or when no sample is left.
    pub fn assign_next(&mut self, world: u32, global_batch: u32) -> Option<&StepAssignment> {
        let step = self.next_unassigned();
        if matches!(self.bound, Bound::Steps(n) if step > n) {
            return None;
        }
        let mut state = match self.pending.values().next_back() {
            Some(last) => last.after.clone(),
            None => self.committed.clone(),
        };
        let mut ranks = Vec::with_capacity(world as usize);
        for rank in 0..world {
            let want = global_batch / world + u32::from(rank < global_batch % world);
            ranks.push(self.take(&mut state, rank, want));
        }
        let fed: u32 = ranks.iter().flatten().map(|s| s.to - s.from).sum();
        if fed == 0 {
            return None;
        }
        state.consumed += fed as u64;
        let assignment = StepAssignment {
            step,
            ranks,
            after: state,
        };
        self.pending.insert(step, assignment);
        self.pending.get(&step)
    }

    /// Whether another step can be assigned after the committed and pending ones (the step
    /// limit is not reached and a sample is left).
    pub fn has_more(&mut self) -> bool {
        if matches!(self.bound, Bound::Steps(n) if self.next_unassigned() > n) {
            return false;
        }
        let mut state = match self.pending.values().next_back() {
            Some(last) => last.after.clone(),
            None => self.committed.clone(),
        };
        !self.take(&mut state, 0, 1).is_empty()
    }

    /// Takes up to `want` samples for `rank`: from its leases first, then from the pool, and at
    /// the tail from other ranks' chunks.
    fn take(&mut self, state: &mut DataState, rank: u32, mut want: u32) -> Vec<Span> {
        let mut spans = Vec::new();
        while want > 0 {
            let Some(id) = self.source_for(state, rank) else {
                break;
            };
            let rows = self.chunk_rows(id);
            let from = state.open.get(&id).copied().unwrap_or(0);
            let to = (from + want).min(rows);
            spans.push(Span {
                chunk: id,
                from,
                to,
            });
            want -= to - from;
            if to == rows {
                state.open.remove(&id);
                for held in state.leases.values_mut() {
                    held.retain(|c| *c != id);
                }
                state.leases.retain(|_, held| !held.is_empty());
            } else {
                state.open.insert(id, to);
            }
        }
        spans
    }

    /// The chunk `rank` reads next: its oldest lease, else an unleased open chunk, else a fresh
    /// one (both then leased to it), else the open chunk with the most samples left, leased to
    /// another rank (read without taking the lease: the tail of the data, where a rank would
    /// otherwise feed less than its share).
    fn source_for(&mut self, state: &mut DataState, rank: u32) -> Option<ChunkId> {
        if let Some(id) = state.leases.get(&rank).and_then(|held| held.first()) {
            return Some(*id);
        }
        let leased: Vec<ChunkId> = state.leases.values().flatten().copied().collect();
        let free_open = state.open.keys().find(|id| !leased.contains(id)).copied();
        let fresh = match free_open {
            Some(id) => Some(id),
            None => self.open_fresh(state),
        };
        if let Some(id) = fresh {
            state.leases.entry(rank).or_default().push(id);
            return Some(id);
        }
        let mut best: Option<(u32, ChunkId)> = None;
        for (&id, &cursor) in &state.open {
            let left = self.chunk_rows(id).saturating_sub(cursor);
            if left > 0 && best.is_none_or(|(b, _)| left > b) {
                best = Some((left, id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn open_fresh(&mut self, state: &mut DataState) -> Option<ChunkId> {
        loop {
            if state.exhausted {
                return None;
            }
            let chunks = self.plan(state.epoch).chunks().len() as u32;
            if state.next_chunk < chunks {
                let id = ChunkId {
                    epoch: state.epoch,
                    chunk: state.next_chunk,
                };
                state.next_chunk += 1;
                if self.chunk_rows(id) == 0 {
                    continue;
                }
                state.open.insert(id, 0);
                return Some(id);
            }
            let next = state.epoch + 1;
            if matches!(self.bound, Bound::Epochs(e) if next >= e) || self.plan(next).is_empty() {
                state.exhausted = true;
                return None;
            }
            state.epoch = next;
            state.next_chunk = 0;
        }
    }

    /// Step `step` was applied by every rank: it becomes part of the committed history.
    /// Steps must commit in order; committing an earlier pending step first is implied.
    pub fn commit(&mut self, step: u64) -> bool {
        if step <= self.committed_step || !self.pending.contains_key(&step) {
            return false;
        }
        let later = self.pending.split_off(&(step + 1));
        let done = std::mem::replace(&mut self.pending, later);
        if let Some((s, last)) = done.into_iter().next_back() {
            self.committed_step = s;
            self.committed = last.after;
        }
        true
    }

    /// A generation ended: pending steps up to `applied` were applied by a surviving rank and
    /// are committed; later ones are abandoned and their samples return to the pool. Leases
    /// are dropped so the next generation re-leases open chunks.
    pub fn regroup(&mut self, applied: u64) {
        if applied > self.committed_step {
            let upto = self.pending.keys().copied().filter(|s| *s <= applied).max();
            if let Some(s) = upto {
                self.commit(s);
            }
        }
        self.pending.clear();
        self.committed.leases.clear();
    }

    /// Rolls the whole data position back to a journaled one (resume from a checkpoint).
    pub fn rollback(&mut self, step: u64, mut state: DataState) {
        state.leases.clear();
        self.committed_step = step;
        self.committed = state;
        self.pending.clear();
    }
}

mod open_chunks {
    use super::ChunkId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(map: &BTreeMap<ChunkId, u32>, s: S) -> Result<S::Ok, S::Error> {
        let list: Vec<(ChunkId, u32)> = map.iter().map(|(k, v)| (*k, *v)).collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ChunkId, u32>, D::Error> {
        let list: Vec<(ChunkId, u32)> = Vec::deserialize(d)?;
        Ok(list.into_iter().collect())
    }
}

#[cfg(test)]
mod tests;
