//! The run's figures in the Prometheus text exposition format (version 0.0.4). Workers report
//! through the coordinator, so this one page is the only scrape target of a run.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::run::Run;

/// Every metric family this page can emit: (name, type, help). Families are always announced
/// (HELP/TYPE) so dashboards see the names before the first step.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    ("ferroclip_info", "gauge", "Run name and state (value 1)."),
    ("ferroclip_step", "gauge", "Last committed optimizer step."),
    (
        "ferroclip_total_steps",
        "gauge",
        "Steps the whole run takes.",
    ),
    ("ferroclip_epoch", "gauge", "Epoch of the data position."),
    (
        "ferroclip_epoch_progress",
        "gauge",
        "Fraction of the current epoch used.",
    ),
    (
        "ferroclip_loss",
        "gauge",
        "Last committed step's loss per objective (mean over ranks).",
    ),
    (
        "ferroclip_learning_rate",
        "gauge",
        "Learning rate of the last committed step.",
    ),
    (
        "ferroclip_logit_scale",
        "gauge",
        "Contrastive logit scale (exp of the parameter).",
    ),
    (
        "ferroclip_grad_norm",
        "gauge",
        "Global gradient norm before clipping.",
    ),
    (
        "ferroclip_samples_per_second",
        "gauge",
        "Training samples per second over the last steps.",
    ),
    (
        "ferroclip_samples_total",
        "counter",
        "Samples consumed by committed steps.",
    ),
    (
        "ferroclip_source_samples_total",
        "counter",
        "Samples of each data source (data.sources, or data.root) consumed by committed steps.",
    ),
    (
        "ferroclip_step_seconds",
        "gauge",
        "Wall time of the last committed step (mean over ranks).",
    ),
    (
        "ferroclip_step_phase_seconds",
        "gauge",
        "Parts of the last committed step (mean over ranks).",
    ),
    (
        "ferroclip_allreduce_seconds",
        "gauge",
        "Gradient all-reduce time of the last step (mean over ranks).",
    ),
    (
        "ferroclip_allreduce_bus_bandwidth_bytes_per_second",
        "gauge",
        "All-reduce bus bandwidth (ring convention: bytes x 2(n-1)/n / time).",
    ),
    (
        "ferroclip_worker_step_seconds",
        "gauge",
        "Step time per worker.",
    ),
    (
        "ferroclip_worker_data_wait_seconds",
        "gauge",
        "Data wait per worker and step.",
    ),
    (
        "ferroclip_worker_allreduce_seconds",
        "gauge",
        "Gradient all-reduce time per worker and step.",
    ),
    (
        "ferroclip_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since the worker was last heard from.",
    ),
    (
        "ferroclip_workers",
        "gauge",
        "Workers in the current generation.",
    ),
    ("ferroclip_generation", "gauge", "Membership generation."),
    (
        "ferroclip_generations_total",
        "counter",
        "Generations formed by this coordinator.",
    ),
    (
        "ferroclip_worker_deaths_total",
        "counter",
        "Generations ended by a failure.",
    ),
    (
        "ferroclip_recoveries_total",
        "counter",
        "Failures followed by a committed step.",
    ),
    (
        "ferroclip_last_recovery_seconds",
        "gauge",
        "Seconds from the last failure to the next committed step.",
    ),
    (
        "ferroclip_rejected_rpcs_total",
        "counter",
        "Requests rejected (auth, stale generation, malformed).",
    ),
    (
        "ferroclip_checkpoint_step",
        "gauge",
        "Step of the newest recorded checkpoint.",
    ),
    (
        "ferroclip_checkpoint_age_seconds",
        "gauge",
        "Seconds since the newest checkpoint was recorded.",
    ),
    (
        "ferroclip_uptime_seconds",
        "gauge",
        "Seconds since the coordinator started.",
    ),
    (
        "ferroclip_store_wait_seconds",
        "gauge",
        "Seconds a process has been waiting on an unavailable object store (0: it is not), by role: the coordinator's journal, or a worker.",
    ),
    (
        "ferroclip_step_metric",
        "gauge",
        "Any other figure workers report (mean over ranks).",
    ),
];

/// Worker metric names (CommitStep) → step phase label.
use ferroclip_proto::metrics::{self as metric, PHASES};

/// Keys of the step record shown by a dedicated family (not repeated as ferroclip_step_metric).
const NAMED: &[&str] = &[
    metric::LR,
    metric::LOGIT_SCALE,
    metric::GRAD_NORM,
    metric::SAMPLES_TOTAL,
    metric::SAMPLES_PER_S,
    metric::WORKERS,
    metric::STEP_S,
    metric::ALLREDUCE_BUSBW,
];

/// One sample of a family: what both the text page and the OTLP export are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

#[derive(Default)]
struct Page {
    samples: Vec<Sample>,
}

impl Page {
    fn put(&mut self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        if !value.is_finite() {
            return;
        }
        self.samples.push(Sample {
            name,
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        });
    }
}

/// The text exposition of `samples`, every family announced in `FAMILIES` order.
pub fn text(samples: &[Sample]) -> String {
    let mut by_name: BTreeMap<&str, String> = BTreeMap::new();
    for x in samples {
        let line = by_name.entry(x.name).or_default();
        line.push_str(x.name);
        if !x.labels.is_empty() {
            line.push('{');
            for (i, (k, v)) in x.labels.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                let _ = write!(line, "{k}=\"{}\"", escape(v));
            }
            line.push('}');
        }
        let _ = writeln!(line, " {}", x.value);
    }
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        if let Some(lines) = by_name.get(name) {
            out.push_str(lines);
        }
    }
    out
}

/// Label values: backslash, double quote and newline escaped as the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole /metrics page. `rejected` counts RPCs and HTTP requests refused so far.
/// What the page shows besides the run's state: the service's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Service {
    pub rejected: u64,
    /// Seconds the journal has been waiting on its store.
    pub journal_store_wait_s: f64,
}

pub fn render(run: &Run, service: Service) -> String {
    text(&samples(run, service))
}

/// Every current sample of the run (non-finite values left out).
pub fn samples(run: &Run, service: Service) -> Vec<Sample> {
    let rejected = service.rejected;
    let mut p = Page::default();
    let s = run.status();
    let (epoch, progress) = run.epoch_progress();
    p.put(
        "ferroclip_info",
        &[("run", &run.config.run.name), ("state", s.state)],
        1.0,
    );
    p.put("ferroclip_step", &[], s.step as f64);
    p.put("ferroclip_total_steps", &[], run.total_steps() as f64);
    p.put("ferroclip_epoch", &[], epoch as f64);
    p.put("ferroclip_epoch_progress", &[], progress);
    p.put("ferroclip_samples_per_second", &[], run.throughput());
    for (source, n) in run.source_samples() {
        p.put(
            "ferroclip_source_samples_total",
            &[("source", source)],
            n as f64,
        );
    }
    if let Some(last) = run.history.back() {
        let m = &last.metrics;
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        for (k, v) in m.range(metric::LOSS_PREFIX.to_string()..) {
            let Some(objective) = k.strip_prefix(metric::LOSS_PREFIX) else {
                break;
            };
            p.put("ferroclip_loss", &[("objective", objective)], *v);
        }
        p.put("ferroclip_learning_rate", &[], get(metric::LR));
        p.put("ferroclip_logit_scale", &[], get(metric::LOGIT_SCALE));
        p.put("ferroclip_grad_norm", &[], get(metric::GRAD_NORM));
        p.put("ferroclip_samples_total", &[], get(metric::SAMPLES_TOTAL));
        p.put("ferroclip_step_seconds", &[], get(metric::STEP_S));
        for (key, phase) in PHASES {
            p.put(
                "ferroclip_step_phase_seconds",
                &[("phase", phase)],
                get(key),
            );
        }
        p.put("ferroclip_allreduce_seconds", &[], get(metric::ALLREDUCE_S));
        p.put(
            "ferroclip_allreduce_bus_bandwidth_bytes_per_second",
            &[],
            get(metric::ALLREDUCE_BUSBW),
        );
        for (k, v) in m {
            let shown = k.starts_with(metric::LOSS_PREFIX)
                || NAMED.contains(&k.as_str())
                || PHASES.iter().any(|(key, _)| key == k);
            if !shown {
                p.put("ferroclip_step_metric", &[("name", k)], *v);
            }
        }
    }
    for w in &s.workers {
        let rank = w.rank.to_string();
        let labels = [
            ("rank", rank.as_str()),
            ("worker", w.worker_id.as_str()),
            ("host", w.host.as_str()),
        ];
        p.put("ferroclip_worker_step_seconds", &labels, w.step_time_s);
        p.put("ferroclip_worker_data_wait_seconds", &labels, w.data_wait_s);
        p.put("ferroclip_worker_allreduce_seconds", &labels, w.allreduce_s);
        p.put(
            "ferroclip_worker_heartbeat_age_seconds",
            &labels,
            w.seconds_since_heartbeat,
        );
        p.put(
            "ferroclip_store_wait_seconds",
            &[("role", "worker"), ("worker", w.worker_id.as_str())],
            w.store_wait_s,
        );
    }
    p.put(
        "ferroclip_store_wait_seconds",
        &[("role", "journal")],
        service.journal_store_wait_s,
    );
    let c = &run.counters;
    p.put("ferroclip_workers", &[], s.workers.len() as f64);
    p.put("ferroclip_generation", &[], s.generation as f64);
    p.put("ferroclip_generations_total", &[], c.generations as f64);
    p.put("ferroclip_worker_deaths_total", &[], c.worker_deaths as f64);
    p.put("ferroclip_recoveries_total", &[], c.recoveries as f64);
    p.put("ferroclip_last_recovery_seconds", &[], c.last_recovery_s);
    p.put("ferroclip_rejected_rpcs_total", &[], rejected as f64);
    if let Some(cp) = run.checkpoints.last() {
        p.put("ferroclip_checkpoint_step", &[], cp.step as f64);
    }
    if let Some(age) = run.checkpoint_age_s() {
        p.put("ferroclip_checkpoint_age_seconds", &[], age);
    }
    p.put(
        "ferroclip_uptime_seconds",
        &[],
        run.started.elapsed().as_secs_f64(),
    );
    p.samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn non_finite_values_are_left_out_and_families_announced() {
        let mut p = Page::default();
        p.put("ferroclip_step", &[], f64::NAN);
        p.put("ferroclip_loss", &[("objective", "mlm")], 1.5);
        let out = text(&p.samples);
        assert!(!out.contains("ferroclip_step NaN"));
        assert!(out.contains("# TYPE ferroclip_step gauge\n"));
        assert!(out.contains("ferroclip_loss{objective=\"mlm\"} 1.5\n"));
        let announced = out.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(announced, FAMILIES.len());
    }
}
