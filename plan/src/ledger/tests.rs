use super::*;
use std::collections::HashMap;

fn used(ledger: &mut Ledger, a: &StepAssignment) -> Vec<SampleRef> {
    a.ranks
        .iter()
        .flatten()
        .flat_map(|s| ledger.span_samples(s))
        .collect()
}

fn run_epoch(world: u32, batch: u32) -> Vec<SampleRef> {
    let rows = vec![5, 9, 0, 13, 7, 7, 2];
    let mut l = Ledger::new(3, 2, rows, Bound::Epochs(1));
    let mut all = Vec::new();
    while let Some(a) = l.assign_next(world, batch).cloned() {
        all.extend(used(&mut l, &a));
        assert!(l.commit(a.step));
    }
    all
}

#[test]
fn an_epoch_uses_each_sample_once_whatever_the_world_size() {
    let total = 5 + 9 + 13 + 7 + 7 + 2;
    for world in 1..=5 {
        let mut all = run_epoch(world, 8);
        assert_eq!(all.len(), total, "world {world}");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total, "duplicates with world {world}");
    }
}

#[test]
fn global_batch_is_split_evenly() {
    let mut l = Ledger::new(0, 1, vec![100; 4], Bound::Steps(1000));
    let a = l.assign_next(3, 10).cloned().expect("step");
    assert_eq!(a.rank_batches(), vec![4, 3, 3]);
    assert_eq!(a.step, 1);
}

#[test]
fn abandoned_steps_return_their_samples() {
    let rows = vec![6; 6];
    let mut l = Ledger::new(1, 2, rows, Bound::Epochs(1));
    let mut seen: HashMap<SampleRef, u32> = HashMap::new();
    // Step 1 commits; steps 2 and 3 are assigned, then the generation ends having applied 2.
    let a1 = l.assign_next(3, 6).cloned().expect("1");
    l.commit(1);
    for s in used(&mut l, &a1) {
        *seen.entry(s).or_default() += 1;
    }
    let a2 = l.assign_next(3, 6).cloned().expect("2");
    let _a3 = l.assign_next(3, 6).cloned().expect("3");
    l.regroup(2);
    assert_eq!(l.committed_step(), 2);
    for s in used(&mut l, &a2) {
        *seen.entry(s).or_default() += 1;
    }
    // Two ranks now; step 3 is re-assigned from the pool.
    while let Some(a) = l.assign_next(2, 5).cloned() {
        for s in used(&mut l, &a) {
            *seen.entry(s).or_default() += 1;
        }
        l.commit(a.step);
    }
    assert_eq!(seen.len(), 36);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
}

#[test]
fn steps_span_epochs_and_the_last_one_may_be_partial() {
    let mut l = Ledger::new(0, 1, vec![10], Bound::Epochs(2));
    let mut sizes = Vec::new();
    while let Some(a) = l.assign_next(2, 6).cloned() {
        sizes.push(a.total());
        l.commit(a.step);
    }
    assert_eq!(sizes, vec![6, 6, 6, 2]);
    assert!(l.committed_state().exhausted);
}

/// Runs the ledger to its end with `world(step)` ranks per step, regrouping (abandoning the
/// pending steps after the one applied) whenever the world size changes, and up to
/// `lookahead` steps assigned ahead. Returns the committed steps' sizes and samples.
fn drive(
    l: &mut Ledger,
    batch: u32,
    lookahead: usize,
    world: impl Fn(u64) -> u32,
) -> (Vec<u32>, Vec<SampleRef>) {
    let (mut sizes, mut samples) = (Vec::new(), Vec::new());
    let mut current = world(1);
    loop {
        let next = l.committed_step() + 1;
        if world(next) != current {
            current = world(next);
            l.regroup(l.committed_step());
        }
        while l.pending().count() < lookahead && l.assign_next(current, batch).is_some() {}
        let Some(a) = l.assignment(next).cloned() else {
            break;
        };
        // The step runs with the rank batches it was assigned: each rank its share.
        let even: Vec<u32> = (0..current)
            .map(|r| batch / current + u32::from(r < batch % current))
            .collect();
        if l.has_more() || l.pending().count() > 1 {
            assert_eq!(a.rank_batches(), even, "step {next}: uneven ranks");
        }
        sizes.push(a.total());
        samples.extend(used(l, &a));
        assert!(l.commit(next));
    }
    (sizes, samples)
}

#[test]
fn every_step_feeds_the_full_global_batch_but_the_runs_last() {
    // Ragged blocks, chunks of 3 blocks, world sizes that do not divide anything: the tail,
    // where most ranks' chunks are used up, still feeds full steps.
    let rows: Vec<u32> = (0..37).map(|i| 5 + (i * 7) % 23).collect();
    let epoch: u64 = rows.iter().map(|&r| r as u64).sum();
    for epochs in [1u32, 2] {
        for world in [1u32, 3, 4, 7] {
            for batch in [20u32, 21, 64] {
                let mut l = Ledger::new(9, 3, rows.clone(), Bound::Epochs(epochs));
                let (sizes, mut samples) = drive(&mut l, batch, 3, |_| world);
                let total = epoch * epochs as u64;
                let steps = crate::total_steps(0, epochs, epoch, batch);
                let what = format!("epochs {epochs} world {world} batch {batch}");
                assert_eq!(sizes.len() as u64, steps, "{what}: steps");
                let (last, full) = sizes.split_last().expect("steps");
                assert!(full.iter().all(|&n| n == batch), "{what}: {sizes:?}");
                assert_eq!(*last as u64, total - (steps - 1) * batch as u64, "{what}");
                samples.sort();
                samples.dedup();
                assert_eq!(samples.len() as u64, total, "{what}: exactly once");
                assert!(!l.has_more(), "{what}");
            }
        }
    }
}

#[test]
fn steps_stay_full_when_the_world_changes_at_the_tail() {
    // 3 ranks, then 2 (a death), then 4 (joins) during the last steps of the epoch.
    let rows = vec![17u32; 12];
    let mut l = Ledger::new(4, 2, rows, Bound::Epochs(1));
    let world = |step: u64| match step {
        0..=6 => 3,
        7..=9 => 2,
        _ => 4,
    };
    let (sizes, mut samples) = drive(&mut l, 18, 3, world);
    assert_eq!(sizes.len(), 12, "{sizes:?}");
    assert!(sizes[..11].iter().all(|&n| n == 18), "{sizes:?}");
    assert_eq!(sizes[11], 12 * 17 - 11 * 18);
    samples.sort();
    samples.dedup();
    assert_eq!(samples.len(), 12 * 17);
}

#[test]
fn endless_runs_always_feed_full_steps() {
    let mut l = Ledger::new(2, 2, vec![3, 11, 6], Bound::Steps(50));
    for step in 1..=50u64 {
        let a = l.assign_next(4, 13).cloned().expect("endless");
        assert_eq!(a.total(), 13, "step {step}");
        assert!(l.commit(step));
    }
    assert!(l.committed_state().epoch >= 30, "20 samples an epoch");
    assert!(
        l.assign_next(4, 13).is_none(),
        "the step limit ends the run"
    );
    assert!(!l.has_more());
    assert_eq!(l.total_steps(13), 50);
}

#[test]
fn ranks_keep_their_chunks_within_a_generation() {
    let mut l = Ledger::new(0, 1, vec![100; 4], Bound::Steps(1000));
    let a = l.assign_next(2, 8).cloned().expect("1");
    let b = l.assign_next(2, 8).cloned().expect("2");
    for r in 0..2 {
        assert_eq!(
            a.ranks[r][0].chunk, b.ranks[r][0].chunk,
            "rank {r} changed chunk"
        );
        assert_eq!(a.ranks[r][0].to, b.ranks[r][0].from);
    }
}

#[test]
fn state_survives_json() {
    let mut l = Ledger::new(0, 2, vec![7; 5], Bound::Steps(1000));
    let a = l.assign_next(2, 5).cloned().expect("1");
    let text = serde_json::to_string(&a).expect("ser");
    let back: StepAssignment = serde_json::from_str(&text).expect("de");
    assert_eq!(a, back);
}

#[test]
fn a_restored_state_must_fit_the_plan() {
    let mut l = Ledger::new(0, 2, vec![7; 5], Bound::Steps(1000));
    for step in 1..=3 {
        l.assign_next(2, 5).expect("assigns");
        assert!(l.commit(step));
    }
    let good = l.committed_state().clone();
    let chunks = l.plan(0).chunks().len() as u32;
    let mut fresh = Ledger::new(0, 2, vec![7; 5], Bound::Steps(1000));
    fresh
        .restore(3, good.clone(), Vec::new())
        .expect("its own state");
    let id = *good.open.keys().next().expect("an open chunk");

    let mut far = good.clone();
    far.next_chunk = chunks + 5;
    let mut past = good.clone();
    let cursor = past.open.remove(&id).expect("open");
    past.open.insert(
        ChunkId {
            epoch: 0,
            chunk: chunks + 5,
        },
        cursor,
    );
    let mut beyond = good.clone();
    beyond.open.insert(id, 1000);
    let mut unopened = good.clone();
    unopened
        .leases
        .insert(9, vec![ChunkId { epoch: 0, chunk: 0 }]);
    unopened.open.remove(&ChunkId { epoch: 0, chunk: 0 });
    let mut twice = good.clone();
    twice.leases.insert(9, vec![id]);
    twice.leases.insert(10, vec![id]);
    let mut sources = good.clone();
    sources.by_source = vec![1, 2, 3];
    for (what, state, says) in [
        ("next chunk", far, "data.next_chunk"),
        ("chunk past the plan", past, "data.open"),
        ("cursor past the chunk", beyond, "at sample 1000"),
        ("lease of a closed chunk", unopened, "data.leases"),
        ("lease held twice", twice, "held twice"),
        ("source counts", sources, "data.by_source"),
    ] {
        let mut l = Ledger::new(0, 2, vec![7; 5], Bound::Steps(1000));
        let err = l.restore(3, state, Vec::new()).expect_err(what);
        assert!(err.contains(says), "{what}: {err}");
        // Nothing of the refused state was taken.
        assert_eq!(l.committed_step(), 0, "{what}");
    }
}

/// With fixed lanes a rank prefetches the chunks of the lanes its part of the global batch
/// spans, and a regroup or a rollback keeps the lanes' leases (one lane per rank drops them).
#[test]
fn fixed_lanes_prefetch_the_lanes_a_rank_reads_and_keep_their_leases() {
    // 4 lanes of 3 samples each (batch 12), world 3: rank 0 reads lane 0 and one sample of
    // lane 1, rank 1 the rest of lane 1 and two of lane 2, rank 2 the rest of lane 2 and lane 3.
    let mut l = Ledger::new(0, 1, vec![10; 8], Bound::Steps(100)).with_lanes(4);
    let a = l.assign_next(3, 12).cloned().expect("step");
    assert_eq!(a.rank_batches(), vec![4, 4, 4]);
    let lease = |lane: u32| a.after.leases[&lane].clone();
    assert_eq!(l.held_by(&a, 0), [lease(0), lease(1)].concat());
    assert_eq!(l.held_by(&a, 1), [lease(1), lease(2)].concat());
    assert_eq!(l.held_by(&a, 2), [lease(2), lease(3)].concat());
    // Every lane reads a chunk of its own, so each rank's spans lie in its lanes' chunks.
    for (rank, spans) in a.ranks.iter().enumerate() {
        let held = l.held_by(&a, rank as u32);
        assert!(spans.iter().all(|s| held.contains(&s.chunk)), "rank {rank}");
    }
    let leases = a.after.leases.clone();
    assert!(l.commit(1));
    l.assign_next(3, 12).expect("step 2 (abandoned)");
    l.regroup(1);
    assert_eq!(
        l.committed_state().leases,
        leases,
        "a regroup keeps lanes' leases"
    );
    let state = l.committed_state().clone();
    l.rollback(1, state);
    assert_eq!(l.committed_state().leases, leases, "a rollback keeps them");

    let mut per_rank = Ledger::new(0, 1, vec![10; 8], Bound::Steps(100));
    let a = per_rank.assign_next(3, 12).cloned().expect("step");
    assert_eq!(per_rank.held_by(&a, 1), a.after.leases[&1]);
    assert!(per_rank.commit(1));
    per_rank.regroup(1);
    assert!(per_rank.committed_state().leases.is_empty());
}

#[test]
fn part_of_inverts_start() {
    for n in [1u32, 7, 12, 13, 100] {
        for parts in 1..=n.min(9) {
            for i in 0..parts {
                for x in start(n, parts, i)..start(n, parts, i + 1) {
                    assert_eq!(part_of(n, parts, x), i, "n {n} parts {parts} x {x}");
                }
            }
            assert_eq!(start(n, parts, parts), n);
        }
    }
}
