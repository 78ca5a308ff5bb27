//! Watching a real run: a `ferroclip coordinator` and two `ferroclip-worker join` processes over
//! TCP. The coordinator's /metrics page is read by a Prometheus text-format parser, the dashboard
//! is rendered by headless Chromium, the Grafana dashboard's queries are checked against the
//! scrape, and rank 0's TensorBoard event files are read back with their checksums.

mod observe_common;
mod run_common;

use observe_common::{dashboard::*, otlp::*, prometheus::*, tensorboard::*};
use run_common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn write_config(dir: &Path, data: &str) -> PathBuf {
    let path = dir.join("run.toml");
    let text = format!(
        r#"
[run]
name = "observe"
dir = "{run}"
seed = 7
steps = 0
epochs = 4
[data]
root = "{data}"
decode_threads = 1
prefetch_blocks = 2
[model]
preset = "custom"
embed_dim = 32
image_size = 16
patch_size = 4
vision_width = 32
vision_layers = 1
vision_heads = 2
context_length = 16
text_width = 32
text_layers = 1
text_heads = 2
[optim]
global_batch = 16
lr = 1e-3
warmup_steps = 2
[checkpoint]
every_steps = 5
[cluster]
min_workers = 2
max_workers = 2
settle_s = 0.5
heartbeat_interval_s = 0.3
heartbeat_timeout_s = 5.0
collective_timeout_s = 10.0
"#,
        run = dir.join("run").display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn grafana_dashboard_queries_only_emitted_families() {
    let known: BTreeSet<&str> = ferroclip_coordinator::metrics::FAMILIES
        .iter()
        .map(|f| f.0)
        .collect();
    let exprs = grafana_exprs();
    assert!(!exprs.is_empty());
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = promql_names(e);
        assert!(!names.is_empty(), "query without a ferroclip metric: {e}");
        for n in names {
            assert!(
                known.contains(n.as_str()),
                "{n} (in {e}) is not a family /metrics emits"
            );
            used.insert(n);
        }
    }
    for needed in [
        "ferroclip_loss",
        "ferroclip_samples_per_second",
        "ferroclip_worker_step_seconds",
        "ferroclip_worker_data_wait_seconds",
        "ferroclip_allreduce_bus_bandwidth_bytes_per_second",
        "ferroclip_checkpoint_age_seconds",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

/// `ferroclip status`: the same summary in the terminal.
fn check_status_command(grpc: u16) {
    let out = Command::new(bin("ferroclip"))
        .args([
            "status",
            "--coordinator",
            &format!("http://127.0.0.1:{grpc}"),
        ])
        .env("FERROCLIP_TOKEN", TOKEN)
        .output()
        .expect("run ferroclip status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("state training"), "{text}");
    assert!(text.contains("workers 2"), "{text}");
    for needle in ["loss/total", "lr", "w-a", "w-b", "allreduce_s"] {
        assert!(
            text.contains(needle),
            "`ferroclip status` lacks {needle}:\n{text}"
        );
    }
}

#[test]
fn a_short_run_is_observable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 400, 5);
    let cfg = write_config(tmp.path(), &data);
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let _b = worker(grpc, "w-b");

    // The probes are open; everything else wants the run token.
    wait_until(http, "the coordinator", Duration::from_secs(30), |_| true);
    assert_eq!(get(http, "/healthz", None).map(|r| r.0), Some(200));
    assert_eq!(get(http, "/readyz", None).map(|r| r.0), Some(200));
    for path in ["/metrics", "/", "/api/status", "/metrics?token=wrong-token"] {
        assert_eq!(get(http, path, None).map(|r| r.0), Some(401), "{path}");
    }

    let s = wait_until(http, "2 workers at step 2", Duration::from_secs(120), |s| {
        step_of(s) >= 2 && s["workers"].as_array().map(|w| w.len()) == Some(2)
    });
    let first = scrape(http);
    let before = step_of(&s);
    wait_until(http, "two more steps", Duration::from_secs(60), |s| {
        step_of(s) >= before + 2
    });
    let second = scrape(http);
    check_metrics(&first, &second);
    check_grafana_against(&second);
    assert!(
        one(&second, "ferroclip_rejected_rpcs_total") >= 4.0,
        "the refused requests above are counted"
    );

    check_status_command(grpc);
    check_dashboard(http, tmp.path());

    let end = wait_until(http, "the end of the run", Duration::from_secs(300), |s| {
        s["state"] == "finished"
    });
    let last = scrape(http);
    assert!(one(&last, "ferroclip_checkpoint_step") >= 5.0);
    assert!(one(&last, "ferroclip_checkpoint_age_seconds") >= 0.0);
    check_tensorboard(&tmp.path().join("run"), step_of(&end));
}

#[test]
fn spans_and_metrics_reach_an_otlp_endpoint() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let received = Received::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the OTLP port");
    let otlp = listener.local_addr().expect("addr");
    let sink = Collector(received.clone());
    let metrics = Received::default();
    let metric_sink = MetricCollector(metrics.clone());
    rt.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink))
            .add_service(MetricsServiceServer::new(metric_sink))
            .serve_with_incoming(incoming)
            .await;
    });

    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 200, 5);
    let cfg = write_config(tmp.path(), &data);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("epochs = 4", "epochs = 1")).expect("config");
    let (grpc, http) = (free_port(), free_port());
    let endpoint = format!("http://{otlp}");
    let _coord = spawn_traced(
        Command::new(bin("ferroclip"))
            .args(["coordinator", "--config"])
            .arg(&cfg)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")]),
        &endpoint,
        &tmp.path().join("coordinator.log"),
    );
    let mut workers = Vec::new();
    for id in ["w-a", "w-b"] {
        workers.push(spawn_traced(
            Command::new(bin("ferroclip-worker"))
                .args(["join", "--coordinator", &format!("http://127.0.0.1:{grpc}")])
                .args(["--device", "cpu", "--threads", "1", "--worker-id", id])
                .args(["--advertise-host", "127.0.0.1", "--log-format", "json"]),
            &endpoint,
            &tmp.path().join(format!("{id}.log")),
        ));
    }
    wait_until(http, "the end of the run", Duration::from_secs(180), |s| {
        s["state"] == "finished"
    });
    // Workers flush their spans when they exit; the coordinator exports every 200 ms.
    for w in workers.iter_mut() {
        let start = Instant::now();
        while w.0.try_wait().expect("wait").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "worker did not exit"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // --log-format json: one JSON object per line.
    let log = std::fs::read_to_string(tmp.path().join("w-a.log")).expect("worker log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "joined" && v["level"] == "INFO"),
        "{log}"
    );
    let want = [
        // No NextStep: the Join answer carries a generation's first two steps and each
        // step's report the step after next.
        ("ferroclip-coordinator", "Join"),
        ("ferroclip-coordinator", "CommitStep"),
        ("ferroclip-coordinator", "CommitCheckpoint"),
        ("ferroclip-worker", "step"),
        ("ferroclip-worker", "data_wait"),
        ("ferroclip-worker", "compute_grads"),
        ("ferroclip-worker", "compute_grads.allreduce_s"),
        ("ferroclip-worker", "step.step"),
        ("ferroclip-worker", "optimizer"),
        ("ferroclip-worker", "commit"),
        ("ferroclip-worker", "checkpoint"),
    ];
    let start = Instant::now();
    loop {
        let got: BTreeSet<(String, String)> =
            received.lock().expect("received").iter().cloned().collect();
        let missing: Vec<_> = want
            .iter()
            .filter(|(svc, name)| !got.contains(&(svc.to_string(), name.to_string())))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "spans never received: {missing:?}; received: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The coordinator's /metrics families arrive as OTLP metrics too.
    let start = Instant::now();
    loop {
        let names: BTreeMap<String, String> =
            metrics.lock().expect("metrics").iter().cloned().collect();
        let missing: Vec<&str> = ["ferroclip_step", "ferroclip_loss", "ferroclip_workers"]
            .into_iter()
            .filter(|n| !names.contains_key(*n))
            .collect();
        if missing.is_empty() {
            assert!(names["ferroclip_loss"].contains("objective"), "{names:?}");
            assert!(
                names["ferroclip_worker_deaths_total"].contains("Sum"),
                "a counter"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "metrics never received: {missing:?}; received: {:?}",
            names.keys().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
