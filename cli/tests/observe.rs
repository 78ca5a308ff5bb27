//! Watching a real run: a `ferroclip coordinator` and two `ferroclip-worker join` processes over
//! TCP. The coordinator's /metrics page is read by a Prometheus text-format parser, the dashboard
//! is rendered by headless Chromium, the Grafana dashboard's queries are checked against the
//! scrape, and rank 0's TensorBoard event files are read back with their checksums.

mod run_common;

use run_common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

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

fn scrape(http: u16) -> Scrape {
    let (code, body) = get(http, "/metrics", Some(TOKEN)).expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// Values of one metric family: labels (sorted `k=v` pairs) → value.
fn family(s: &Scrape, name: &str) -> BTreeMap<String, f64> {
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

fn one(s: &Scrape, name: &str) -> f64 {
    let f = family(s, name);
    assert_eq!(f.len(), 1, "{name}: {f:?}");
    f.values().copied().next().unwrap_or(f64::NAN)
}

fn check_metrics(first: &Scrape, second: &Scrape) {
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
fn promql_names(expr: &str) -> BTreeSet<String> {
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
fn grafana_exprs() -> Vec<String> {
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

fn check_grafana_against(s: &Scrape) {
    for e in grafana_exprs() {
        for n in promql_names(&e) {
            assert!(s.docs.contains_key(&n), "{n} (in {e}) is not in the scrape");
        }
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

fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs headless Chromium with a deadline; returns its stdout.
fn run_chromium(exe: &Path, profile: &Path, extra: &[&str], url: &str) -> String {
    let mut child = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
        ])
        .args(["--no-first-run", "--disable-background-networking"])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--window-size=1400,1100", "--virtual-time-budget=8000"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait chromium").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().expect("chromium output")
}

/// The value of attribute `attr` on the element whose id is `id` in a DOM dump.
fn attr_of(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{attr}=\"");
    let i = tag.find(&key)? + key.len();
    Some(tag[i..].split('"').next()?.to_string())
}

fn check_dashboard(http: u16, tmp: &Path) {
    let Some(exe) = chromium() else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "chromium is required under CI (scripts/setup-test-tools installs it)"
        );
        eprintln!("SKIPPED the dashboard check: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let url = format!("http://127.0.0.1:{http}/?token={TOKEN}");
    let dom = run_chromium(&exe, &tmp.join("chromium-dom"), &["--dump-dom"], &url);
    let points: usize = attr_of(&dom, "chart-loss", "data-points")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(points > 0, "the loss chart has no points; DOM:\n{dom}");
    for w in ["w-a", "w-b"] {
        assert!(
            dom.contains(&format!("data-worker=\"{w}\"")),
            "the workers table does not list {w}; DOM:\n{dom}"
        );
    }
    let step: u64 = attr_of(&dom, "chart-throughput", "data-points")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(step > 0, "the throughput chart has no points");
    let artifacts = workspace().join("target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &exe,
        &tmp.join("chromium-shot"),
        &[&format!("--screenshot={}", png.display())],
        &url,
    );
    let bytes = std::fs::read(&png).expect("the dashboard screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "screenshot too small"
    );
    eprintln!(
        "dashboard: {points} loss points; screenshot {}",
        png.display()
    );
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0x82F6_3B78 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    (!crc).rotate_right(15).wrapping_add(0xa282_ead8)
}

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// Every event of every file in `dir`, each record's two checksums verified.
fn read_events(dir: &Path) -> Vec<Event> {
    use prost::Message;
    let mut events = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("tensorboard dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        files += 1;
        let bytes = std::fs::read(&path).expect("event file");
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            assert!(rest.len() >= 16, "truncated record in {name}");
            let len_bytes: [u8; 8] = rest[..8].try_into().expect("8 bytes");
            let len = u64::from_le_bytes(len_bytes) as usize;
            let len_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
            assert_eq!(len_crc, masked_crc32c(&len_bytes), "length crc in {name}");
            let data = &rest[12..12 + len];
            let crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().expect("4 bytes"));
            assert_eq!(crc, masked_crc32c(data), "data crc in {name}");
            events.push(Event::decode(data).expect("an Event"));
            rest = &rest[16 + len..];
        }
    }
    assert!(files >= 1, "no event file");
    events
}

fn check_tensorboard(run: &Path, last_step: u64) {
    let events = read_events(&run.join("tensorboard"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.file_version.as_deref() == Some("brain.Event:2"))
            .count(),
        1,
        "one file, opened once by rank 0"
    );
    let mut by_tag: HashMap<String, BTreeMap<i64, f32>> = HashMap::new();
    for e in &events {
        for v in e.summary.iter().flat_map(|s| &s.value) {
            by_tag
                .entry(v.tag.clone())
                .or_default()
                .insert(e.step, v.simple_value.unwrap_or(f32::NAN));
        }
    }
    let lr = by_tag.get("lr").expect("lr scalars");
    let steps: Vec<i64> = lr.keys().copied().collect();
    let expected: Vec<i64> = (1..=last_step as i64).collect();
    assert_eq!(steps, expected, "a scalar per step");
    // The cosine schedule ends at 0.
    assert!(lr.values().all(|v| *v >= 0.0 && *v <= 1e-3), "{lr:?}");
    for tag in ["logit_scale", "time/step_s", "time/allreduce_s"] {
        assert_eq!(by_tag.get(tag).map(|m| m.len()), Some(steps.len()), "{tag}");
    }
    // Losses only where rank 0 had rows (the last steps of an epoch may give it none).
    let loss = by_tag.get("loss/total").expect("loss/total scalars");
    assert!(
        loss.len() * 10 >= steps.len() * 8,
        "{} of {} steps",
        loss.len(),
        steps.len()
    );
    assert!(loss.values().all(|v| v.is_finite() && *v > 0.0), "{loss:?}");
    assert_eq!(
        by_tag.get("loss/contrastive").map(|m| m.len()),
        Some(loss.len())
    );
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

/// What the OTLP collector received: (service.name, span name) for spans, (metric name, data)
/// for metrics.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        let mut got = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(
                    |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Any::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                got.push((service.clone(), span.name.clone()));
                for kv in &span.attributes {
                    got.push((service.clone(), format!("{}.{}", span.name, kv.key)));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Metric names an OTLP metric exporter sent.
struct MetricCollector(Received);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for MetricCollector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        let mut got = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rm in req.into_inner().resource_metrics {
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                got.push((m.name.clone(), format!("{:?}", m.data)));
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
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
        ("ferroclip-coordinator", "Join"),
        ("ferroclip-coordinator", "NextStep"),
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

fn spawn_traced(cmd: &mut Command, endpoint: &str, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    Proc(
        cmd.env("FERROCLIP_TOKEN", TOKEN)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
            .env_remove("OTEL_SERVICE_NAME")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a traced process"),
    )
}
