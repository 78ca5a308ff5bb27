//! The coordinator's journal: numbered entries `<journal>/snapshot-<seq>.json`, each written
//! with a conditional create. Two coordinators can therefore never both write the same number:
//! the one whose create fails has lost the journal and stops acknowledging (fencing).
//!
//! An entry holds records (the changes since the previous entry: an assignment, a commit, a
//! checkpoint, a generation), a compaction (the whole state), or neither (a lease refresh), and
//! always a summary of the state after it. Bytes per step are a few hundred whatever the world
//! size: a step's assignment is journaled as (step, world, batch) and re-computed on replay.
//! The writer compacts when the records since the last compaction outgrow it (or number
//! `writer::COMPACT_RECORDS`), so a resume replays a bounded number of records.
//!
//! The owner writes at least every `REFRESH` even when nothing changed, so a starting
//! coordinator that sees new entries appear knows the journal is held and refuses to start,
//! while one that sees none for `LEASE` takes over (a restart after a crash). Loading starts
//! from the newest readable compaction and replays the entries after it; torn or empty
//! entries at the end (never acknowledged) are skipped, so a torn newest compaction falls
//! back to the previous one, which is kept with its records until a newer one is durable.
//! On the local file system each entry is fsynced before it counts.

mod state;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferroclip_shards::retry::{is_transient, store_retry};
use ferroclip_shards::store::Location;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Deserialize;

pub use state::*;

pub const FORMAT_VERSION: u32 = 3;

/// The owner writes an entry at least this often (its liveness signal).
pub const REFRESH: Duration = Duration::from_millis(1000);
/// A journal with no new entry for this long has no live owner.
pub const LEASE: Duration = Duration::from_millis(3500);

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

fn entry_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.json")
}

fn seq_of(name: &str) -> Option<u64> {
    name.strip_prefix("snapshot-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// A journal read back: the newest compaction and the records after it, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub records: Vec<Record>,
    /// The compaction's number and the newest entry's.
    pub base_seq: u64,
    pub last_seq: u64,
    /// The newest entry (its owner, time and release mark).
    pub newest: Entry,
    /// Seconds spent reading and parsing the entries.
    pub read_s: f64,
}

pub struct Journal {
    dir: Location,
    owner: Owner,
    /// How long writes retry an unavailable store.
    budget: Duration,
    /// The sequence number of our newest entry (0: none yet).
    last_seq: u64,
    /// Numbers of the compactions kept (the newest two), and below which entries are gone.
    bases: Vec<u64>,
    pruned_below: u64,
}

impl Journal {
    /// The journal in the directory `dir` (any store); nothing is read yet.
    pub fn new(dir: Location, budget: Duration) -> Self {
        Self {
            dir,
            owner: Owner::this_process(),
            budget,
            last_seq: 0,
            bases: Vec::new(),
            pruned_below: 0,
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

    /// Entry numbers present, ascending.
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

    async fn read(&self, seq: u64) -> Result<Result<Entry, String>, JournalError> {
        let loc = self.dir.join(&entry_name(seq));
        let what = format!("reading {}", loc.url());
        let bytes = match store_retry(&what, self.budget, || async {
            loc.store.get(&loc.path).await?.bytes().await
        })
        .await
        {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Err(format!("{} vanished", entry_name(seq))))
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
            .map_err(|e| format!("{} ({} bytes): {e}", entry_name(seq), bytes.len())))
    }

    /// The newest readable compaction and the records after it.
    pub async fn load(&self) -> Result<Option<Loaded>, JournalError> {
        let seqs = self.list().await?;
        self.load_from(&seqs).await
    }

    /// Reads back from the newest entry to the newest compaction. Unreadable entries at the
    /// end (a write torn by a crash: never acknowledged) are skipped and logged; one between
    /// readable entries is a damaged journal.
    async fn load_from(&self, seqs: &[u64]) -> Result<Option<Loaded>, JournalError> {
        let mut problems = Vec::new();
        let mut later: Vec<Entry> = Vec::new();
        let mut last_seq = None;
        for &seq in seqs.iter().rev() {
            let mut entry = match self.read(seq).await? {
                Ok(e) => e,
                Err(p) if later.is_empty() => {
                    problems.push(p);
                    continue;
                }
                Err(p) => {
                    return Err(JournalError::Corrupt {
                        url: self.url(),
                        detail: format!("{p}, between readable entries"),
                    })
                }
            };
            let last_seq = *last_seq.get_or_insert(seq);
            let Some(snapshot) = entry.snapshot.take() else {
                later.push(entry);
                continue;
            };
            if !problems.is_empty() {
                tracing::warn!(
                    "journal {}: skipped unreadable entries ({}); resuming from entry {last_seq}",
                    self.url(),
                    problems.join("; ")
                );
            }
            let mut records = std::mem::take(&mut entry.records);
            let newest = later.first().cloned().unwrap_or(entry);
            for e in later.into_iter().rev() {
                records.extend(e.records);
            }
            return Ok(Some(Loaded {
                snapshot,
                records,
                base_seq: seq,
                last_seq,
                newest,
                read_s: 0.0,
            }));
        }
        if problems.is_empty() && later.is_empty() {
            Ok(None)
        } else {
            problems.push("no compaction".into());
            Err(JournalError::Corrupt {
                url: self.url(),
                detail: problems.join("; "),
            })
        }
    }

    /// Makes this coordinator the journal's owner and returns what to resume from (None: a new
    /// journal, or `fresh`). A journal whose owner still writes is refused (`Held`); one whose
    /// owner is silent for `LEASE` (crashed) or released it is taken over. The caller's first
    /// write is a compaction of the resumed state.
    pub async fn claim(&mut self, fresh: bool) -> Result<Option<Loaded>, JournalError> {
        let t = Instant::now();
        let seqs = self.list().await?;
        let Some(mut loaded) = self.load_from(&seqs).await? else {
            self.last_seq = seqs.last().copied().unwrap_or(0);
            return Ok(None);
        };
        loaded.read_s = t.elapsed().as_secs_f64();
        // The newest number present (a torn entry included): ours come after it.
        let seq = seqs.last().copied().unwrap_or(0);
        let newest = &loaded.newest;
        // A clean stop, or a last write long ago, needs no wait; otherwise watch for a live owner.
        let age = unix_now() - newest.written_unix_s;
        if !newest.released && age < 10.0 * LEASE.as_secs_f64() {
            let deadline = Instant::now() + LEASE;
            while Instant::now() < deadline {
                tokio::time::sleep(REFRESH / 4).await;
                let now_newest = self.list().await?.last().copied().unwrap_or(0);
                if now_newest > seq {
                    let (host, pid) = match self.read(now_newest).await? {
                        Ok(e) => (e.owner.host, e.owner.pid),
                        Err(_) => (newest.owner.host.clone(), newest.owner.pid),
                    };
                    return Err(JournalError::Held {
                        url: self.url(),
                        host,
                        pid,
                        seq: now_newest,
                    });
                }
            }
        }
        self.last_seq = seq;
        self.bases = vec![loaded.base_seq];
        Ok(if fresh { None } else { Some(loaded) })
    }

    /// Writes `entry` as the next one (conditional create) and returns its bytes. `Fenced`
    /// when another coordinator has written that number: this one must stop. Transient store
    /// errors are returned (the writer task retries). After a compaction, entries older than
    /// the previous compaction are deleted (in the background).
    pub async fn save(&mut self, entry: &Entry) -> Result<u64, JournalError> {
        let seq = self.last_seq + 1;
        let mut entry = entry.clone();
        entry.format_version = FORMAT_VERSION;
        entry.owner = self.owner.clone();
        entry.written_unix_s = unix_now();
        // Serialising plain data cannot fail.
        let bytes = serde_json::to_vec(&entry).unwrap_or_default();
        let len = bytes.len() as u64;
        let loc = self.dir.join(&entry_name(seq));
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
            // An earlier attempt of this very write may have landed after its client gave up
            // (a store that stalls, then catches up): that is ours, not another coordinator's.
            Err(object_store::Error::AlreadyExists { .. })
                if self.landed_earlier(seq, &entry).await? => {}
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
        if entry.snapshot.is_some() {
            self.bases.push(seq);
            if self.bases.len() > 2 {
                self.bases.remove(0);
                self.delete_below(self.bases[0]);
            }
        }
        Ok(len)
    }

    /// Whether entry `seq` is `entry` as this owner wrote it in an earlier attempt (only its
    /// time differs).
    async fn landed_earlier(&self, seq: u64, entry: &Entry) -> Result<bool, JournalError> {
        Ok(match self.read(seq).await? {
            Ok(mut found) => {
                found.written_unix_s = entry.written_unix_s;
                found == *entry
            }
            Err(_) => false,
        })
    }

    /// Deletes entries numbered below `seq` that this owner has not deleted yet, in a task
    /// of its own (a leftover costs space, never correctness).
    fn delete_below(&mut self, seq: u64) {
        let from = std::mem::replace(&mut self.pruned_below, seq);
        let dir = self.dir.clone();
        tokio::spawn(async move {
            for old in from..seq {
                let loc = dir.join(&entry_name(old));
                if let Err(e) = loc.store.delete(&loc.path).await {
                    if !matches!(e, object_store::Error::NotFound { .. }) {
                        tracing::debug!("journal: could not delete {}: {e}", loc.url());
                    }
                }
            }
        });
    }

    /// Deletes every entry older than the compaction resumed from (a claim's clean-up).
    pub async fn prune(&mut self) {
        let Some(&base) = self.bases.first() else {
            return;
        };
        let Ok(seqs) = self.list().await else { return };
        for &seq in seqs.iter().filter(|s| **s < base) {
            let old = self.dir.join(&entry_name(seq));
            let _ = old.store.delete(&old.path).await;
        }
        self.pruned_below = base;
    }
}

impl JournalError {
    /// A store failure retrying may fix (everything else ends the coordinator).
    pub fn is_transient(&self) -> bool {
        matches!(self, JournalError::Store { source, .. } if is_transient(source))
    }
}

#[cfg(test)]
mod tests;
