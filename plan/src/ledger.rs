//! The sample ledger: which samples of the epoch plans each step uses, and which steps are
//! committed. Exactly-once rests here: a step's samples leave the pool only when the step is
//! committed; an abandoned step's samples go back at the committed cursors.
//!
//! Chunks (see `epoch`) are leased to *lanes*, and each lane feeds its share of every step from
//! its own chunks. By default a lane is a rank of the current generation, so a rank mostly reads
//! its own blocks, and leases end with the generation. With `lanes` set (`data.lanes`), the
//! lanes are a fixed number of the run's, independent of the world size (MosaicML Streaming's
//! canonical nodes): a step's global batch is the lanes' shares concatenated in lane order, cut
//! into the ranks' parts, and leases outlive regroups, so every step feeds the same samples in
//! the same order at any world size and across changes of it.
//! Every step feeds exactly the global batch while samples remain: at the tail of the data, when
//! every open chunk is leased to another lane, a lane reads from another lane's chunk (without
//! taking its lease). So only the very last step of an epoch-limited run can be short.
//! Assignments are computed for all ranks of a step at once, which makes them a pure function of
//! (committed state, pending steps, world size) and easy to journal.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::epoch::{EpochPlan, SampleRef};
use crate::mix::{Blocks, Source};

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
    /// Lease holders (lane → chunks, oldest first): ranks of the current generation, or the
    /// run's fixed lanes (`Ledger::with_lanes`).
    pub leases: BTreeMap<u32, Vec<ChunkId>>,
    /// Samples used by the steps up to this state.
    pub consumed: u64,
    /// Of those, per source of a mixed plan (empty with one source: all are `consumed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_source: Vec<u64>,
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
    /// The global batch it was assigned for (with `ranks.len()`, what re-computes it).
    #[serde(default)]
    pub batch: u32,
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

    /// What re-computes this assignment from the state before it (the journal keeps only this).
    pub fn key(&self) -> PendingStep {
        PendingStep {
            step: self.step,
            world: self.ranks.len() as u32,
            batch: self.batch,
        }
    }
}

/// An assigned step as the journal keeps it: assignments are a pure function of the state
/// before them, the world size and the global batch, so these three numbers re-compute it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStep {
    pub step: u64,
    pub world: u32,
    pub batch: u32,
}

/// More ranks than any run has: a journaled step claiming more is damaged (assigning it would
/// allocate per rank). Far above the coordinator's measured scale (bench/README-coordinator.md).
pub const MAX_WORLD: u32 = 1 << 20;

/// Epoch plans kept built (the current one, the next, one behind for lookahead and rollbacks);
/// an evicted plan is rebuilt on demand: it is a pure function of (seed, epoch, manifest).
const PLANS_KEPT: usize = 3;
/// Shuffled chunk orders kept at least; the cache is trimmed to the open chunks beyond
/// max(this, 2 × open chunks).
const ORDERS_KEPT: usize = 1024;

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
    /// Fixed lanes (`with_lanes`); 0: one lane per rank of the current generation.
    lanes: u32,
    sources: Vec<Source>,
    blocks: Blocks,
    bound: Bound,
    plans: BTreeMap<u32, EpochPlan>,
    /// Shuffled sample orders of chunks in use: each NextStep reads a slice of one instead of
    /// re-shuffling the chunk.
    orders: HashMap<ChunkId, Arc<[SampleRef]>>,
    committed_step: u64,
    committed: DataState,
    pending: BTreeMap<u64, StepAssignment>,
}

impl Ledger {
    pub fn new(seed: u64, window: u32, block_rows: Vec<u32>, bound: Bound) -> Self {
        Self::mixed(seed, window, Source::single(block_rows), bound)
    }

    /// A ledger over the mixed plan of several sources (`mix`; one source = `new`).
    pub fn mixed(seed: u64, window: u32, sources: Vec<Source>, bound: Bound) -> Self {
        Self {
            seed,
            window,
            lanes: 0,
            blocks: Blocks::of(&sources),
            sources,
            bound,
            plans: BTreeMap::new(),
            orders: HashMap::new(),
            committed_step: 0,
            committed: DataState::default(),
            pending: BTreeMap::new(),
        }
    }

    /// Feeds every step from `lanes` fixed lanes (0: one per rank, the default): the steps'
    /// samples and their order no longer depend on the world size (see the module doc).
    pub fn with_lanes(mut self, lanes: u32) -> Self {
        self.lanes = lanes;
        self
    }

    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    /// Restores a journaled position. Err (naming the field) when `state` cannot come from this
    /// plan: a chunk it does not have, a cursor past a chunk's end, a lease on a chunk that is
    /// not open or held twice. A journal or checkpoint from another dataset, or a damaged one,
    /// must stop the run, not feed samples twice.
    pub fn restore(
        &mut self,
        committed_step: u64,
        state: DataState,
        pending: Vec<StepAssignment>,
    ) -> Result<(), String> {
        self.check(&state)?;
        self.committed_step = committed_step;
        self.committed = state;
        self.pending = pending.into_iter().map(|a| (a.step, a)).collect();
        Ok(())
    }

    fn check(&mut self, state: &DataState) -> Result<(), String> {
        let chunks = self.plan(state.epoch).chunks().len() as u32;
        if state.next_chunk > chunks {
            return Err(format!(
                "data.next_chunk {} is past epoch {}'s {chunks} chunks",
                state.next_chunk, state.epoch
            ));
        }
        for (&id, &cursor) in &state.open {
            let opened =
                id.epoch < state.epoch || (id.epoch == state.epoch && id.chunk < state.next_chunk);
            if !opened {
                return Err(format!(
                    "data.open names chunk {} of epoch {}, which was never opened",
                    id.chunk, id.epoch
                ));
            }
            let rows = self
                .plan(id.epoch)
                .chunks()
                .get(id.chunk as usize)
                .map(|c| c.rows)
                .ok_or_else(|| {
                    format!(
                        "data.open names chunk {} of epoch {}, which the plan does not have",
                        id.chunk, id.epoch
                    )
                })?;
            if cursor >= rows {
                return Err(format!(
                    "data.open puts chunk {} of epoch {} at sample {cursor} of {rows}",
                    id.chunk, id.epoch
                ));
            }
        }
        let mut leased = HashSet::new();
        for (rank, held) in &state.leases {
            for id in held {
                if !state.open.contains_key(id) || !leased.insert(*id) {
                    return Err(format!(
                        "data.leases gives rank {rank} chunk {} of epoch {}, which is not open or held twice",
                        id.chunk, id.epoch
                    ));
                }
            }
        }
        if !state.by_source.is_empty() && state.by_source.len() != self.sources.len() {
            return Err(format!(
                "data.by_source counts {} sources, the run has {}",
                state.by_source.len(),
                self.sources.len()
            ));
        }
        Ok(())
    }

    /// Restores a journaled position whose pending steps are kept as keys: they are assigned
    /// again, in order, from `state`. Err names the first key that does not re-compute.
    pub fn restore_keys(
        &mut self,
        committed_step: u64,
        state: DataState,
        pending: &[PendingStep],
    ) -> Result<(), String> {
        self.restore(committed_step, state, Vec::new())?;
        for p in pending {
            self.reassign(p)?;
        }
        Ok(())
    }

    /// Assigns `p.step` again (journal replay): it must be the next step, for a world size a
    /// run can have, and feed samples.
    pub fn reassign(&mut self, p: &PendingStep) -> Result<(), String> {
        if p.world == 0 || p.world > MAX_WORLD {
            return Err(format!(
                "step {} was assigned to {} ranks (1..={MAX_WORLD} possible)",
                p.step, p.world
            ));
        }
        let next = self.next_unassigned();
        if p.step != next {
            return Err(format!(
                "step {} replayed where step {next} is next",
                p.step
            ));
        }
        match self.assign_next(p.world, p.batch) {
            Some(_) => Ok(()),
            None => Err(format!("step {} no longer assigns", p.step)),
        }
    }

    /// The pending steps as the journal keeps them.
    pub fn pending_keys(&self) -> Vec<PendingStep> {
        self.pending.values().map(StepAssignment::key).collect()
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
        if !self.plans.contains_key(&epoch) && self.plans.len() >= PLANS_KEPT {
            self.plans.pop_first();
        }
        let (seed, window) = (self.seed, self.window);
        let sources = &self.sources;
        self.plans
            .entry(epoch)
            .or_insert_with(|| EpochPlan::mixed(seed, epoch, sources, window))
    }

    /// The samples of a span, in feed order.
    pub fn span_samples(&mut self, span: &Span) -> Vec<SampleRef> {
        let order = self.chunk_order(span.chunk);
        let to = (span.to as usize).min(order.len());
        let from = (span.from as usize).min(to);
        order[from..to].to_vec()
    }

    /// A chunk's shuffled sample order, from the cache (bounded: trimmed to the chunks open in
    /// the newest state when it outgrows twice their number).
    fn chunk_order(&mut self, id: ChunkId) -> Arc<[SampleRef]> {
        if let Some(order) = self.orders.get(&id) {
            return order.clone();
        }
        let order: Arc<[SampleRef]> = self.plan(id.epoch).chunk_samples(id.chunk as usize).into();
        let newest = match self.pending.values().next_back() {
            Some(last) => &last.after,
            None => &self.committed,
        };
        if self.orders.len() >= ORDERS_KEPT.max(2 * newest.open.len()) {
            self.orders.retain(|id, _| newest.open.contains_key(id));
        }
        self.orders.insert(id, order.clone());
        order
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
        let mut free = free_open(&state);
        let ranks = if self.lanes == 0 {
            let mut ranks = Vec::with_capacity(world as usize);
            for rank in 0..world {
                let want = share(global_batch, world, rank);
                ranks.push(self.take(&mut state, &mut free, rank, want));
            }
            ranks
        } else {
            let mut fed = Vec::new();
            for lane in 0..self.lanes {
                let want = share(global_batch, self.lanes, lane);
                fed.extend(self.take(&mut state, &mut free, lane, want));
            }
            cut(&fed, world)
        };
        let fed: u32 = ranks.iter().flatten().map(|s| s.to - s.from).sum();
        if fed == 0 {
            return None;
        }
        state.consumed += fed as u64;
        if self.sources.len() > 1 {
            self.count_sources(&mut state, &ranks);
        }
        let assignment = StepAssignment {
            step,
            ranks,
            batch: global_batch,
            after: state,
        };
        self.pending.insert(step, assignment);
        self.pending.get(&step)
    }

    /// The chunks `rank` reads next after assignment `a` (what it prefetches): its leases, or
    /// with fixed lanes those of the lanes whose shares its part of the global batch spans.
    pub fn held_by(&self, a: &StepAssignment, rank: u32) -> Vec<ChunkId> {
        if self.lanes == 0 {
            return a.after.leases.get(&rank).cloned().unwrap_or_default();
        }
        let world = (a.ranks.len() as u32).max(1);
        let (from, to) = (start(a.batch, world, rank), start(a.batch, world, rank + 1));
        if from >= to {
            return Vec::new();
        }
        // O(lanes it spans), not O(lanes): every rank asks, every step.
        let (first, last) = (
            part_of(a.batch, self.lanes, from),
            part_of(a.batch, self.lanes, to - 1),
        );
        (first..=last)
            .flat_map(|l| a.after.leases.get(&l).cloned().unwrap_or_default())
            .collect()
    }

    /// The global block numbering of the sources.
    pub fn blocks(&self) -> &Blocks {
        &self.blocks
    }

    /// Samples of each source used by the steps up to `state` (one source: `consumed`).
    pub fn source_samples(&self, state: &DataState) -> Vec<u64> {
        if self.sources.len() <= 1 {
            return vec![state.consumed];
        }
        let mut counts = state.by_source.clone();
        counts.resize(self.sources.len(), 0);
        counts
    }

    /// Adds a step's samples to their sources' counts (read from the cached chunk orders that
    /// NextStep answers from anyway).
    fn count_sources(&mut self, state: &mut DataState, ranks: &[Vec<Span>]) {
        state.by_source.resize(self.sources.len(), 0);
        for span in ranks.iter().flatten() {
            let order = self.chunk_order(span.chunk);
            let to = (span.to as usize).min(order.len());
            let from = (span.from as usize).min(to);
            for s in &order[from..to] {
                if let Some((source, _)) = self.blocks.locate(s.block) {
                    state.by_source[source] += 1;
                }
            }
        }
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
        let mut free = free_open(&state);
        !self.take(&mut state, &mut free, 0, 1).is_empty()
    }

    /// Takes up to `want` samples for `lane`: from its leases first, then from the pool,
    /// and at the tail from other lanes' chunks.
    /// `free` is the open chunks nobody leases (`free_open`), kept up to date here, so a step
    /// of N ranks costs O(N log N), not O(N²).
    fn take(
        &mut self,
        state: &mut DataState,
        free: &mut BTreeSet<ChunkId>,
        lane: u32,
        mut want: u32,
    ) -> Vec<Span> {
        let mut spans = Vec::new();
        while want > 0 {
            let Some(id) = self.source_for(state, free, lane) else {
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
                free.remove(&id);
                release(state, lane, id);
            } else {
                state.open.insert(id, to);
            }
        }
        spans
    }

    /// The chunk `lane` reads next: its oldest lease, else an unleased open chunk, else a fresh
    /// one (both then leased to it), else the open chunk with the most samples left, leased to
    /// another lane (read without taking the lease: the tail of the data, where a lane would
    /// otherwise feed less than its share).
    fn source_for(
        &mut self,
        state: &mut DataState,
        free: &mut BTreeSet<ChunkId>,
        lane: u32,
    ) -> Option<ChunkId> {
        if let Some(id) = state.leases.get(&lane).and_then(|held| held.first()) {
            return Some(*id);
        }
        let fresh = match free.pop_first() {
            Some(id) => Some(id),
            None => self.open_fresh(state),
        };
        if let Some(id) = fresh {
            state.leases.entry(lane).or_default().push(id);
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
    /// are committed; later ones are abandoned and their samples return to the pool. A rank's
    /// leases are dropped so the next generation re-leases open chunks; fixed lanes keep theirs.
    pub fn regroup(&mut self, applied: u64) {
        if applied > self.committed_step {
            let upto = self.pending.keys().copied().filter(|s| *s <= applied).max();
            if let Some(s) = upto {
                self.commit(s);
            }
        }
        self.pending.clear();
        if self.lanes == 0 {
            self.committed.leases.clear();
        }
    }

    /// Rolls the whole data position back to a journaled one (resume from a checkpoint).
    pub fn rollback(&mut self, step: u64, mut state: DataState) {
        if self.lanes == 0 {
            state.leases.clear();
        }
        self.committed_step = step;
        self.committed = state;
        self.pending.clear();
    }
}

/// Part `i` of `n` split into `parts` as evenly as possible (the first `n % parts` get one more).
fn share(n: u32, parts: u32, i: u32) -> u32 {
    n / parts + u32::from(i < n % parts)
}

/// Where part `i` of `share(n, parts, ·)` starts (`start(n, parts, parts) == n`).
fn start(n: u32, parts: u32, i: u32) -> u32 {
    i * (n / parts) + i.min(n % parts)
}

/// The part of `share(n, parts, ·)` that offset `x` (< n) falls in.
fn part_of(n: u32, parts: u32, x: u32) -> u32 {
    let (q, r) = (n / parts, n % parts);
    let long = r * (q + 1);
    if x < long {
        x / (q + 1)
    } else {
        r + (x - long) / q.max(1)
    }
}

/// The lanes' spans, in feed order, cut into `world` ranks' parts of `share` of their total
/// (a span split where a part ends).
fn cut(spans: &[Span], world: u32) -> Vec<Vec<Span>> {
    let total: u32 = spans.iter().map(|s| s.to - s.from).sum();
    let mut ranks = Vec::with_capacity(world as usize);
    let mut rest = spans.iter().copied();
    let mut carry: Option<Span> = None;
    for rank in 0..world {
        let mut want = share(total, world, rank);
        let mut part = Vec::new();
        while want > 0 {
            let Some(mut s) = carry.take().or_else(|| rest.next()) else {
                break;
            };
            let n = (s.to - s.from).min(want);
            part.push(Span {
                to: s.from + n,
                ..s
            });
            want -= n;
            s.from += n;
            if s.from < s.to {
                carry = Some(s);
            }
        }
        ranks.push(part);
    }
    ranks
}

/// The open chunks no lane leases, in chunk order (what `source_for` hands out first).
fn free_open(state: &DataState) -> BTreeSet<ChunkId> {
    let leased: HashSet<ChunkId> = state.leases.values().flatten().copied().collect();
    state
        .open
        .keys()
        .filter(|id| !leased.contains(id))
        .copied()
        .collect()
}

/// Chunk `id` is used up: its lease ends. The reader usually holds it (at the tail another
/// rank does: found by a scan, which only the data's last steps pay).
fn release(state: &mut DataState, reader: u32, id: ChunkId) {
    let holds = |held: &Vec<ChunkId>| held.contains(&id);
    let holder = if state.leases.get(&reader).is_some_and(holds) {
        Some(reader)
    } else {
        state
            .leases
            .iter()
            .find(|(_, held)| holds(held))
            .map(|(r, _)| *r)
    };
    if let Some(r) = holder {
        if let Some(held) = state.leases.get_mut(&r) {
            held.retain(|c| *c != id);
            if held.is_empty() {
                state.leases.remove(&r);
            }
        }
    }
}

mod open_chunks;

#[cfg(test)]
mod tests;
