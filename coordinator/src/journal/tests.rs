use super::*;
use ferroclip_plan::{DataState, PendingStep};
use ferroclip_shards::StoreOptions;

fn snapshot(step: u64) -> Snapshot {
    Snapshot {
        identity: Identity::new("r", 1, "/d", "train", &[3, 4]),
        generation: 1,
        committed_step: step,
        data: DataState::default(),
        pending: Vec::new(),
        checkpoints: Vec::new(),
        finished: false,
        rollbacks: Vec::new(),
    }
}

fn entry(snapshot: Option<Snapshot>, records: Vec<Record>) -> Entry {
    Entry {
        format_version: FORMAT_VERSION,
        owner: Owner::this_process(),
        written_unix_s: 0.0,
        released: false,
        summary: Summary::default(),
        snapshot,
        records,
    }
}

fn full(step: u64) -> Entry {
    entry(Some(snapshot(step)), Vec::new())
}

fn commit(step: u64) -> Record {
    Record::Committed { step }
}

fn journal(dir: &std::path::Path) -> Journal {
    let loc =
        Location::open(&dir.display().to_string(), &StoreOptions::default()).expect("location");
    Journal::new(loc, Duration::from_secs(5))
}

fn files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).expect("dir").count()
}

#[tokio::test]
async fn a_silent_owner_is_taken_over_and_then_fenced() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut first = journal(dir.path());
    assert!(
        first.claim(false).await.expect("claim").is_none(),
        "new journal"
    );
    first.save(&full(0)).await.expect("save");
    for step in 1..=3 {
        first
            .save(&entry(None, vec![commit(step)]))
            .await
            .expect("save");
    }
    // The first owner falls silent (a crash, a pause): after the lease the second takes over.
    let mut second = journal(dir.path());
    let t = Instant::now();
    let resumed = second.claim(false).await.expect("claim").expect("state");
    assert!(t.elapsed() >= LEASE, "took over before the lease ran out");
    assert_eq!(resumed.snapshot.committed_step, 0);
    assert_eq!(resumed.records, vec![commit(1), commit(2), commit(3)]);
    second.save(&full(3)).await.expect("save");
    // The first one wakes up and writes: it has lost the journal.
    let err = first.save(&full(5)).await.unwrap_err();
    assert!(matches!(err, JournalError::Fenced { .. }), "{err}");
    let loaded = journal(dir.path())
        .load()
        .await
        .expect("load")
        .expect("state");
    assert_eq!(loaded.snapshot.committed_step, 3);
    assert!(loaded.records.is_empty());
}

#[tokio::test]
async fn an_earlier_attempt_that_landed_late_is_ours_and_anything_else_fences() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut j = journal(dir.path());
    assert!(j.claim(false).await.expect("claim").is_none());
    j.save(&full(0)).await.expect("save");
    let records = entry(None, vec![commit(1)]);
    j.save(&records).await.expect("save");
    // The write's answer was lost and it is retried: the store already holds it.
    j.last_seq -= 1;
    j.save(&records)
        .await
        .expect("the same entry again is ours");
    assert_eq!(j.last_seq, 2);
    // A different entry at a number already taken is another writer's: fenced.
    j.last_seq -= 1;
    let err = j.save(&entry(None, vec![commit(2)])).await.unwrap_err();
    assert!(matches!(err, JournalError::Fenced { .. }), "{err}");
    // So is the same content written by another owner.
    let mut other = journal(dir.path());
    other.last_seq = 1;
    let err = other.save(&records).await.unwrap_err();
    assert!(matches!(err, JournalError::Fenced { .. }), "{err}");
    let loaded = journal(dir.path())
        .load()
        .await
        .expect("load")
        .expect("state");
    assert_eq!(loaded.records, vec![commit(1)]);
}

#[tokio::test]
async fn a_live_owner_keeps_its_journal_and_a_released_one_is_taken_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut owner = journal(dir.path());
    owner.claim(false).await.expect("claim");
    owner.save(&full(1)).await.expect("save");
    let live = tokio::spawn(async move {
        for _ in 2..=6 {
            owner.save(&entry(None, Vec::new())).await.expect("save");
            tokio::time::sleep(REFRESH / 2).await;
        }
        owner
    });
    let err = journal(dir.path()).claim(false).await.unwrap_err();
    assert!(matches!(err, JournalError::Held { .. }), "{err}");
    let mut owner = live.await.expect("owner");
    let mut last = full(7);
    last.released = true;
    owner.save(&last).await.expect("save");
    let t = Instant::now();
    journal(dir.path())
        .claim(false)
        .await
        .expect("claim a released journal");
    assert!(t.elapsed() < LEASE, "waited for a released journal");
}

#[tokio::test]
async fn a_torn_last_entry_is_ignored_and_a_torn_compaction_falls_back_to_the_previous() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut j = journal(dir.path());
    j.claim(false).await.expect("claim");
    j.save(&full(0)).await.expect("save");
    let assigned = Record::Assigned(PendingStep {
        step: 1,
        world: 4,
        batch: 8,
    });
    j.save(&entry(None, vec![assigned.clone()]))
        .await
        .expect("save");
    j.save(&entry(None, vec![commit(1)])).await.expect("save");
    // A crash tore the next write (never acknowledged): half a JSON object.
    std::fs::write(
        dir.path().join(entry_name(4)),
        b"{\"format_version\":3,\"own",
    )
    .expect("torn");
    let loaded = journal(dir.path())
        .load()
        .await
        .expect("load")
        .expect("state");
    assert_eq!(loaded.records, vec![assigned.clone(), commit(1)]);
    assert_eq!(loaded.last_seq, 3);
    // A torn compaction at the end: the previous one and its records are still there.
    std::fs::write(dir.path().join(entry_name(5)), b"").expect("empty");
    let loaded = journal(dir.path())
        .load()
        .await
        .expect("load")
        .expect("state");
    assert_eq!(loaded.base_seq, 1);
    assert_eq!(loaded.records, vec![assigned, commit(1)]);
    // Damage between readable entries is not papered over.
    std::fs::write(dir.path().join(entry_name(2)), b"").expect("hole");
    let err = journal(dir.path()).load().await.unwrap_err();
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
}

#[tokio::test]
async fn compactions_delete_what_the_previous_one_covers() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut j = journal(dir.path());
    j.claim(false).await.expect("claim");
    for round in 0..4u64 {
        j.save(&full(round * 10)).await.expect("save");
        for s in 1..=5 {
            j.save(&entry(None, vec![commit(round * 10 + s)]))
                .await
                .expect("save");
        }
    }
    // Deletion runs in the background: give it a moment.
    for _ in 0..100 {
        if files(dir.path()) == 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The newest two compactions and the records after the older one: 2 × 6 entries.
    assert_eq!(files(dir.path()), 12);
    let loaded = j.load().await.expect("load").expect("state");
    assert_eq!(loaded.snapshot.committed_step, 30);
    assert_eq!(loaded.records.len(), 5);
}

/// A journal is another run's when its sample-order settings differ: the window changes the
/// chunks, the lanes who feeds which samples. One written before they were kept (no window,
/// lanes 0) resumes a config with lanes 0 and any window.
#[test]
fn the_window_and_the_lanes_are_part_of_a_runs_identity() {
    let base = Identity::new("r", 1, "/d", "train", &[3, 4]);
    let ours = base.clone().with_order(4, 8);
    assert_eq!(ours.mismatch(&base.clone().with_order(4, 8)), None);
    let why = ours
        .mismatch(&base.clone().with_order(2, 8))
        .expect("window");
    assert!(why.contains("data.shuffle_window_blocks = 2"), "{why}");
    let why = ours
        .mismatch(&base.clone().with_order(4, 0))
        .expect("lanes");
    assert!(why.contains("data.lanes = 0, this config has 8"), "{why}");
    // An old journal's identity, as serde reads it without the new fields.
    let mut json = serde_json::to_value(&base).expect("json");
    json.as_object_mut().expect("object").remove("lanes");
    let old: Identity = serde_json::from_value(json).expect("old identity");
    assert_eq!(base.clone().with_order(4, 0).mismatch(&old), None);
    assert!(
        ours.mismatch(&old).is_some(),
        "lanes 8 cannot resume lanes 0"
    );
}
