//! The journal writer: a task that owns the `Journal` and appends what it is handed, so no RPC
//! does store I/O under the run lock (heartbeats never wait on the store). Each hand-over (a
//! `Batch` of records, perhaps with a compaction) gets a version; everything queued while a
//! write is in flight goes into the next entry (group commit). An RPC answers only once its
//! version is durable, and gets UNAVAILABLE (the worker retries, the calls are idempotent)
//! when a write covering it failed or took too long; the batches of a failed write stay
//! queued and are written, in order, by the next attempt. With nothing to write, an empty
//! entry is written every `journal::REFRESH`: the lease that tells a second coordinator this
//! journal is held.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::journal::{
    Entry, Journal, JournalError, Owner, Record, Snapshot, Summary, FORMAT_VERSION, REFRESH,
};

/// Records since the last compaction that make the next hand-over carry a compaction (a
/// resume replays at most about this many), unless their bytes outgrow the compaction's first.
pub const COMPACT_RECORDS: u64 = 2000;

/// One hand-over to the writer.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// The whole state after `records` (a compaction, which makes them redundant).
    pub snapshot: Option<Snapshot>,
    pub summary: Summary,
    /// The last entry of a clean stop.
    pub released: bool,
}

/// What the journal's writes have cost so far (`/api/status` `journal_io`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct WriteStats {
    pub writes: u64,
    pub bytes: u64,
    pub write_s: f64,
    pub max_write_s: f64,
    /// Compactions among them, and their bytes (absent from coordinators before the
    /// incremental journal).
    #[serde(default)]
    pub compactions: u64,
    #[serde(default)]
    pub compaction_bytes: u64,
}

impl WriteStats {
    /// The writes since `before` (the largest single write stays the largest so far).
    pub fn since(&self, before: &WriteStats) -> WriteStats {
        WriteStats {
            writes: self.writes.saturating_sub(before.writes),
            bytes: self.bytes.saturating_sub(before.bytes),
            write_s: (self.write_s - before.write_s).max(0.0),
            max_write_s: self.max_write_s,
            compactions: self.compactions.saturating_sub(before.compactions),
            compaction_bytes: self
                .compaction_bytes
                .saturating_sub(before.compaction_bytes),
        }
    }

    fn add(&mut self, bytes: u64, secs: f64, compaction: bool) {
        self.writes += 1;
        self.bytes += bytes;
        self.write_s += secs;
        self.max_write_s = self.max_write_s.max(secs);
        if compaction {
            self.compactions += 1;
            self.compaction_bytes += bytes;
        }
    }
}

/// What the writer has done so far.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The newest version that is durable.
    pub durable: u64,
    /// Failed write attempts so far, and the last error.
    pub failures: u64,
    pub last_error: Option<String>,
    /// Since when writes have been failing (the store is unavailable).
    pub failing_since: Option<Instant>,
    /// Why the writer stopped for good: another coordinator took the journal, or the store
    /// stayed unavailable beyond the retry budget. The coordinator must stop acknowledging.
    pub fatal: Option<String>,
    /// Successful writes, their bytes and seconds (the scaling benchmark reads these).
    pub io: WriteStats,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<(u64, Batch)>,
    /// No more batches: stop once they are written.
    closed: bool,
}

pub struct Writer {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    compact: Arc<AtomicBool>,
    progress: watch::Receiver<Progress>,
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// Folds queued batches into one entry: the newest compaction among them and the records of
/// the batches after it (a batch's compaction is the state after its own records, so it
/// covers them and every batch before).
fn entry_of(batches: &[(u64, Batch)], summary: &Summary) -> Entry {
    let base = batches.iter().rposition(|(_, b)| b.snapshot.is_some());
    let later = &batches[base.map_or(0, |i| i + 1)..];
    Entry {
        format_version: FORMAT_VERSION,
        owner: Owner {
            host: String::new(),
            pid: 0,
            nonce: 0,
        },
        written_unix_s: 0.0,
        released: batches.last().is_some_and(|(_, b)| b.released),
        summary: summary.clone(),
        snapshot: base.and_then(|i| batches[i].1.snapshot.clone()),
        records: later
            .iter()
            .flat_map(|(_, b)| b.records.iter().cloned())
            .collect(),
    }
}

/// The entry being written and the batches it holds. A failed write is retried with this very
/// entry: an earlier attempt may still land (a store that stalls, then catches up), and the
/// journal knows it for its own only if the content is the same. Batches queued meanwhile wait
/// for the next entry.
struct Attempt {
    batches: Vec<(u64, Batch)>,
    entry: Entry,
}

impl Attempt {
    /// The next entry: every batch queued (none: a refresh, the owner's liveness signal).
    fn next(unwritten: &mut Vec<(u64, Batch)>, summary: &mut Summary) -> Self {
        if let Some((_, b)) = unwritten.last() {
            *summary = b.summary.clone();
        }
        let batches = std::mem::take(unwritten);
        let entry = entry_of(&batches, summary);
        Self { batches, entry }
    }
}

impl Writer {
    /// Starts the task; `first` (version 1, a compaction) is written at once. `budget` bounds
    /// how long writes retry an unavailable store before the coordinator gives up.
    pub fn spawn(mut journal: Journal, first: Batch, budget: Duration) -> (Self, JoinHandle<()>) {
        let queue = Arc::new(Mutex::new(Queue {
            batches: VecDeque::from([(1, first)]),
            closed: false,
        }));
        let wake = Arc::new(Notify::new());
        let compact = Arc::new(AtomicBool::new(false));
        let (tx, progress) = watch::channel(Progress::default());
        let (q, w, c) = (queue.clone(), wake.clone(), compact.clone());
        let task = tokio::spawn(async move {
            let mut unwritten: Vec<(u64, Batch)> = Vec::new();
            let mut attempt: Option<Attempt> = None;
            let mut summary = Summary::default();
            let mut last_write = Instant::now();
            let mut backoff = Duration::from_millis(100);
            // Since the last compaction: its size, and the records and bytes written after it.
            let (mut base_bytes, mut since_bytes, mut since_records) = (0u64, 0u64, 0u64);
            loop {
                let closed = {
                    let mut q = lock(&q);
                    unwritten.extend(q.batches.drain(..));
                    q.closed
                };
                let a = match attempt.take() {
                    Some(a) => a,
                    None if unwritten.is_empty() && closed => return,
                    None if unwritten.is_empty() && last_write.elapsed() < REFRESH => {
                        let wait = REFRESH.saturating_sub(last_write.elapsed());
                        tokio::select! {
                            _ = w.notified() => {}
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                    None => Attempt::next(&mut unwritten, &mut summary),
                };
                let entry = &a.entry;
                // Faults are injected into writes of new state only (refreshes are timing).
                let action = if a.batches.is_empty() {
                    crate::fault::Action::Proceed
                } else {
                    crate::fault::at("journal")
                };
                let started = Instant::now();
                let r = match action {
                    crate::fault::Action::Fail => Err(JournalError::Store {
                        url: journal.url(),
                        source: object_store::Error::Generic {
                            store: "fault",
                            source: "injected journal write failure".into(),
                        },
                    }),
                    crate::fault::Action::Stall(d) => {
                        tokio::time::sleep(d).await;
                        journal.save(entry).await
                    }
                    crate::fault::Action::Proceed => journal.save(entry).await,
                };
                let mut p = tx.borrow().clone();
                match r {
                    Ok(bytes) => {
                        let compaction = entry.snapshot.is_some();
                        p.io.add(bytes, started.elapsed().as_secs_f64(), compaction);
                        if compaction {
                            (base_bytes, since_bytes, since_records) = (bytes, 0, 0);
                        } else {
                            since_bytes += bytes;
                            since_records += entry.records.len() as u64;
                        }
                        if since_records >= COMPACT_RECORDS
                            || (since_records > 0 && since_bytes >= base_bytes)
                        {
                            c.store(true, Ordering::Relaxed);
                        }
                        if let Some((v, _)) = a.batches.last() {
                            p.durable = *v;
                        }
                        last_write = Instant::now();
                        backoff = Duration::from_millis(100);
                        p.failing_since = None;
                        let _ = tx.send(p);
                    }
                    Err(e) => {
                        p.failures += 1;
                        p.last_error = Some(e.to_string());
                        let since = *p.failing_since.get_or_insert_with(Instant::now);
                        let fatal = match &e {
                            JournalError::Fenced { .. } => Some(e.to_string()),
                            _ if !e.is_transient() => Some(e.to_string()),
                            _ if since.elapsed() > budget => Some(format!(
                                "the journal's store failed for {:.0}s, more than store.retry_budget_s: {e}",
                                since.elapsed().as_secs_f64()
                            )),
                            _ => None,
                        };
                        tracing::warn!("journal write failed (attempt {}): {e}", p.failures);
                        let stop = fatal.is_some();
                        p.fatal = fatal;
                        let _ = tx.send(p);
                        if stop {
                            return;
                        }
                        attempt = Some(a);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        let writer = Self {
            queue,
            wake,
            compact,
            progress,
        };
        (writer, task)
    }

    /// Queues version `version` (versions are handed over in increasing order).
    pub fn submit(&self, version: u64, batch: Batch) {
        lock(&self.queue).batches.push_back((version, batch));
        self.wake.notify_one();
    }

    /// Whether the next hand-over should carry a compaction (and forgets the wish: the
    /// caller takes one).
    pub fn take_compaction_wish(&self) -> bool {
        self.compact.swap(false, Ordering::Relaxed)
    }

    /// Writes `batch` (a compaction, marked released so the next coordinator need not wait
    /// out a lease) as the last entry and stops the task.
    pub async fn finish(&self, version: u64, mut batch: Batch, limit: Duration) {
        batch.released = true;
        self.submit(version, batch);
        let _ = self.durable(version, limit).await;
        lock(&self.queue).closed = true;
        self.wake.notify_one();
    }

    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Waits until `version` is durable. Err (a message for UNAVAILABLE) when a write attempt
    /// made after the call started failed, the writer stopped, or `limit` passed.
    pub async fn durable(&self, version: u64, limit: Duration) -> Result<(), String> {
        let mut rx = self.progress.clone();
        let failures_at_start = rx.borrow().failures;
        let wait = async {
            loop {
                {
                    let p = rx.borrow_and_update();
                    if p.durable >= version {
                        return Ok(());
                    }
                    if let Some(f) = &p.fatal {
                        return Err(format!("the coordinator cannot write its journal: {f}"));
                    }
                    if p.failures > failures_at_start {
                        return Err(format!(
                            "the journal write failed, retry: {}",
                            p.last_error.clone().unwrap_or_default()
                        ));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("the journal writer stopped".to_string());
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the journal is not durable after {:.0}s (its store is slow or down): retry",
                limit.as_secs_f64()
            )),
        }
    }

    /// Resolves when the writer has stopped for good (fenced, or the store stayed down).
    pub async fn fatal(&self) -> String {
        let mut rx = self.progress.clone();
        loop {
            if let Some(f) = rx.borrow_and_update().fatal.clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                return "the journal writer stopped".into();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Identity, Snapshot};

    fn batch(records: &[u64], snapshot: bool) -> Batch {
        Batch {
            records: records
                .iter()
                .map(|&step| Record::Committed { step })
                .collect(),
            snapshot: snapshot.then(|| Snapshot {
                identity: Identity::new("r", 1, "/d", "train", &[1]),
                generation: 1,
                committed_step: 2,
                data: Default::default(),
                pending: Vec::new(),
                checkpoints: Vec::new(),
                finished: false,
                rollbacks: Vec::new(),
            }),
            ..Batch::default()
        }
    }

    #[test]
    fn a_compaction_covers_its_own_records_and_those_queued_before_it() {
        let queued = [
            (1, batch(&[1], false)),
            (2, batch(&[2], true)),
            (3, batch(&[3], false)),
        ];
        let e = entry_of(&queued, &Summary::default());
        assert_eq!(e.snapshot.map(|s| s.committed_step), Some(2));
        assert_eq!(e.records, vec![Record::Committed { step: 3 }]);
        let e = entry_of(&queued[..1], &Summary::default());
        assert!(e.snapshot.is_none());
        assert_eq!(e.records, vec![Record::Committed { step: 1 }]);
    }

    #[test]
    fn an_entry_is_retried_as_first_written_and_later_batches_wait_for_the_next() {
        let mut summary = Summary::default();
        let mut unwritten = vec![(1, batch(&[1], false)), (2, batch(&[2], false))];
        let first = Attempt::next(&mut unwritten, &mut summary);
        assert!(unwritten.is_empty(), "the attempt holds every queued batch");
        // The write fails; meanwhile more is queued. The retry is `first` itself (the loop
        // keeps it); what came later is the next entry's.
        unwritten.push((3, batch(&[3], false)));
        let records = |a: &Attempt| a.entry.records.clone();
        assert_eq!(
            records(&first),
            vec![Record::Committed { step: 1 }, Record::Committed { step: 2 }]
        );
        assert_eq!(first.batches.last().map(|(v, _)| *v), Some(2));
        let second = Attempt::next(&mut unwritten, &mut summary);
        assert_eq!(records(&second), vec![Record::Committed { step: 3 }]);
        // Nothing queued: a refresh.
        let refresh = Attempt::next(&mut unwritten, &mut summary);
        assert!(refresh.batches.is_empty() && refresh.entry.records.is_empty());
    }
}
