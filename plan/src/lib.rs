//! Which samples every optimizer step feeds: the epoch plan (a pure function of seed, epoch
//! and the manifests' block sizes, several sources mixed by weight) and the ledger over it (assignments of steps to ranks,
//! commits, regroups and rollbacks). No I/O and no clock, so the coordinator, the single-process
//! trainer and the tests all run the very same rules.

pub mod epoch;
pub mod ledger;
pub mod mix;

pub use epoch::{Chunk, EpochPlan, SampleRef};
pub use ledger::{Bound, ChunkId, DataState, Ledger, PendingStep, Span, StepAssignment};
pub use mix::{Blocks, Source};

/// Optimizer steps of a run. Step-limited (`steps > 0`): `steps`. Epoch-limited: every step
/// feeds a full global batch, steps run across epoch boundaries, so the run takes
/// ⌈epochs × epoch_len / global_batch⌉ steps and only the very last may be short (it holds the
/// remainder, so that every sample of every epoch is used exactly once).
pub fn total_steps(steps: u64, epochs: u32, epoch_len: u64, global_batch: u32) -> u64 {
    if steps > 0 {
        return steps;
    }
    (epoch_len * epochs as u64).div_ceil(global_batch.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_steps_counts_full_batches_across_epochs() {
        assert_eq!(total_steps(150, 1, 1000, 20), 150);
        assert_eq!(total_steps(0, 1, 1500, 20), 75);
        // 25 samples × 3 epochs in batches of 4: 18 full steps and one of 3.
        assert_eq!(total_steps(0, 3, 25, 4), 19);
        assert_eq!(total_steps(0, 1, 0, 4), 0);
    }
}
