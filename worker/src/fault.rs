//! Fault injection for the exactly-once tests: `FERROCLIP_FAULT=<point>:<n>` makes this worker
//! SIGKILL itself the n-th time it reaches `point`, so a test can kill it at an exact moment of
//! a step (a kill from outside lands wherever the process happens to be); `<point>:<n>:stop`
//! makes it SIGSTOP itself there instead (the test then acts on the paused run and SIGCONTs
//! it). Off unless set.
//!
//! Points: `ring` (placed in a generation, its ring not yet dialled), `load` (samples leased,
//! batch not yet fed), `allreduce` (between gradient buckets),
//! `applied` (optimizer step done, CommitStep not sent), `checkpoint` (a checkpoint's files
//! written, its COMMIT not). A layer-level module: the gradient buckets, the overlapped reducer
//! and the checkpoint store reach points as well as `cmd::join`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static PLAN: OnceLock<Option<(String, u64, bool)>> = OnceLock::new();
static SEEN: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64, bool)> {
    PLAN.get_or_init(|| {
        let v = std::env::var("FERROCLIP_FAULT").ok()?;
        let mut parts = v.split(':');
        let (point, n, stop) = (parts.next()?, parts.next()?, parts.next());
        match (n.parse(), stop) {
            (Ok(n), None) => Some((point.to_string(), n, false)),
            (Ok(n), Some("stop")) => Some((point.to_string(), n, true)),
            _ => {
                tracing::warn!("ignoring FERROCLIP_FAULT={v}: expected <point>:<count>[:stop]");
                None
            }
        }
    })
}

/// Reached `point`; dies (or stops) here if the plan says so.
pub fn point(name: &str) {
    let Some((want, n, stop)) = plan() else {
        return;
    };
    if want != name {
        return;
    }
    if SEEN.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        let signal = if *stop { libc::SIGSTOP } else { libc::SIGKILL };
        tracing::warn!("FERROCLIP_FAULT: signal {signal} at {name} #{n}");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), signal);
        }
    }
}
