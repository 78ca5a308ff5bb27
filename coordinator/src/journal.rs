//! The coordinator's journal: numbered snapshots of everything needed to resume
//! (`<journal>/snapshot-<seq>.json`), each written with a conditional create. Two coordinators
//! can therefore never both write the same snapshot number: the one whose create fails has
//! lost the journal and stops acknowledging (fencing). The owner writes at least every
//! `REFRESH` even when nothing changed, so a starting coordinator that sees new snapshots
//! appear knows the journal is held and refuses to start, while one that sees none for
//! `LEASE` takes over (a restart after a crash). The two newest snapshots are kept: a torn or
//! empty newest one falls back to the previous. On the local file system each snapshot is
//! fsynced before it counts.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferroclip_plan::{DataState, StepAssignment};
use ferroclip_shards::retry::{is_transient, store_retry};
use ferroclip_shards::store::Location;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 2;

/// The owner writes a snapshot at least this often (its liveness signal).
pub const REFRESH: Duration = Duration::from_millis(1000);
/// A journal with no new snapshot for this long has no live owner.
pub const LEASE: Duration = Duration::from_millis(3500);

/// A checkpoint the coordinator has recorded (rank 0 finished writing it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub url: String,
    /// The data position right after `step`: a whole-job resume restarts the plan here.
    pub data: DataState,
}

/// What a journal belongs to: a coordinator refuses to resume another run's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub run_name: String,
    pub seed: u64,
    pub data_root: String,
    pub train_split: String,
    /// Blocks and rows of the training split, and a hash of every block's row count: the
    /// epoch plans are a function of these.
    pub blocks: u32,
    pub rows: u64,
    pub layout_hash: u64,
}

impl Identity {
    pub fn new(
        run_name: &str,
        seed: u64,
        data_root: &str,
        train_split: &str,
        block_rows: &[u32],
    ) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for r in block_rows {
            for b in r.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self {
            run_name: run_name.to_string(),
            seed,
            data_root: data_root.trim_end_matches('/').to_string(),
            train_split: train_split.to_string(),
            blocks: block_rows.len() as u32,
            rows: block_rows.iter().map(|&r| r as u64).sum(),
            layout_hash: h,
        }
    }

    /// Why `other` (a journal's) is not this run's, if it is not.
    pub fn mismatch(&self, other: &Identity) -> Option<String> {
        if self.run_name != other.run_name {
            return Some(format!(
                "it belongs to run {:?}, this config is run {:?} (run.name)",
                other.run_name, self.run_name
            ));
        }
        if self.seed != other.seed {
            return Some(format!(
                "it was started with run.seed = {}, this config has {}",
                other.seed, self.seed
            ));
        }
        if (&self.data_root, &self.train_split) != (&other.data_root, &other.train_split)
            || (self.blocks, self.rows, self.layout_hash)
                != (other.blocks, other.rows, other.layout_hash)
        {
            return Some(format!(
                "it trains on {} split {:?} ({} blocks, {} rows), this config on {} split {:?} ({} blocks, {} rows)",
                other.data_root, other.train_split, other.blocks, other.rows,
                self.data_root, self.train_split, self.blocks, self.rows
            ));
        }
        None
    }
}

/// Who wrote a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// Random per process: two coordinators never share one.
    pub nonce: u64,
}

impl Owner {
    pub fn this_process() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            host,
            pid: std::process::id(),
            nonce: nanos ^ (u64::from(std::process::id()) << 32),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format_version: u32,
    pub identity: Identity,
    pub owner: Owner,
    pub written_unix_s: f64,
    /// Written by a coordinator that stopped cleanly: the next one need not wait for a lease.
    pub released: bool,
    pub generation: u64,
    pub committed_step: u64,
    pub data: DataState,
    pub pending: Vec<StepAssignment>,
    pub checkpoints: Vec<CheckpointRecord>,
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("journal {url}: no readable snapshot ({detail})")]
    Corrupt { url: String, detail: String },
    #[error("journal {url} has format version {found}, this coordinator reads {FORMAT_VERSION}")]
    Version { url: String, found: u32 },
    #[error("journal {url} is another run's: {why}. Use a new run.dir, or --fresh to start this run over there")]
    OtherRun { url: String, why: String },
    #[error("journal {url} is held by a running coordinator ({host}, pid {pid}): it wrote snapshot {seq} while this one waited. Stop it first")]
    Held {
        url: String,
        host: String,
        pid: u32,
        seq: u64,
    },
    #[error("journal {url}: snapshot {seq} was written by another coordinator: this one has lost the run and stops")]
    Fenced { url: String, seq: u64 },
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn snapshot_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.json")
}

fn seq_of(name: &str) -> Option<u64> {
    name.strip_prefix("snapshot-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

pub struct Journal {
    dir: Location,
    owner: Owner,
    /// How long writes retry an unavailable store.
    budget: Duration,
    /// The sequence number of our newest snapshot (0: none yet).
    last_seq: u64,
}

impl Journal {
    /// The journal in the directory `dir` (any store); nothing is read yet.
    pub fn new(dir: Location, budget: Duration) -> Self {
        Self {
            dir,
            owner: Owner::this_process(),
            budget,
            last_seq: 0,
        }
    }

    pub fn url(&self) -> String {
        self.dir.url()
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    fn store_err(&self, source: object_store::Error) -> JournalError {
        JournalError::Store {
            url: self.url(),
            source,
        }
    }

    /// Snapshot numbers present, ascending.
    async fn list(&self) -> Result<Vec<u64>, JournalError> {
        let what = format!("listing the journal {}", self.url());
        let metas: Vec<_> = store_retry(&what, self.budget, || {
            self.dir
                .store
                .list(Some(&self.dir.path))
                .try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| self.store_err(e))?;
        let mut seqs: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename().and_then(seq_of))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    async fn read(&self, seq: u64) -> Result<Result<Snapshot, String>, JournalError> {
        let loc = self.dir.join(&snapshot_name(seq));
        let what = format!("reading {}", loc.url());
        let bytes = match store_retry(&what, self.budget, || async {
            loc.store.get(&loc.path).await?.bytes().await
        })
        .await
        {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Err(format!("{} vanished", snapshot_name(seq))))
            }
            Err(e) => return Err(self.store_err(e)),
        };
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        if let Ok(v) = serde_json::from_slice::<Version>(&bytes) {
            if v.format_version != FORMAT_VERSION {
                return Err(JournalError::Version {
                    url: self.url(),
                    found: v.format_version,
                });
            }
        }
        Ok(serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} ({} bytes): {e}", snapshot_name(seq), bytes.len())))
    }

    /// The newest readable snapshot and its number; a torn or empty newest one falls back to
    /// the one before (and says so in the log).
    pub async fn load(&self) -> Result<Option<(u64, Snapshot)>, JournalError> {
        let seqs = self.list().await?;
        self.load_from(&seqs).await
    }

    async fn load_from(&self, seqs: &[u64]) -> Result<Option<(u64, Snapshot)>, JournalError> {
        let mut problems = Vec::new();
        for &seq in seqs.iter().rev() {
            match self.read(seq).await? {
                Ok(snap) => {
                    if !problems.is_empty() {
                        tracing::warn!(
                            "journal {}: skipped unreadable snapshots ({}); resuming from snapshot {seq}",
                            self.url(),
                            problems.join("; ")
                        );
                    }
                    return Ok(Some((seq, snap)));
                }
                Err(p) => problems.push(p),
            }
        }
        if problems.is_empty() {
            Ok(None)
        } else {
            Err(JournalError::Corrupt {
                url: self.url(),
                detail: problems.join("; "),
            })
        }
    }

    /// Makes this coordinator the journal's owner and returns the snapshot to resume from (None:
    /// a new journal). A journal whose owner still writes is refused (`Held`); one whose owner
    /// is silent for `LEASE` (crashed) or released it is taken over. `first` is written as the
    /// new owner's first snapshot when the journal is new (or `fresh`); otherwise the caller
    /// writes its restored state next.
    pub async fn claim(&mut self, fresh: bool) -> Result<Option<Snapshot>, JournalError> {
        let seqs = self.list().await?;
        let found = self.load_from(&seqs).await?;
        let Some((_, snap)) = found else {
            self.last_seq = 0;
            return Ok(None);
        };
        // The newest number present (a torn snapshot included): ours come after it.
        let seq = seqs.last().copied().unwrap_or(0);
        // A clean stop, or a last write long ago, needs no wait; otherwise watch for a live owner.
        let age = unix_now() - snap.written_unix_s;
        if !snap.released && age < 10.0 * LEASE.as_secs_f64() {
            let deadline = Instant::now() + LEASE;
            while Instant::now() < deadline {
                tokio::time::sleep(REFRESH / 4).await;
                let newest = self.list().await?.last().copied().unwrap_or(0);
                if newest > seq {
                    let (host, pid) = match self.read(newest).await? {
                        Ok(s) => (s.owner.host, s.owner.pid),
                        Err(_) => (snap.owner.host.clone(), snap.owner.pid),
                    };
                    return Err(JournalError::Held {
                        url: self.url(),
                        host,
                        pid,
                        seq: newest,
                    });
                }
            }
        }
        self.last_seq = seq;
        Ok(if fresh { None } else { Some(snap) })
    }

    /// Writes `snap` as the next snapshot (conditional create). `Fenced` when another
    /// coordinator has written that number: this one must stop. Transient store errors are
    /// returned (the writer task retries); the previous-but-one snapshot is deleted after.
    pub async fn save(&mut self, snap: &Snapshot) -> Result<(), JournalError> {
        let seq = self.last_seq + 1;
        let mut snap = snap.clone();
        snap.owner = self.owner.clone();
        snap.written_unix_s = unix_now();
        // Serialising plain data cannot fail.
        let bytes = serde_json::to_vec(&snap).unwrap_or_default();
        let loc = self.dir.join(&snapshot_name(seq));
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match loc
            .store
            .put_opts(&loc.path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(JournalError::Fenced {
                    url: self.url(),
                    seq,
                })
            }
            Err(e) => return Err(self.store_err(e)),
        }
        loc.sync(&loc.path).map_err(|e| {
            self.store_err(object_store::Error::Generic {
                store: "local",
                source: Box::new(e),
            })
        })?;
        self.last_seq = seq;
        if seq > 2 {
            let old = self.dir.join(&snapshot_name(seq - 2));
            if let Err(e) = old.store.delete(&old.path).await {
                if !matches!(e, object_store::Error::NotFound { .. }) {
                    tracing::debug!("journal: could not delete {}: {e}", old.url());
                }
            }
        }
        Ok(())
    }

    /// Deletes every snapshot older than the newest two (a claim's clean-up).
    pub async fn prune(&self) {
        let Ok(seqs) = self.list().await else { return };
        for &seq in seqs.iter().rev().skip(2) {
            let old = self.dir.join(&snapshot_name(seq));
            let _ = old.store.delete(&old.path).await;
        }
    }
}

impl JournalError {
    /// A store failure retrying may fix (everything else ends the coordinator).
    pub fn is_transient(&self) -> bool {
        matches!(self, JournalError::Store { source, .. } if is_transient(source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclip_shards::StoreOptions;

    fn snapshot(step: u64) -> Snapshot {
        Snapshot {
            format_version: FORMAT_VERSION,
            identity: Identity::new("r", 1, "/d", "train", &[3, 4]),
            owner: Owner::this_process(),
            written_unix_s: 0.0,
            released: false,
            generation: 1,
            committed_step: step,
            data: DataState::default(),
            pending: Vec::new(),
            checkpoints: Vec::new(),
            finished: false,
        }
    }

    fn journal(dir: &std::path::Path) -> Journal {
        let loc =
            Location::open(&dir.display().to_string(), &StoreOptions::default()).expect("location");
        Journal::new(loc, Duration::from_secs(5))
    }

    #[tokio::test]
    async fn a_silent_owner_is_taken_over_and_then_fenced() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut first = journal(dir.path());
        assert!(
            first.claim(false).await.expect("claim").is_none(),
            "new journal"
        );
        for step in 1..=3 {
            first.save(&snapshot(step)).await.expect("save");
        }
        // The first owner falls silent (a crash, a pause): after the lease the second takes over.
        let mut second = journal(dir.path());
        let t = Instant::now();
        let resumed = second.claim(false).await.expect("claim").expect("state");
        assert!(t.elapsed() >= LEASE, "took over before the lease ran out");
        assert_eq!(resumed.committed_step, 3);
        second.save(&snapshot(4)).await.expect("save");
        // The first one wakes up and writes: it has lost the journal.
        let err = first.save(&snapshot(5)).await.unwrap_err();
        assert!(matches!(err, JournalError::Fenced { .. }), "{err}");
        assert_eq!(
            journal(dir.path())
                .load()
                .await
                .expect("load")
                .map(|(_, s)| s.committed_step),
            Some(4)
        );
        // Only the newest two snapshots are kept.
        second.save(&snapshot(6)).await.expect("save");
        second.prune().await;
        assert_eq!(second.list().await.expect("list").len(), 2);
    }

    #[tokio::test]
    async fn a_live_owner_keeps_its_journal_and_a_released_one_is_taken_at_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut owner = journal(dir.path());
        owner.claim(false).await.expect("claim");
        owner.save(&snapshot(1)).await.expect("save");
        let live = tokio::spawn(async move {
            for step in 2..=6 {
                owner.save(&snapshot(step)).await.expect("save");
                tokio::time::sleep(REFRESH / 2).await;
            }
            owner
        });
        let err = journal(dir.path()).claim(false).await.unwrap_err();
        assert!(matches!(err, JournalError::Held { .. }), "{err}");
        let mut owner = live.await.expect("owner");
        let mut last = snapshot(7);
        last.released = true;
        owner.save(&last).await.expect("save");
        let t = Instant::now();
        journal(dir.path())
            .claim(false)
            .await
            .expect("claim a released journal");
        assert!(t.elapsed() < LEASE, "waited for a released journal");
    }
}
