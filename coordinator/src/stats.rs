//! What the coordinator shows about a run besides its rules: events, per-step records (means
//! over ranks), each worker's last figures and the counters behind `/metrics`, the dashboard and
//! `ferroclip status`. Bounded: old records and events are dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use ferroclip_proto::metrics as metric;

/// Step records kept for the dashboard's charts.
pub const HISTORY: usize = 2000;
pub const EVENTS: usize = 500;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub unix_s: f64,
    pub kind: String,
    pub message: String,
}

/// Per-step metrics after a commit: means over ranks, samples summed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub unix_s: f64,
    pub samples: u64,
    pub metrics: BTreeMap<String, f64>,
}

impl StepRecord {
    pub fn samples_total(&self) -> u64 {
        self.metrics
            .get(metric::SAMPLES_TOTAL)
            .copied()
            .unwrap_or(0.0) as u64
    }
}

/// A worker's figures from its last CommitStep (seconds, bytes per second) and heartbeat.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStats {
    pub step: u64,
    pub step_time_s: f64,
    pub data_wait_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub allreduce_s: f64,
    pub optimizer_s: f64,
    pub allreduce_busbw: f64,
    /// Seconds it has been waiting on an unavailable store (its last heartbeat says).
    pub store_wait_s: f64,
}

impl WorkerStats {
    pub fn take_metrics(&mut self, step: u64, metrics: &[(String, f64)]) {
        self.step = step;
        for (name, value) in metrics {
            let value = *value;
            match name.as_str() {
                metric::STEP_S => self.step_time_s = value,
                metric::DATA_WAIT_S => self.data_wait_s = value,
                metric::FORWARD_S => self.forward_s = value,
                metric::BACKWARD_S => self.backward_s = value,
                metric::ALLREDUCE_S => self.allreduce_s = value,
                metric::OPTIMIZER_S => self.optimizer_s = value,
                metric::ALLREDUCE_BUSBW => self.allreduce_busbw = value,
                _ => {}
            }
        }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counters {
    pub worker_deaths: u64,
    pub recoveries: u64,
    pub last_recovery_s: f64,
    pub rejected_rpcs: u64,
    pub generations: u64,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The record of a committed step from each rank's report: losses are local means, weighted by
/// the rank's samples (a rank without rows reports 0, which is no estimate); everything else
/// (times, lr) is a plain mean over ranks.
pub fn step_record(
    step: u64,
    samples: u64,
    samples_total: u64,
    ranks: &[(u32, Vec<(String, f64)>)],
    world: usize,
    previous: Option<&StepRecord>,
) -> StepRecord {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (rows, metrics) in ranks {
        for (name, value) in metrics {
            let w = if name.starts_with(metric::LOSS_PREFIX) {
                *rows as f64
            } else {
                1.0
            };
            let e = sums.entry(name.clone()).or_default();
            e.0 += w * value;
            e.1 += w;
        }
    }
    let mut out: BTreeMap<String, f64> = sums
        .into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (sum, w))| (k, sum / w))
        .collect();
    out.insert(metric::SAMPLES_TOTAL.into(), samples_total as f64);
    out.insert(metric::WORKERS.into(), world as f64);
    let unix_s = unix_now();
    if let Some(prev) = previous {
        let dt = unix_s - prev.unix_s;
        if dt > 0.0 {
            out.insert(metric::SAMPLES_PER_S.into(), samples as f64 / dt);
        }
    }
    StepRecord {
        step,
        unix_s,
        samples,
        metrics: out,
    }
}

/// Appends to a bounded queue.
pub fn push_bounded<T>(q: &mut VecDeque<T>, item: T, cap: usize) {
    q.push_back(item);
    while q.len() > cap {
        q.pop_front();
    }
}

/// Samples per second over the last steps (one step's rate is noisy).
pub fn throughput(history: &VecDeque<StepRecord>) -> f64 {
    const WINDOW: usize = 20;
    let n = history.len();
    if n < 2 {
        return 0.0;
    }
    let first = &history[n.saturating_sub(WINDOW + 1)];
    let Some(last) = history.back() else {
        return 0.0;
    };
    let dt = last.unix_s - first.unix_s;
    let samples = last.samples_total().saturating_sub(first.samples_total());
    if dt > 0.0 {
        samples as f64 / dt
    } else {
        0.0
    }
}

/// Per-worker figures, dropped for workers gone from the run.
pub type WorkerTable = HashMap<String, WorkerStats>;
