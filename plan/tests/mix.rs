//! Dataset mixing through the public plan and ledger: proportions per window, exactly-once per
//! source, and the same epoch whatever the world size.

use std::collections::HashSet;

use ferroclip_plan::{Blocks, Bound, EpochPlan, Ledger, SampleRef, Source};

/// `rows` samples in row groups of `group` (the last one partial), as `shards build` writes.
fn source(rows: u32, group: u32, weight: f64) -> Source {
    let mut block_rows = vec![group; (rows / group) as usize];
    if !rows.is_multiple_of(group) {
        block_rows.push(rows % group);
    }
    Source { block_rows, weight }
}

/// Source 0: 300 rows weight 3; source 1: 100 rows weight 1 (sizes in the ratio of the weights).
fn three_to_one(group: u32) -> Vec<Source> {
    vec![source(300, group, 3.0), source(100, group, 1.0)]
}

fn source_of(blocks: &Blocks, s: &SampleRef) -> usize {
    blocks.locate(s.block).expect("a known block").0
}

/// Runs epoch-limited steps with `world` ranks; per step, the samples of its ranks concatenated.
fn steps(sources: &[Source], world: u32, batch: u32, epochs: u32) -> Vec<Vec<SampleRef>> {
    steps_on(sources, 0, &[world], batch, epochs)
}

/// `steps` with `lanes` fixed lanes (0: one per rank), the world size changing after step k
/// to `worlds[k]` (the last one kept). A change is a regroup as the coordinator makes it: a step
/// already assigned at the old size (the lookahead) is abandoned and its samples go back.
/// Asserts exactly-once (per epoch, and the ledger's per-source counts) and balanced parts.
fn steps_on(
    sources: &[Source],
    lanes: u32,
    worlds: &[u32],
    batch: u32,
    epochs: u32,
) -> Vec<Vec<SampleRef>> {
    let mut l = Ledger::mixed(7, 4, sources.to_vec(), Bound::Epochs(epochs)).with_lanes(lanes);
    let world_at = |k: usize| worlds[k.min(worlds.len() - 1)];
    let mut out: Vec<Vec<SampleRef>> = Vec::new();
    loop {
        let world = world_at(out.len());
        if !out.is_empty() && world != world_at(out.len() - 1) {
            let _abandoned = l.assign_next(world_at(out.len() - 1), batch);
            l.regroup(l.committed_step());
        }
        let Some(a) = l.assign_next(world, batch).cloned() else {
            break;
        };
        let parts = a.rank_batches();
        let total: u32 = parts.iter().sum();
        // Fixed lanes cut even the last, short step evenly; one lane per rank feeds it from
        // whoever still holds samples.
        let even = lanes > 0 || total == batch;
        assert!(
            !even || parts.iter().all(|&p| p.abs_diff(total / world) <= 1),
            "step {}: unbalanced parts {parts:?}",
            a.step
        );
        let samples: Vec<SampleRef> = a
            .ranks
            .iter()
            .flatten()
            .flat_map(|s| l.span_samples(s))
            .collect();
        assert!(l.commit(a.step));
        out.push(samples);
    }
    let all: Vec<&SampleRef> = out.iter().flatten().collect();
    let unique: HashSet<&SampleRef> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a sample fed twice");
    let counts = l.source_samples(l.committed_state());
    let per_epoch: Vec<u64> = sources.iter().map(|s| s.rows() * epochs as u64).collect();
    assert_eq!(counts, per_epoch, "the ledger's per-source counts");
    out
}

/// The bound `mix` states: with two sources every window (chunk) holds its weight's share
/// within 2 × the largest block, until a source runs out. Measured deviation printed.
#[test]
fn windows_hold_the_weights_share_within_two_blocks() {
    for group in [10u32, 16] {
        let (mut worst, mut worst_rows) = (0f64, 0f64);
        let sources = three_to_one(group);
        let blocks = Blocks::of(&sources);
        let bound = 2.0 * group as f64;
        for seed in 0..20 {
            let plan = EpochPlan::mixed(seed, 0, &sources, 4);
            // Matched sizes: a tail below one block / the smaller share (`mix`'s bound).
            assert!(
                plan.unmixed_rows() < 4 * group as u64,
                "{}",
                plan.unmixed_rows()
            );
            for (i, chunk) in plan.chunks().iter().enumerate() {
                let first: u64 = chunk
                    .blocks
                    .iter()
                    .filter(|&&b| blocks.locate(b).map(|(s, _)| s) == Some(0))
                    .map(|&b| sources[0].block_rows[b as usize] as u64)
                    .sum();
                let dev = (first as f64 - 0.75 * chunk.rows as f64).abs();
                worst = worst.max(dev / chunk.rows as f64);
                worst_rows = worst_rows.max(dev);
                assert!(
                    dev <= bound,
                    "seed {seed} group {group} chunk {i}: {first} of {} from source 0",
                    chunk.rows
                );
            }
        }
        println!(
            "row groups of {group}, windows of 4: worst deviation of source 0 from 3/4 of a window: {worst_rows} rows ({:.1} % of that window), bound {bound}",
            100.0 * worst
        );
    }
}

#[test]
fn each_source_exactly_once_per_epoch_at_world_1_and_3() {
    let sources = three_to_one(10);
    let blocks = Blocks::of(&sources);
    let mut epochs = Vec::new();
    for world in [1u32, 3] {
        let all: Vec<SampleRef> = steps(&sources, world, 24, 2).concat();
        for epoch in 0..2 {
            let used: Vec<&SampleRef> = all.iter().filter(|s| s.epoch == epoch).collect();
            let unique: HashSet<&SampleRef> = used.iter().copied().collect();
            assert_eq!(unique.len(), used.len(), "world {world}: a repeat");
            let per: Vec<usize> = (0..2)
                .map(|src| used.iter().filter(|s| source_of(&blocks, s) == src).count())
                .collect();
            assert_eq!(per, [300, 100], "world {world} epoch {epoch}");
        }
        let set: HashSet<SampleRef> = all.into_iter().collect();
        epochs.push(set);
    }
    assert_eq!(epochs[0], epochs[1], "world 1 and 3 use the same samples");
}

/// Per step the ranks read different chunks at world 3, so a step's samples differ from world
/// 1's; what holds at both is every step's share, within the chunk bound plus the sampling
/// spread of a 24-row slice of a shuffled 40-row window.
#[test]
fn steps_at_world_1_and_3_keep_the_mix() {
    let sources = three_to_one(10);
    let blocks = Blocks::of(&sources);
    for world in [1u32, 3] {
        let all = steps(&sources, world, 40, 1);
        let mut worst = 0usize;
        for step in &all[..all.len() - 1] {
            let first = step.iter().filter(|s| source_of(&blocks, s) == 0).count();
            worst = worst.max(first.abs_diff(30));
        }
        println!("world {world}: worst step deviation {worst} of 40");
        assert!(worst <= 20, "world {world}: {worst}");
    }
}

/// With fixed lanes (`data.lanes`) a step's samples, in order, are the same at world 1 and 3,
/// and when the world changes mid-epoch (3 → 2 → 1 → 3, each change a regroup): the global
/// batch is the lanes' shares in lane order, cut into the ranks' parts. Exactly-once and the
/// per-source counts are asserted by `steps_on`, full batches here.
#[test]
fn with_fixed_lanes_every_step_is_the_same_at_any_world_size() {
    let sources = three_to_one(10);
    for lanes in [1u32, 3, 4, 7] {
        let one = steps_on(&sources, lanes, &[1], 24, 2);
        assert_eq!(one.len(), 34, "lanes {lanes}: 800 samples in steps of 24");
        assert!(one[..33].iter().all(|s| s.len() == 24), "full batches");
        for worlds in [&[3u32][..], &[3, 3, 2, 2, 1, 3, 3, 2]] {
            let other = steps_on(&sources, lanes, worlds, 24, 2);
            assert_eq!(one, other, "lanes {lanes}, worlds {worlds:?}");
        }
    }
    // One lane per rank (the default) reads each rank's own chunks: world 3 differs.
    assert_ne!(
        steps_on(&sources, 0, &[1], 24, 2),
        steps_on(&sources, 0, &[3], 24, 2)
    );
}

#[test]
fn unequal_sizes_still_use_every_sample_once() {
    // Weights 1:1, sizes 3:1: source 1 runs out half-way; the rest of the epoch is source 0.
    let sources = vec![source(300, 10, 1.0), source(100, 10, 1.0)];
    let plan = EpochPlan::mixed(3, 0, &sources, 4);
    assert_eq!(plan.unmixed_rows(), 200);
    let blocks = Blocks::of(&sources);
    for world in [1u32, 3] {
        let all: Vec<SampleRef> = steps(&sources, world, 16, 1).concat();
        let unique: HashSet<&SampleRef> = all.iter().collect();
        assert_eq!(unique.len(), 400);
        assert_eq!(all.len(), 400);
        let second = all.iter().filter(|s| source_of(&blocks, s) == 1).count();
        assert_eq!(second, 100);
    }
}

#[test]
fn one_source_is_the_unmixed_plan() {
    let rows = vec![7u32, 3, 10, 1, 0, 5, 8];
    let a: Vec<SampleRef> = EpochPlan::new(42, 2, &rows, 3).samples().collect();
    let b: Vec<SampleRef> = EpochPlan::mixed(42, 2, &Source::single(rows.clone()), 3)
        .samples()
        .collect();
    assert_eq!(a, b);
    let mut l = Ledger::new(1, 2, rows, Bound::Epochs(1));
    let step = l.assign_next(1, 5).cloned().expect("a step");
    assert!(
        step.after.by_source.is_empty(),
        "no per-source counts journaled"
    );
    assert_eq!(l.source_samples(&step.after), vec![5]);
}

#[test]
fn the_mix_is_a_function_of_seed_and_epoch() {
    let sources = three_to_one(10);
    let order = |seed, epoch| -> Vec<SampleRef> {
        EpochPlan::mixed(seed, epoch, &sources, 4)
            .samples()
            .collect()
    };
    assert_eq!(order(5, 1), order(5, 1));
    assert_ne!(order(5, 1), order(5, 2));
    assert_ne!(order(5, 1), order(6, 1));
}

/// A coordinator restarted with the same arguments rebuilds its ledger from the journal (the
/// committed state and the pending steps as keys): with fixed lanes the steps after the restart
/// are those of an uninterrupted run, at another world size too.
#[test]
fn with_fixed_lanes_a_restored_ledger_feeds_the_same_steps() {
    let sources = three_to_one(10);
    let whole = steps_on(&sources, 4, &[3], 24, 2);
    let ledger = || Ledger::mixed(7, 4, sources.clone(), Bound::Epochs(2)).with_lanes(4);
    let mut a = ledger();
    for _ in 0..5 {
        let s = a.assign_next(3, 24).expect("step").step;
        assert!(a.commit(s));
    }
    // Steps 6 and 7 assigned, not committed, when the coordinator dies.
    a.assign_next(3, 24).expect("step 6");
    a.assign_next(3, 24).expect("step 7");
    let mut b = ledger();
    b.restore_keys(5, a.committed_state().clone(), &a.pending_keys())
        .expect("the journal re-computes");
    let samples = |l: &mut Ledger, step: u64| -> Vec<SampleRef> {
        let spans: Vec<_> = l.assignment(step).expect("pending").ranks.concat();
        spans.iter().flat_map(|s| l.span_samples(s)).collect()
    };
    for step in [6u64, 7] {
        assert_eq!(
            samples(&mut b, step),
            whole[step as usize - 1],
            "step {step}"
        );
        assert!(b.commit(step));
    }
    // The rest at world 1 after the restart (a regroup), still the same steps.
    b.regroup(7);
    let mut k = 8usize;
    while let Some(s) = b.assign_next(1, 24).cloned() {
        let got: Vec<SampleRef> = s
            .ranks
            .concat()
            .iter()
            .flat_map(|x| b.span_samples(x))
            .collect();
        assert_eq!(got, whole[k - 1], "step {k}");
        assert!(b.commit(s.step));
        k += 1;
    }
    assert_eq!(
        k - 1,
        whole.len(),
        "the run ends where the uninterrupted one does"
    );
}
