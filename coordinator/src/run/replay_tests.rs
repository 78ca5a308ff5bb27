//! The journal's records replay to the very state the live rules reached: from the start, and
//! from a compaction taken mid-run (pending lookahead steps included), across deaths,
//! regroups, a rollback to a checkpoint, pruning and the end of the run.

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
