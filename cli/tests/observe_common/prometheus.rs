//! The /metrics page read by a Prometheus text-format parser, and the Grafana dashboard's
//! PromQL checked against it.

use crate::run_common::*;
use prometheus_parse::{Scrape, Value};
use std::collections::{BTreeMap, BTreeSet};

use crate::workspace;

pub fn scrape(http: u16) -> Scrape {
    let (code, body) = get(http, "/metrics", Some(TOKEN)).expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// Values of one metric family: labels (sorted `k=v` pairs) → value.
pub fn family(s: &Scrape, name: &str) -> BTreeMap<String, f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .map(|x| {
            let v = match x.value {
                Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => v,
                _ => panic!("{name} is not a gauge or counter"),
            };
            let mut labels: Vec<String> = ["objective", "phase", "rank", "worker"]
                .iter()
                .filter_map(|k| x.labels.get(k).map(|v| format!("{k}={v}")))
                .collect();
            labels.sort();
            (labels.join(","), v)
        })
        .collect()
}

pub fn one(s: &Scrape, name: &str) -> f64 {
    let f = family(s, name);
    assert_eq!(f.len(), 1, "{name}: {f:?}");
    f.values().copied().next().unwrap_or(f64::NAN)
}

pub fn check_metrics(first: &Scrape, second: &Scrape) {
    let (s1, s2) = (one(first, "ferroclip_step"), one(second, "ferroclip_step"));
    assert!(
        s2 > s1,
        "step did not increase between scrapes: {s1} then {s2}"
    );
    for s in [first, second] {
        assert_eq!(one(s, "ferroclip_workers"), 2.0);
        let losses = family(s, "ferroclip_loss");
        assert!(losses.contains_key("objective=total"), "{losses:?}");
        assert!(losses.contains_key("objective=contrastive"), "{losses:?}");
        assert!(
            losses.values().all(|v| v.is_finite() && *v > 0.0),
            "{losses:?}"
        );
        for name in [
            "ferroclip_worker_step_seconds",
            "ferroclip_worker_data_wait_seconds",
            "ferroclip_worker_allreduce_seconds",
        ] {
            let per_worker = family(s, name);
            assert_eq!(per_worker.len(), 2, "{name}: {per_worker:?}");
            assert!(per_worker.values().all(|v| v.is_finite() && *v >= 0.0));
        }
        let lr = one(s, "ferroclip_learning_rate");
        assert!(lr > 0.0 && lr <= 1e-3, "lr {lr}");
        assert!(one(s, "ferroclip_logit_scale") > 1.0);
        assert!(one(s, "ferroclip_allreduce_seconds") > 0.0);
        assert!(one(s, "ferroclip_allreduce_bus_bandwidth_bytes_per_second") > 0.0);
        let phases = family(s, "ferroclip_step_phase_seconds");
        assert_eq!(phases.len(), 5, "{phases:?}");
        assert_eq!(one(s, "ferroclip_worker_deaths_total"), 0.0);
        assert!(one(s, "ferroclip_generation") >= 1.0);
        let progress = one(s, "ferroclip_epoch_progress");
        assert!((0.0..=1.0).contains(&progress), "epoch progress {progress}");
    }
    assert!(one(first, "ferroclip_epoch_progress") > 0.0);
    assert!(one(second, "ferroclip_samples_per_second") > 0.0);
    assert!(one(second, "ferroclip_samples_total") > one(first, "ferroclip_samples_total"));
    assert!(matches!(
        second
            .samples
            .iter()
            .find(|x| x.metric == "ferroclip_rejected_rpcs_total")
            .map(|x| &x.value),
        Some(Value::Counter(_))
    ));
}

/// Metric names a PromQL expression uses (our families only).
pub fn promql_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("ferroclip_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every PromQL query in the dashboard: panel targets, variables, annotations.
pub fn grafana_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x.as_str()) {
                        ("expr" | "definition", Some(e)) => out.push(e.to_string()),
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let path = workspace().join("k8s/grafana/ferroclip-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the Grafana dashboard");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the Grafana dashboard is JSON");
    let panels = v["panels"].as_array().expect("panels");
    let charts = panels.iter().filter(|p| p["targets"].is_array()).count();
    assert!(charts >= 8, "only {charts} panels with queries");
    let mut exprs = Vec::new();
    walk(&v, &mut exprs);
    exprs
}

pub fn check_grafana_against(s: &Scrape) {
    for e in grafana_exprs() {
        for n in promql_names(&e) {
            assert!(s.docs.contains_key(&n), "{n} (in {e}) is not in the scrape");
        }
    }
}
