//! Riding out store outages. An object store that refuses connections or answers 5xx for a
//! while (a restart, a network blip) must not end a run: a run's reads and writes retry with
//! backoff until `StoreOptions::retry_budget` is spent. Errors that retrying cannot fix (not
//! found, already exists, a failed precondition, bad credentials or configuration) return at
//! once. `waiting_s()` says how long this process has been waiting on its store, so dashboards
//! can show a run that waits instead of one that hangs.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::ShardsError;

/// Whether retrying the same request later can succeed.
pub fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotImplemented { .. }
            | E::NotSupported { .. }
            | E::InvalidPath { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

impl ShardsError {
    /// A store error that retrying can fix (directly, or under a Parquet read).
    pub fn is_transient(&self) -> bool {
        match self {
            ShardsError::Store { source, .. } => is_transient(source),
            ShardsError::Parquet {
                source: parquet::errors::ParquetError::External(e),
                ..
            } => e
                .downcast_ref::<object_store::Error>()
                .is_some_and(is_transient),
            ShardsError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ),
            _ => false,
        }
    }
}

/// Operations of this process now retrying, and since when the oldest has been.
static WAITING: Mutex<(usize, Option<Instant>)> = Mutex::new((0, None));

/// Seconds this process has been waiting on an unavailable store (0 when it is not).
pub fn waiting_s() -> f64 {
    let w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
    w.1.map_or(0.0, |t| t.elapsed().as_secs_f64())
}

/// Counts one retrying operation for `waiting_s` while alive.
struct Waiting;

impl Waiting {
    fn start(since: Instant) -> Self {
        let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        w.0 += 1;
        if w.1.is_none_or(|t| since < t) {
            w.1 = Some(since);
        }
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        w.0 = w.0.saturating_sub(1);
        if w.0 == 0 {
            w.1 = None;
        }
    }
}

/// Runs `op` until it succeeds, fails for good, or `budget` has passed since the first failure
/// (backoff 0.2 s doubling to 5 s). `what` names the operation in logs.
pub async fn with_retry<T, E, F, Fut>(
    what: &str,
    budget: Duration,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut waiting: Option<(Instant, Waiting)> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        match op().await {
            Ok(v) => {
                if let Some((since, _)) = waiting {
                    tracing::info!(
                        "{what}: the store answers again after {:.1}s",
                        since.elapsed().as_secs_f64()
                    );
                }
                return Ok(v);
            }
            Err(e) if transient(&e) => {
                let now = Instant::now();
                let since = waiting.get_or_insert_with(|| (now, Waiting::start(now))).0;
                let waited = now.duration_since(since);
                if waited >= budget {
                    tracing::error!(
                        "{what}: the store failed for {:.0}s, more than store.retry_budget_s = {:.0}: {e}",
                        waited.as_secs_f64(),
                        budget.as_secs_f64()
                    );
                    return Err(e);
                }
                tracing::warn!(
                    "{what}: store unavailable ({e}); retrying in {:.1}s ({:.0}s of {:.0}s waited)",
                    backoff.as_secs_f64(),
                    waited.as_secs_f64(),
                    budget.as_secs_f64()
                );
                tokio::time::sleep(backoff.min(budget - waited)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `with_retry` for object-store calls.
pub async fn store_retry<T, F, Fut>(what: &str, budget: Duration, op: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = object_store::Result<T>>,
{
    with_retry(what, budget, is_transient, op).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `waiting_s` is process-wide: tests that retry take turns (`cargo test` runs them on
    /// threads of one process).
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: msg.to_string().into(),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success_and_counted_as_waiting() {
        let _turn = SERIAL.lock().await;
        let calls = AtomicUsize::new(0);
        let r = store_retry("get x", Duration::from_secs(30), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 2 {
                assert!(n == 0 || waiting_s() > 0.0, "waiting while retrying");
                Err(generic("connection refused"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r.expect("third call succeeds"), 2);
        assert_eq!(waiting_s(), 0.0, "no longer waiting");
    }

    #[tokio::test]
    async fn permanent_errors_return_at_once_and_the_budget_ends_retrying() {
        let _turn = SERIAL.lock().await;
        let calls = AtomicUsize::new(0);
        let r: object_store::Result<()> = store_retry("get y", Duration::from_secs(30), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(object_store::Error::NotFound {
                path: "y".into(),
                source: "gone".into(),
            })
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let t = Instant::now();
        let r: object_store::Result<()> =
            store_retry("get z", Duration::from_millis(700), || async {
                Err(generic("503"))
            })
            .await;
        assert!(r.is_err());
        assert!(
            t.elapsed() >= Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
    }
}
