//! The epoch plan: which samples an epoch uses and in what order. A pure function of
//! (seed, epoch, manifest) that does not depend on the world size, so a run can resume on
//! another number of workers and still see every sample once per epoch.
//!
//! Blocks (Parquet row groups) are permuted (with several sources, each source's and then merged
//! by weight: `mix`); consecutive windows of `window` blocks form a
//! *chunk*, the unit the coordinator leases to a rank; rows inside a chunk are shuffled
//! together. A cursor is an offset into a chunk's sample order.

use serde::{Deserialize, Serialize};

use crate::mix::{merge, Source};

/// One use of a sample: row `row` of block `block` (blocks numbered as
/// `shards::Dataset::blocks`) in epoch `epoch`. The epoch is part of the identity because each
/// epoch uses every sample once, and it seeds the sample's augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SampleRef {
    pub epoch: u32,
    pub block: u32,
    pub row: u32,
}

impl SampleRef {
    /// Row `row` of block `block` outside any epoch plan (evaluation, embedding): epoch 0.
    pub fn at(block: u32, row: u32) -> Self {
        Self {
            epoch: 0,
            block,
            row,
        }
    }
}

/// A lease unit: a window of blocks whose rows are shuffled together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub blocks: Vec<u32>,
    pub rows: u32,
}

#[derive(Debug, Clone)]
pub struct EpochPlan {
    seed: u64,
    epoch: u32,
    block_rows: Vec<u32>,
    chunks: Vec<Chunk>,
    len: u64,
    unmixed: u64,
}

impl EpochPlan {
    /// `block_rows[i]` is the row count of block `i`; `window` blocks are shuffled together.
    pub fn new(seed: u64, epoch: u32, block_rows: &[u32], window: u32) -> Self {
        Self::mixed(seed, epoch, &Source::single(block_rows.to_vec()), window)
    }

    /// The plan of several sources (`mix`): blocks numbered globally, each source's permuted
    /// on its own, merged by weight, then cut into chunks of `window` blocks. One source is
    /// exactly the unmixed plan.
    pub fn mixed(seed: u64, epoch: u32, sources: &[Source], window: u32) -> Self {
        let window = window.max(1) as usize;
        let merged = merge(sources, |i, blocks| {
            // Source 0 keeps the unmixed plan's key, so single-dataset plans never change.
            let key = match i {
                0 => mix(&[seed, epoch as u64, 0xb10c]),
                i => mix(&[seed, epoch as u64, 0xb10c, i as u64]),
            };
            shuffle(blocks, &mut SplitMix64::new(key));
        });
        let block_rows: Vec<u32> = sources
            .iter()
            .flat_map(|s| s.block_rows.iter().copied())
            .collect();
        let chunks: Vec<Chunk> = merged
            .order
            .chunks(window)
            .map(|blocks| Chunk {
                blocks: blocks.to_vec(),
                rows: blocks.iter().map(|&b| block_rows[b as usize]).sum(),
            })
            .collect();
        let len = chunks.iter().map(|c| c.rows as u64).sum();
        Self {
            seed,
            epoch,
            block_rows,
            chunks,
            len,
            unmixed: merged.unmixed_rows,
        }
    }

    /// Samples at the end of the epoch that come from fewer than all sources (one ran out).
    pub fn unmixed_rows(&self) -> u64 {
        self.unmixed
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Samples in the epoch.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The sample order of chunk `index`, computed on demand so a plan of a huge dataset stays small.
    pub fn chunk_samples(&self, index: usize) -> Vec<SampleRef> {
        let Some(chunk) = self.chunks.get(index) else {
            return Vec::new();
        };
        let epoch = self.epoch;
        let mut samples: Vec<SampleRef> = chunk
            .blocks
            .iter()
            .flat_map(|&block| {
                (0..self.block_rows[block as usize]).map(move |row| SampleRef { epoch, block, row })
            })
            .collect();
        let key = mix(&[self.seed, self.epoch as u64, index as u64, 0x5a3b]);
        shuffle(&mut samples, &mut SplitMix64::new(key));
        samples
    }

    /// Every sample of the epoch in plan order (chunk by chunk).
    pub fn samples(&self) -> impl Iterator<Item = SampleRef> + '_ {
        (0..self.chunks.len()).flat_map(move |i| self.chunk_samples(i))
    }
}

/// SplitMix64: tiny, fast, and fixed forever, so plans never change with a crate upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0), by rejection so there is no modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

fn mix(parts: &[u64]) -> u64 {
    let mut rng = SplitMix64::new(0x243f_6a88_85a3_08d3);
    let mut h = 0u64;
    for &p in parts {
        rng.0 ^= p;
        h ^= rng.next_u64();
    }
    h
}

fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_sample_exactly_once_in_an_epoch() {
        let rows = [7, 3, 10, 1, 0, 5, 8];
        let plan = EpochPlan::new(42, 0, &rows, 3);
        let all: Vec<SampleRef> = plan.samples().collect();
        assert_eq!(all.len() as u64, plan.len());
        assert_eq!(plan.len(), rows.iter().map(|&r| r as u64).sum::<u64>());
        let set: HashSet<_> = all.iter().copied().collect();
        assert_eq!(set.len(), all.len());
        for s in &all {
            assert!(s.row < rows[s.block as usize]);
        }
    }

    #[test]
    fn pure_function_of_seed_and_epoch() {
        let rows = [16u32; 20];
        let a: Vec<_> = EpochPlan::new(1, 3, &rows, 4).samples().collect();
        let b: Vec<_> = EpochPlan::new(1, 3, &rows, 4).samples().collect();
        assert_eq!(a, b);
        let c: Vec<_> = EpochPlan::new(1, 4, &rows, 4).samples().collect();
        let d: Vec<_> = EpochPlan::new(2, 3, &rows, 4).samples().collect();
        assert_ne!(a, c, "epochs must differ");
        assert_ne!(a, d, "seeds must differ");
    }

    #[test]
    fn rows_of_a_window_are_mixed_across_its_blocks() {
        let rows = [50u32; 4];
        let plan = EpochPlan::new(9, 0, &rows, 4);
        let first: Vec<_> = plan.chunk_samples(0).into_iter().take(20).collect();
        let blocks: HashSet<u32> = first.iter().map(|s| s.block).collect();
        assert!(
            blocks.len() > 1,
            "window shuffle should interleave blocks: {first:?}"
        );
        assert_eq!(plan.chunks().len(), 1);
    }

    #[test]
    fn one_source_keeps_the_pre_mixing_block_order() {
        // Journals and checkpoints of single-dataset runs hold positions in these plans.
        let rows = [3u32; 17];
        let plan = EpochPlan::new(11, 2, &rows, 4);
        let mut order: Vec<u32> = (0..17).collect();
        shuffle(&mut order, &mut SplitMix64::new(mix(&[11, 2, 0xb10c])));
        let blocks: Vec<u32> = plan
            .chunks()
            .iter()
            .flat_map(|c| c.blocks.clone())
            .collect();
        assert_eq!(blocks, order);
    }

    #[test]
    fn chunks_follow_a_block_permutation() {
        let rows = [1u32; 10];
        let plan = EpochPlan::new(5, 0, &rows, 3);
        let blocks: Vec<u32> = plan
            .chunks()
            .iter()
            .flat_map(|c| c.blocks.clone())
            .collect();
        let mut sorted = blocks.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(blocks, sorted, "blocks should be permuted");
        assert_eq!(
            plan.chunks()
                .iter()
                .map(|c| c.blocks.len())
                .collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
    }
}
