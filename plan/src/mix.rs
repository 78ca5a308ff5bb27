//! Dataset mixing (`data.sources`): several datasets in one epoch plan, interleaved by weight.
//!
//! Blocks are numbered globally: source 0's blocks, then source 1's, and so on, so a
//! `SampleRef` stays `{epoch, block, row}` and `Blocks::locate` maps it back to a source.
//! An epoch permutes each source's blocks on its own, then merges the sources' block lists by
//! smooth weighted round-robin on rows: the next block comes from the source furthest behind
//! its weight's share of the rows merged so far. Every block of every source appears exactly
//! once, so every sample is used exactly once per epoch; the weights set the rate at which
//! the sources interleave. A source that is smaller than its weight's share runs out first and
//! the tail of the epoch holds only the others (`Merged::unmixed_rows`).
//!
//! With two sources, after every merged block each source's rows differ from its share of the
//! rows so far by less than the largest block `b`, so any run of consecutive blocks (a shuffle
//! window, a chunk) holds each source's share within 2b rows until the first source runs out;
//! with sizes in the ratio of the weights the unmixed tail is below b / (the smaller share).

use serde::{Deserialize, Serialize};

/// One source of the plan: the row count of each of its blocks and its weight (> 0, finite).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub block_rows: Vec<u32>,
    pub weight: f64,
}

impl Source {
    /// A single dataset: the plan of one source with weight 1 is the unmixed plan.
    pub fn single(block_rows: Vec<u32>) -> Vec<Source> {
        vec![Source {
            block_rows,
            weight: 1.0,
        }]
    }

    pub fn rows(&self) -> u64 {
        self.block_rows.iter().map(|&r| r as u64).sum()
    }
}

/// The global block numbering of a list of sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    /// `starts[i]` is source i's first global block; the last entry is the total.
    starts: Vec<u32>,
}

impl Blocks {
    /// From the block count of each source.
    pub fn new(counts: impl IntoIterator<Item = usize>) -> Self {
        let mut starts = vec![0u32];
        let mut at = 0u32;
        for c in counts {
            at = at.saturating_add(u32::try_from(c).unwrap_or(u32::MAX));
            starts.push(at);
        }
        Self { starts }
    }

    pub fn of(sources: &[Source]) -> Self {
        Self::new(sources.iter().map(|s| s.block_rows.len()))
    }

    pub fn sources(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn total(&self) -> u32 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The global number of source `source`'s block `block`.
    pub fn global(&self, source: usize, block: u32) -> u32 {
        self.starts[source] + block
    }

    /// (source, block within it) of a global block number; `None` past the last block.
    pub fn locate(&self, global: u32) -> Option<(usize, u32)> {
        if global >= self.total() {
            return None;
        }
        // The last start <= global that begins a non-empty source.
        let source = self.starts.partition_point(|&s| s <= global) - 1;
        Some((source, global - self.starts[source]))
    }
}

/// An epoch's merged block order.
#[derive(Debug, Clone)]
pub struct Merged {
    /// Global block numbers, every block of every source once.
    pub order: Vec<u32>,
    /// Rows at the end of the epoch taken after the first source ran out (0 with one source).
    pub unmixed_rows: u64,
}

/// Per-source block permutations merged by weight. `permute(i, blocks)` shuffles source i's
/// global block numbers in place (the epoch plan's seeded shuffle).
pub fn merge(sources: &[Source], mut permute: impl FnMut(usize, &mut [u32])) -> Merged {
    let blocks = Blocks::of(sources);
    let mut lists: Vec<Vec<u32>> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut l: Vec<u32> = (0..s.block_rows.len() as u32)
                .map(|b| blocks.global(i, b))
                .collect();
            permute(i, &mut l);
            l
        })
        .collect();
    if lists.len() == 1 {
        return Merged {
            order: lists.pop().unwrap_or_default(),
            unmixed_rows: 0,
        };
    }
    let total_weight: f64 = sources.iter().map(|s| s.weight).sum();
    let share: Vec<f64> = sources.iter().map(|s| s.weight / total_weight).collect();
    let rows_of = |g: u32| -> u32 {
        blocks
            .locate(g)
            .map_or(0, |(s, b)| sources[s].block_rows[b as usize])
    };
    let mut next = vec![0usize; sources.len()];
    let mut taken = vec![0u64; sources.len()];
    let mut merged_rows = 0u64;
    let mut order = Vec::with_capacity(blocks.total() as usize);
    let mut unmixed_from: Option<u64> = None;
    loop {
        let live: Vec<usize> = (0..sources.len())
            .filter(|&s| next[s] < lists[s].len())
            .collect();
        if live.is_empty() {
            break;
        }
        if unmixed_from.is_none() && live.len() < sources.len() {
            unmixed_from = Some(merged_rows);
        }
        // Furthest behind its share; ties go to the lower source (deterministic).
        let mut pick = live[0];
        let mut best = f64::NEG_INFINITY;
        for &s in &live {
            let behind = share[s] * merged_rows as f64 - taken[s] as f64;
            if behind > best {
                best = behind;
                pick = s;
            }
        }
        let g = lists[pick][next[pick]];
        next[pick] += 1;
        let r = rows_of(g) as u64;
        taken[pick] += r;
        merged_rows += r;
        order.push(g);
    }
    Merged {
        order,
        unmixed_rows: unmixed_from.map_or(0, |from| merged_rows - from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(blocks: usize, rows: u32, weight: f64) -> Source {
        Source {
            block_rows: vec![rows; blocks],
            weight,
        }
    }

    #[test]
    fn locate_maps_global_blocks_back() {
        let b = Blocks::new([3, 0, 2]);
        assert_eq!(b.total(), 5);
        assert_eq!(b.locate(0), Some((0, 0)));
        assert_eq!(b.locate(2), Some((0, 2)));
        assert_eq!(b.locate(3), Some((2, 0)), "an empty source is skipped");
        assert_eq!(b.locate(4), Some((2, 1)));
        assert_eq!(b.locate(5), None);
        assert_eq!(b.global(2, 1), 4);
    }

    #[test]
    fn merge_interleaves_by_weight_and_keeps_every_block() {
        let sources = [src(30, 10, 3.0), src(10, 10, 1.0)];
        let m = merge(&sources, |_, _| {});
        let mut sorted = m.order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
        // Sizes in the ratio of the weights: every 4 consecutive blocks hold 3 of source 0.
        for w in m.order.chunks(4) {
            assert_eq!(w.iter().filter(|&&g| g < 30).count(), 3, "{:?}", m.order);
        }
        // Matched sizes leave a tail below one block / the smaller share (40 rows): here 20.
        assert_eq!(m.unmixed_rows, 20);
    }

    #[test]
    fn a_relatively_small_source_runs_out_first() {
        // Weights 1:1 but sizes 3:1: source 1 is gone after ~20 blocks; the last ~20 are unmixed.
        let sources = [src(30, 10, 1.0), src(10, 10, 1.0)];
        let m = merge(&sources, |_, _| {});
        assert_eq!(m.order.len(), 40);
        assert_eq!(m.unmixed_rows, 200);
        assert!(m.order[20..].iter().all(|&g| g < 30));
    }
}
