//! The journal's records replay to the very state the live rules reached: from the start, and
//! from a compaction taken mid-run (pending lookahead steps included), across deaths,
//! regroups, a rollback to a checkpoint, pruning and the end of the run.

use std::collections::HashMap;

use super::tests::{config, Sim};
use super::Run;
use crate::journal::{Record, Snapshot};

const ROWS: [u32; 8] = [12; 8];

/// A fresh coordinator restoring `snap` (or starting anew) and replaying `records`.
fn replayed(snap: Option<Snapshot>, records: &[Record]) -> Snapshot {
    let mut run = Run::new(config(2, 12, 3), ROWS.to_vec());
    if let Some(s) = snap {
        run.restore(s).expect("restore");
    }
    run.replay(records).expect("replay");
    run.snapshot()
}

#[test]
fn records_replay_to_the_live_state_from_the_start_and_from_any_compaction() {
    let mut sim = Sim::new(config(2, 12, 3), ROWS.to_vec());
    let mut all = Vec::new();
    sim.form(&["a", "b", "c"]);
    for step in 1..=3 {
        sim.step_all(step).expect("step");
    }
    sim.checkpoint("a", 3);
    all.extend(sim.run.take_records());
    let early = sim.run.snapshot();
    let from_early = all.len();
    // Lookahead: step 4 assigned to everyone, step 5 to "a" already.
    for id in ["a", "b", "c"] {
        sim.next(id, 4);
    }
    sim.next("a", 5);
    sim.commit("a", 4);
    sim.commit("b", 4);
    all.extend(sim.run.take_records());
    let pending = sim.run.snapshot();
    assert_eq!(pending.pending.len(), 2, "steps 4 and 5 pending");
    let from_pending = all.len();
    // "c" falls silent: the others regroup; they applied step 4, so it commits.
    for _ in 0..12 {
        sim.later(0.5);
        for id in ["a", "b"] {
            let g = sim.place[id].generation;
            let _ = sim.run.heartbeat(id, g, 0.0, sim.now);
        }
        sim.run.tick(sim.now);
    }
    sim.form(&["a", "b"]);
    for step in 5..=7 {
        sim.step_all(step).expect("step");
    }
    sim.checkpoint("a", 7);
    // Everyone is lost: newcomers roll back to the checkpoint of step 7.
    sim.later(6.0);
    sim.run.tick(sim.now);
    sim.form(&["d", "e"]);
    assert_eq!(sim.run.ledger.committed_step(), 7);
    sim.run_to_the_end();
    assert!(sim.run.finished());
    assert_eq!(sim.run.prune_checkpoints().len(), 1, "3 recorded, 2 kept");
    all.extend(sim.run.take_records());
    let live = sim.run.snapshot();
    assert!(all.iter().any(|r| matches!(r, Record::Pruned { .. })));
    assert_eq!(replayed(None, &all), live, "from the start");
    assert_eq!(replayed(Some(early), &all[from_early..]), live);
    assert_eq!(
        replayed(Some(pending), &all[from_pending..]),
        live,
        "from a compaction with pending steps"
    );
}

#[test]
fn a_record_that_does_not_fit_is_refused() {
    let mut run = Run::new(config(2, 12, 3), ROWS.to_vec());
    let err = run
        .replay(&[Record::Committed { step: 3 }])
        .expect_err("no step 3 pending");
    assert!(err.contains("not pending"), "{err}");
}

/// A tiny deterministic generator (the random schedules below).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Random schedules of the real rules (workers asking ahead, applying once every rank has
/// its samples, checkpoints, deaths, joiners) with coordinator crashes at random points: the
/// coordinator that restores the last compaction and replays the records after it must hold
/// the very assignments the live one handed out (the samples workers already fed), and the
/// run, continued by it, must feed every sample exactly once per epoch.
#[test]
fn crashes_at_random_points_resume_the_assignments_workers_were_given() {
    use ferroclip_plan::SampleRef;
    use std::collections::BTreeMap;

    const EPOCHS: u32 = 3;
    let rows = vec![7, 12, 3, 9, 12, 5, 8, 11];
    for seed in 0..300u64 {
        let mut rng = Lcg(seed * 7919 + 1);
        let cfg = config(EPOCHS, 10, 3);
        let mut sim = Sim::new(cfg.clone(), rows.clone());
        let mut fresh = 0;
        let mut ids: Vec<String> = (0..3)
            .map(|_| {
                fresh += 1;
                format!("w{fresh}")
            })
            .collect();
        sim.form(&refs(&ids));
        // The last compaction and the records after it (what a restart loads).
        let (mut base, mut since): (Option<Snapshot>, Vec<Record>) = (None, Vec::new());
        // step → rank → samples fed, per worker the samples it got for asked steps.
        let mut fed: BTreeMap<u64, BTreeMap<u32, Vec<SampleRef>>> = BTreeMap::new();
        let mut got: HashMap<String, BTreeMap<u64, Vec<SampleRef>>> = HashMap::new();
        let mut turns = 0;
        while !sim.run.finished() && turns < 3000 {
            turns += 1;
            let pick = rng.below(100);
            let id = ids[rng.below(ids.len() as u64) as usize].clone();
            let g = sim.place[&id].generation;
            let rank = sim.place[&id].rank;
            let applied = sim.applied[&id];
            let asked = got.get(&id).and_then(|m| m.keys().next_back().copied());
            if pick < 45 {
                // Ask for the next step not yet asked (up to the lookahead).
                let step = asked.unwrap_or(applied).max(applied) + 1;
                if let Ok(super::StepPlan::Samples { samples, .. }) =
                    sim.run.next_step(&id, g, step, sim.now)
                {
                    got.entry(id.clone()).or_default().insert(step, samples);
                }
            } else if pick < 85 {
                // Apply the next step once every rank holds its samples (the all-reduce).
                let step = applied + 1;
                let everyone = ids
                    .iter()
                    .all(|w| got.get(w).is_some_and(|m| m.contains_key(&step)));
                if everyone {
                    let samples = got[&id][&step].clone();
                    let report = super::StepReport {
                        step,
                        samples: samples.len() as u32,
                        metrics: vec![],
                    };
                    if sim.run.commit_step(&id, g, report, sim.now).is_ok() {
                        sim.applied.insert(id.clone(), step);
                        // Every rank's samples went into the all-reduce it applied.
                        for w in &ids {
                            let r = sim.place[w].rank;
                            fed.entry(step)
                                .or_default()
                                .insert(r, got[w][&step].clone());
                        }
                    }
                }
            } else if pick < 90 {
                if rank == 0 && applied > 0 {
                    let url = format!("s3://b/run/checkpoints/step-{applied:08}");
                    let _ = sim.run.commit_checkpoint(&id, g, applied, &url);
                }
            } else if pick < 93 {
                // A compaction: the journal's whole state now.
                since.extend(sim.run.take_records());
                base = Some(sim.run.snapshot());
                since.clear();
            } else if pick < 96 {
                // The coordinator is SIGKILLed and restarted: it loads the journal.
                since.extend(sim.run.take_records());
                // Through JSON, as the journal keeps them.
                let json = serde_json::to_string(&(&base, &since)).expect("json");
                let (snap, records): (Option<Snapshot>, Vec<Record>) =
                    serde_json::from_str(&json).expect("json back");
                let mut restarted = Run::new(cfg.clone(), rows.clone());
                if let Some(s) = snap {
                    restarted.restore(s).expect("restore");
                }
                restarted.replay(&records).expect("replay");
                let live: Vec<_> = sim.run.ledger.pending().cloned().collect();
                let back: Vec<_> = restarted.ledger.pending().cloned().collect();
                assert_eq!(back, live, "seed {seed} turn {turns}: pending assignments");
                assert_eq!(
                    restarted.ledger.committed_state(),
                    sim.run.ledger.committed_state(),
                    "seed {seed} turn {turns}"
                );
                assert_eq!(restarted.snapshot(), sim.run.snapshot(), "seed {seed}");
                restarted.take_records();
                base = Some(restarted.snapshot());
                since.clear();
                sim.run = restarted;
                sim.form(&refs(&ids));
                let next = sim.place[&ids[0]].next_step;
                fed.retain(|s, _| *s < next);
                got.clear();
            } else {
                // A worker dies; the others go silent on it, a newcomer may take its place.
                let dead = id.clone();
                ids.retain(|w| *w != dead);
                for _ in 0..12 {
                    sim.later(0.5);
                    for w in &ids {
                        let g = sim.place[w].generation;
                        let _ = sim.run.heartbeat(w, g, 0.0, sim.now);
                    }
                    sim.run.tick(sim.now);
                }
                if ids.is_empty() || rng.below(2) == 0 {
                    fresh += 1;
                    ids.push(format!("w{fresh}"));
                }
                sim.applied.remove(&dead);
                sim.form(&refs(&ids));
                let next = sim.place[&ids[0]].next_step;
                fed.retain(|s, _| *s < next);
                got.clear();
            }
            since.extend(sim.run.take_records());
        }
        assert!(sim.run.finished() || turns == 3000, "seed {seed}");
        // The model's lineage fed every sample exactly once per epoch.
        let mut count: HashMap<(u32, u32), u32> = HashMap::new();
        for ranks in fed.values() {
            for s in ranks.values().flatten() {
                *count.entry((s.block, s.row)).or_default() += 1;
            }
        }
        if sim.run.finished() {
            let total: u32 = rows.iter().sum();
            assert_eq!(count.len() as u32, total, "seed {seed}: samples fed");
            let wrong: Vec<_> = count.iter().filter(|(_, &n)| n != EPOCHS).collect();
            assert!(wrong.is_empty(), "seed {seed}: {wrong:?}");
        }
    }
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}
