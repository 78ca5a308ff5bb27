//! RPC latency histograms and the benchmark's report (a table, or one JSON object).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use super::gate::Gate;
use super::probe::JournalIo;
use super::CoordinatorBench;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Join,
    Heartbeat,
    NextStep,
    CommitStep,
    /// CommitCheckpoint, ReportFailure, Leave.
    Other,
}

const RPCS: [(Rpc, &str); 4] = [
    (Rpc::Heartbeat, "Heartbeat"),
    (Rpc::NextStep, "NextStep"),
    (Rpc::CommitStep, "CommitStep"),
    (Rpc::Join, "Join"),
];

/// Log-spaced buckets, 2% wide, from 1 µs to ~10 min: percentiles within 2%.
const GROWTH: f64 = 1.02;
const BUCKETS: usize = 1400;

#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    n: u64,
    max_us: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            n: 0,
            max_us: 0.0,
        }
    }
}

impl Histogram {
    fn add(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = (us.max(1.0).ln() / GROWTH.ln()) as usize;
        self.counts[i.min(BUCKETS - 1)] += 1;
        self.n += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The `q` quantile in ms (the upper edge of its bucket, at most the maximum).
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return GROWTH.powi(i as i32 + 1).min(self.max_us) / 1000.0;
            }
        }
        self.max_us / 1000.0
    }
}

/// Every call, and separately the calls made in the steady state: after the first committed
/// step, before any simulated death and before the run's last step commits (formation's Join
/// burst and the end's, every rank heartbeating for the final checkpoint and then leaving,
/// excluded).
#[derive(Default)]
pub struct Latencies {
    by_rpc: [Mutex<Histogram>; 5],
    steady_by_rpc: [Mutex<Histogram>; 5],
    /// 0 before the first commit, 1 steady, 2 after a death or the last step's commit.
    phase: AtomicU8,
}

impl Latencies {
    /// Whether a call starting now is a steady-state call (pass it to `record`).
    pub fn steady(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == 1
    }

    pub fn first_commit(&self) {
        let _ = self
            .phase
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A death, or the run's last step committed: what follows is not the steady state.
    pub fn disturbed(&self) {
        self.phase.store(2, Ordering::Relaxed);
    }

    pub fn record(&self, rpc: Rpc, d: Duration, steady: bool) {
        let i = rpc as usize;
        let add = |h: &Mutex<Histogram>| h.lock().unwrap_or_else(|p| p.into_inner()).add(d);
        add(&self.by_rpc[i]);
        if steady {
            add(&self.steady_by_rpc[i]);
        }
    }

    fn get(&self, rpc: Rpc, steady: bool) -> Histogram {
        let set = if steady {
            &self.steady_by_rpc
        } else {
            &self.by_rpc
        };
        set[rpc as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// p50, p99, max (ms) and the number of calls.
#[derive(Debug, Clone, Copy)]
pub struct RpcFigures {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub calls: u64,
}

pub struct Report {
    pub workers: u32,
    pub steps: u64,
    pub rpc: Vec<(&'static str, RpcFigures)>,
    /// The same for the steady state only (`Latencies`).
    pub rpc_steady: Vec<(&'static str, RpcFigures)>,
    pub steps_per_s: f64,
    pub wall_s: f64,
    pub coordinator_cpu_s: f64,
    pub coordinator_cpu_s_per_step: f64,
    pub rss_mb: f64,
    /// (committed step, RSS MB) once a second.
    pub rss_series: Vec<(u64, f64)>,
    pub journal: JournalIo,
    pub form_generation_s: Option<f64>,
    pub recovery_s: Option<f64>,
    pub resume_s: Option<f64>,
    pub resume_load_s: Option<f64>,
    pub resume_step: Option<u64>,
    pub crash: Option<super::crash::CrashReport>,
    /// The cores the simulated workers ran on (None: not kept off the coordinator's core).
    pub load_generator_cores: Option<String>,
    /// The load generator's CPU over the run, in cores.
    pub load_generator_cpu_share: f64,
    pub problem: Option<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &CoordinatorBench,
        lat: &Latencies,
        gate: &Gate,
        wall_s: f64,
        cpu_s: f64,
        rss_mb: f64,
        rss_series: Vec<(u64, f64)>,
        journal: JournalIo,
    ) -> Self {
        let steps = gate.committed();
        let figures = |steady: bool| {
            RPCS.iter()
                .map(|&(r, name)| {
                    let h = lat.get(r, steady);
                    let f = RpcFigures {
                        p50_ms: h.quantile_ms(0.5),
                        p99_ms: h.quantile_ms(0.99),
                        max_ms: h.max_us / 1000.0,
                        calls: h.n,
                    };
                    (name, f)
                })
                .collect()
        };
        Self {
            workers: b.workers,
            steps,
            rpc: figures(false),
            rpc_steady: figures(true),
            steps_per_s: gate.steps_per_s(),
            wall_s,
            coordinator_cpu_s: cpu_s,
            coordinator_cpu_s_per_step: cpu_s / steps.max(1) as f64,
            rss_mb,
            rss_series,
            journal,
            form_generation_s: gate.form_s(1),
            recovery_s: gate.recovery_s(),
            resume_s: None,
            resume_load_s: None,
            resume_step: None,
            crash: None,
            load_generator_cores: None,
            load_generator_cpu_share: 0.0,
            problem: None,
        }
    }

    fn journal_bytes_per_step(&self) -> f64 {
        self.journal.bytes as f64 / self.steps.max(1) as f64
    }

    fn journal_ms_per_write(&self) -> f64 {
        1000.0 * self.journal.write_s / self.journal.writes.max(1) as f64
    }

    /// Fraction of one core the coordinator used over the run.
    fn core_share(&self) -> f64 {
        self.coordinator_cpu_s / self.wall_s.max(1e-9)
    }

    pub fn json(&self) -> serde_json::Value {
        let rpc = |figures: &[(&str, RpcFigures)]| -> serde_json::Map<String, serde_json::Value> {
            figures
                .iter()
                .map(|(name, f)| {
                    let v = json!({"p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "max_ms": f.max_ms, "calls": f.calls});
                    (name.to_string(), v)
                })
                .collect()
        };
        json!({
            "workers": self.workers,
            "steps": self.steps,
            "rpc": rpc(&self.rpc),
            "rpc_steady": rpc(&self.rpc_steady),
            "steps_per_s": self.steps_per_s,
            "wall_s": self.wall_s,
            "coordinator_cpu_s_per_step": self.coordinator_cpu_s_per_step,
            "coordinator_core_share": self.core_share(),
            "rss_mb": self.rss_mb,
            "rss_series": self.rss_series,
            "journal_bytes_per_step": self.journal_bytes_per_step(),
            "journal_writes": self.journal.writes,
            "journal_record_bytes_per_step": self.journal.bytes.saturating_sub(self.journal.compaction_bytes) as f64 / self.steps.max(1) as f64,
            "journal_compactions": self.journal.compactions,
            "journal_compaction_bytes": self.journal.compaction_bytes,
            "journal_ms_per_write": self.journal_ms_per_write(),
            "journal_max_write_ms": self.journal.max_write_s * 1000.0,
            "form_generation_s": self.form_generation_s,
            "recovery_s": self.recovery_s,
            "resume_s": self.resume_s,
            "resume_load_s": self.resume_load_s,
            "resume_step": self.resume_step,
            "crash": self.crash.map(|c| json!({
                "acked_step": c.acked_step, "resumed_step": c.resumed_step,
                "resume_s": c.resume_s, "load_s": c.load_s,
            })),
            "load_generator_cores": self.load_generator_cores,
            "load_generator_cpu_share": self.load_generator_cpu_share,
            "problem": self.problem,
        })
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "coordinator with {} simulated workers, {} steps committed in {:.1}s\n\n",
            self.workers, self.steps, self.wall_s
        );
        out += "| rpc | calls | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: | ---: |\n";
        for (name, f) in &self.rpc {
            out += &format!(
                "| {name} | {} | {:.2} | {:.2} | {:.1} |\n",
                f.calls, f.p50_ms, f.p99_ms, f.max_ms
            );
        }
        for (name, f) in &self.rpc_steady {
            out += &format!(
                "| {name}, steady | {} | {:.2} | {:.2} | {:.1} |\n",
                f.calls, f.p50_ms, f.p99_ms, f.max_ms
            );
        }
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        out += &format!(
            "\nsteps/s {:.2} · coordinator CPU {:.4} s/step ({:.0}% of a core) · RSS {:.0} MB\n\
             journal {:.0} B/step, {} writes, {:.2} ms/write (max {:.1}) · form generation {} s · \
             death → next commit {} s · resume {} s (journal load {} s, step {})\n",
            self.steps_per_s,
            self.coordinator_cpu_s_per_step,
            100.0 * self.core_share(),
            self.rss_mb,
            self.journal_bytes_per_step(),
            self.journal.writes,
            self.journal_ms_per_write(),
            self.journal.max_write_s * 1000.0,
            opt(self.form_generation_s),
            opt(self.recovery_s),
            opt(self.resume_s),
            opt(self.resume_load_s),
            self.resume_step.map_or("-".into(), |s| s.to_string()),
        );
        if let Some(c) = &self.crash {
            out += &format!(
                "crash: killed after step {} was acknowledged, resumed at step {} in {:.2}s (journal load {})\n",
                c.acked_step,
                c.resumed_step,
                c.resume_s,
                opt(c.load_s)
            );
        }
        if let Some(p) = &self.problem {
            out += &format!("problem: {p}\n");
        }
        out
    }
}
