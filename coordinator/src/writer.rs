//! The journal writer: a task that owns the `Journal` and writes the newest snapshot it is
//! handed, so no RPC does store I/O under the run lock (heartbeats never wait on the store).
//! Each change gets a version; an RPC answers only once its version is durable, and gets
//! UNAVAILABLE (the worker retries, the calls are idempotent) when a write covering it failed
//! or took too long. With nothing to write, the newest snapshot is written again every
//! `journal::REFRESH`: the lease that tells a second coordinator this journal is held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::journal::{Journal, JournalError, Snapshot, REFRESH};

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
}

pub struct Writer {
    latest: watch::Sender<(u64, Option<Arc<Snapshot>>)>,
    progress: watch::Receiver<Progress>,
}

impl Writer {
    /// Starts the task; `first` (version 1) is written at once. `budget` bounds how long writes
    /// retry an unavailable store before the coordinator gives up.
    pub fn spawn(
        mut journal: Journal,
        first: Snapshot,
        budget: Duration,
    ) -> (Self, JoinHandle<()>) {
        let (latest, mut rx) = watch::channel((1, Some(Arc::new(first))));
        let (tx, progress) = watch::channel(Progress::default());
        let task = tokio::spawn(async move {
            let mut written = 0u64;
            let mut last_write = Instant::now();
            let mut backoff = Duration::from_millis(100);
            loop {
                let (version, snap) = rx.borrow_and_update().clone();
                let Some(snap) = snap else {
                    return; // shut down
                };
                let due = version > written || last_write.elapsed() >= REFRESH;
                if !due {
                    let wait = REFRESH.saturating_sub(last_write.elapsed());
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                // Faults are injected into writes of new state only (refreshes are timing).
                let action = if version > written {
                    crate::fault::at("journal")
                } else {
                    crate::fault::Action::Proceed
                };
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
                        journal.save(&snap).await
                    }
                    crate::fault::Action::Proceed => journal.save(&snap).await,
                };
                let mut p = tx.borrow().clone();
                match r {
                    Ok(()) => {
                        written = version;
                        last_write = Instant::now();
                        backoff = Duration::from_millis(100);
                        p.durable = version;
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
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        (Self { latest, progress }, task)
    }

    /// Hands version `version` of the run's state to the writer (newer ones replace older
    /// ones not yet written: only the newest state matters).
    pub fn submit(&self, version: u64, snap: Snapshot) {
        self.latest.send_replace((version, Some(Arc::new(snap))));
    }

    /// Asks the task to write `snap` one last time (released, so the next coordinator need not
    /// wait out a lease) and stop.
    pub async fn finish(&self, version: u64, mut snap: Snapshot, limit: Duration) {
        snap.released = true;
        self.submit(version, snap);
        let _ = self.durable(version, limit).await;
        self.latest.send_replace((version, None));
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
