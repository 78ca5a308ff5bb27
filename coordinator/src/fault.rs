//! Fault injection for the coordinator's tests: `FERROCLIP_COORDINATOR_FAULT=<point>:<n>[:<ms>]`
//! makes the n-th arrival at `point` fail once (`fail`) or stall for `ms` (`slow`), so a test can
//! break a journal write at an exact moment. Off unless set.
//!
//! Points: `journal` (before a snapshot is written). Forms: `journal:fail:3` (the 3rd write
//! fails), `journal:slow:3:6000` (the 3rd write takes 6 s longer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Plan {
    point: String,
    kind: String,
    n: u64,
    ms: u64,
}

static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
static SEEN: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<Plan> {
    PLAN.get_or_init(|| {
        let v = std::env::var("FERROCLIP_COORDINATOR_FAULT").ok()?;
        let parts: Vec<&str> = v.split(':').collect();
        let parsed = match parts.as_slice() {
            [point, kind, n] => n.parse().ok().map(|n| (point, kind, n, 0)),
            [point, kind, n, ms] => n
                .parse()
                .ok()
                .zip(ms.parse().ok())
                .map(|(n, ms)| (point, kind, n, ms)),
            _ => None,
        };
        match parsed {
            Some((point, kind, n, ms)) if matches!(*kind, "fail" | "slow") => Some(Plan {
                point: point.to_string(),
                kind: kind.to_string(),
                n,
                ms,
            }),
            _ => {
                tracing::warn!("ignoring FERROCLIP_COORDINATOR_FAULT={v}: expected <point>:fail:<n> or <point>:slow:<n>:<ms>");
                None
            }
        }
    })
}

/// What the plan asks of this arrival at `point`.
pub enum Action {
    Proceed,
    Fail,
    Stall(std::time::Duration),
}

pub fn at(point: &str) -> Action {
    let Some(p) = plan() else {
        return Action::Proceed;
    };
    if p.point != point || SEEN.fetch_add(1, Ordering::Relaxed) + 1 != p.n {
        return Action::Proceed;
    }
    tracing::warn!(
        "FERROCLIP_COORDINATOR_FAULT: {} at {point} #{}",
        p.kind,
        p.n
    );
    match p.kind.as_str() {
        "fail" => Action::Fail,
        _ => Action::Stall(std::time::Duration::from_millis(p.ms)),
    }
}
