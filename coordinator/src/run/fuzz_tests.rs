//! Fuzz target of a resumed coordinator's reading of its journal (`ferroclip-fuzz`,
//! `FERROCLIP_FUZZ_SECS`): an entry's bytes parsed as the journal parses them, its compaction
//! restored and its records replayed, as `coordinator::serve` does on restart. A damaged or
//! hostile entry (a torn write, another version's fields, huge world sizes, steps out of order,
//! unknown checkpoints) must be an error, never a panic, a hang or an allocation beyond 256 MiB.
//! Regression inputs live in `coordinator/tests/fuzz_corpus/journal_replay/`.

use std::path::PathBuf;

use ferroclip_fuzz::{Fuzzer, LimitAlloc, JSON_DICT};

use super::tests::{config, Sim};
use super::Run;
use crate::journal::{Entry, Owner};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

const ROWS: [u32; 8] = [12; 8];

/// Real entries: a compaction taken mid-run and the records after it (lookahead, a death and
/// regroup, a checkpoint, pruning), and one of the run's end.
fn seeds() -> Vec<Vec<u8>> {
    let mut sim = Sim::new(config(2, 12, 3), ROWS.to_vec());
    sim.form(&["a", "b", "c"]);
    sim.step_all(1).expect("step");
    let _ = sim.run.take_records();
    let snapshot = sim.run.snapshot();
    for step in 2..=3 {
        sim.step_all(step).expect("step");
    }
    sim.checkpoint("a", 3);
    sim.next("a", 4);
    sim.form(&["a", "b"]);
    sim.step_all(4).expect("step");
    sim.checkpoint("a", 4);
    let records = sim.run.take_records();
    let summary = sim.run.summary();
    let entry = |snapshot, records| {
        serde_json::to_vec(&Entry {
            format_version: crate::journal::FORMAT_VERSION,
            owner: Owner {
                host: "h".into(),
                pid: 1,
                nonce: 2,
            },
            written_unix_s: 1.0,
            released: false,
            summary: summary.clone(),
            snapshot,
            records,
        })
        .expect("json")
    };
    let mid = entry(Some(snapshot), records.clone());
    let now = entry(Some(sim.run.snapshot()), Vec::new());
    let tail = entry(None, records);
    // A hostile world size: assigning it must not allocate per rank before refusing.
    let huge = String::from_utf8_lossy(&mid)
        .replace("\"world\":3", "\"world\":4294967295")
        .into_bytes();
    assert_ne!(huge, mid, "the seed names its world size");
    vec![mid, now, tail, huge]
}

/// Restores and replays `input`; true when the replay succeeded.
fn resume(input: &[u8]) -> bool {
    let Ok(entry) = serde_json::from_slice::<Entry>(input) else {
        return false;
    };
    let mut run = Run::new(config(2, 12, 3), ROWS.to_vec());
    if let Some(snapshot) = entry.snapshot {
        if run.restore(snapshot).is_err() {
            return false;
        }
    }
    if run.replay(&entry.records).is_err() {
        return false;
    }
    // What the resumed coordinator does next: its first compaction.
    let _ = run.snapshot();
    true
}

#[test]
fn fuzz_journal_replay() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/journal_replay");
    let mut replayed = 0u64;
    Fuzzer::new("journal_replay")
        .dict(JSON_DICT)
        .dict(&[
            b"\"world\"",
            b"\"batch\"",
            b"\"step\"",
            b"\"Assigned\"",
            b"\"Committed\"",
            b"\"Formed\"",
            b"\"Rollback\"",
            b"\"Regroup\"",
            b"\"Pruned\"",
            b"\"Checkpoint\"",
            b"\"next_chunk\"",
            b"\"open\"",
            b"\"leases\"",
            b"\"epoch\"",
            b"4294967295",
        ])
        .corpus_dir(corpus)
        .alloc_limit(256 << 20)
        .run(&seeds(), |input| {
            replayed += u64::from(resume(input));
        });
    // The seeds themselves replay (so mutants reach the replay, not only the parser).
    assert!(replayed >= 2, "only {replayed} inputs replayed");
}
