//! What the tests of real runs share: a synthetic dataset, a `ferroclip coordinator` and
//! `ferroclip-worker join` processes on free ports, and the coordinator's /api/status.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "run-test-token-0123";

pub fn bin(name: &str) -> PathBuf {
    // Cargo puts every binary of the workspace beside this one.
    PathBuf::from(env!("CARGO_BIN_EXE_ferroclip")).with_file_name(name)
}

pub fn free_port() -> u16 {
    ferroclip_proto::ports::spare_loopback_port().expect("free port")
}

/// A child process killed (if still running) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferroclip shards synth` of `rows` 16 px rows into `dir/data`; returns its path.
pub fn synth(dir: &Path, rows: u32, seed: u32) -> String {
    let out = dir.join("data");
    let status = Command::new(bin("ferroclip"))
        .args(["shards", "synth", "--rows", &rows.to_string()])
        .args(["--seed", &seed.to_string(), "--image-size", "16"])
        .args(["--rows-per-row-group", "20", "--val-fraction", "0.1"])
        .args(["--no-progress", "--out"])
        .arg(&out)
        .status()
        .expect("run shards synth");
    assert!(status.success());
    out.to_string_lossy().to_string()
}

/// `ferroclip coordinator` as Kubernetes starts it: the same arguments on every (re)start.
pub fn coordinator(config: &Path, grpc: u16, http: u16) -> Proc {
    coordinator_with(config, grpc, http, &[], &[])
}

pub fn coordinator_with(
    config: &Path,
    grpc: u16,
    http: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut c = Command::new(bin("ferroclip"));
    c.args(["coordinator", "--config"])
        .arg(config)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(args)
        .env("FERROCLIP_TOKEN", TOKEN)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    Proc(c.spawn().expect("start coordinator"))
}

pub fn worker(grpc: u16, id: &str) -> Proc {
    worker_with(grpc, id, &[])
}

pub fn worker_with(grpc: u16, id: &str, env: &[(&str, &str)]) -> Proc {
    Proc(
        Command::new(bin("ferroclip-worker"))
            .args(["join", "--coordinator", &format!("http://127.0.0.1:{grpc}")])
            .args(["--device", "cpu", "--threads", "1", "--worker-id", id])
            .args(["--advertise-host", "127.0.0.1"])
            .env("FERROCLIP_TOKEN", TOKEN)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("start worker"),
    )
}

/// A plain HTTP/1.1 GET: (status code, body). None while the server is not up.
pub fn get(http: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", http)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The coordinator's /api/status as JSON (None while it is not up).
pub fn status(http: u16) -> Option<serde_json::Value> {
    let (code, body) = get(http, "/api/status", Some(TOKEN))?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

pub fn wait_until(
    http: u16,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(s) = status(http) {
            if pred(&s) {
                return s;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}: {:?}",
            status(http)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn step_of(s: &serde_json::Value) -> u64 {
    s["step"].as_u64().unwrap_or(0)
}

/// Every train key of a dataset (a path or URL).
pub fn train_keys(data: &str, opts: &ferroclip_shards::StoreOptions) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let ds = ferroclip_shards::Dataset::open(data, opts)
            .await
            .expect("open");
        let mut keys = Vec::new();
        for b in ds.blocks("train").expect("blocks") {
            for s in ds.read_block("train", b.index).await.expect("block") {
                keys.push(s.key);
            }
        }
        keys
    })
}

/// One step as it counts in the run's final lineage.
#[derive(Debug, Clone)]
pub struct AuditedStep {
    pub generation: u64,
    /// Every key fed into the step, by all ranks, in rank order (the global batch's order).
    pub keys: Vec<String>,
    /// The parameter checksum of every rank that applied it.
    pub checksums: Vec<f64>,
}

/// The workers' audit records (`<run.dir>/audit/<worker>/g…-s…-{fed,applied}.json`, on any
/// store) reduced to the steps that count: a step applied in several generations (a regroup or
/// a rollback re-ran it) counts in the newest one only; a (generation, step) counts if any rank
/// applied it, with the keys every rank fed into it.
pub fn audited_steps(
    run_dir: &str,
    opts: &ferroclip_shards::StoreOptions,
) -> BTreeMap<u64, AuditedStep> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let records: Vec<serde_json::Value> = rt.block_on(async {
        let url = format!("{}/audit", run_dir.trim_end_matches('/'));
        let loc = ferroclip_shards::store::Location::open(&url, opts).expect("audit location");
        let metas: Vec<_> = loc
            .store
            .list(Some(&loc.path))
            .try_collect()
            .await
            .expect("list audit");
        let mut out = Vec::new();
        for m in metas {
            let bytes = loc
                .store
                .get(&m.location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes");
            // A record is written whole or not at all (one object each).
            out.push(serde_json::from_slice(&bytes).expect("audit record is JSON"));
        }
        out
    });
    // Per (generation, step), each rank's keys: concatenated in rank order, the global batch's.
    let mut fed: HashMap<(u64, u64), BTreeMap<u64, Vec<String>>> = HashMap::new();
    let mut applied: BTreeMap<(u64, u64), Vec<f64>> = BTreeMap::new();
    for v in records {
        let key = (
            v["generation"].as_u64().unwrap_or(0),
            v["step"].as_u64().unwrap_or(0),
        );
        match v["event"].as_str() {
            Some("fed") => fed
                .entry(key)
                .or_default()
                .entry(v["rank"].as_u64().unwrap_or(0))
                .or_default()
                .extend(
                    v["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str().map(String::from)),
                ),
            Some("applied") => applied
                .entry(key)
                .or_default()
                .push(v["checksum"].as_f64().unwrap_or(f64::NAN)),
            _ => {}
        }
    }
    let mut steps: BTreeMap<u64, AuditedStep> = BTreeMap::new();
    for ((generation, step), checksums) in applied {
        // BTreeMap order: a later generation of the same step replaces the earlier one.
        steps.insert(
            step,
            AuditedStep {
                generation,
                keys: fed
                    .remove(&(generation, step))
                    .unwrap_or_default()
                    .into_values()
                    .flatten()
                    .collect(),
                checksums,
            },
        );
    }
    steps
}

/// Asserts the step contract from the audit of a run of one epoch (see `assert_epochs_contract`).
pub fn assert_step_contract(
    data: &str,
    run_dir: &str,
    opts: &ferroclip_shards::StoreOptions,
    global_batch: usize,
) -> BTreeMap<u64, AuditedStep> {
    assert_epochs_contract(data, run_dir, opts, global_batch, 1)
}

/// Asserts the step contract from the audit: every train sample used exactly once per epoch
/// (`epochs` times in all), every step 1..=`total_steps` present with exactly `global_batch`
/// samples (the last: the remainder), and the ranks' parameters equal after every step.
pub fn assert_epochs_contract(
    data: &str,
    run_dir: &str,
    opts: &ferroclip_shards::StoreOptions,
    global_batch: usize,
    epochs: usize,
) -> BTreeMap<u64, AuditedStep> {
    let steps = audited_steps(run_dir, opts);
    let expected = train_keys(data, opts);
    let mut uses: BTreeMap<String, usize> = expected.iter().map(|k| (k.clone(), 0)).collect();
    for s in steps.values() {
        for k in &s.keys {
            match uses.get_mut(k) {
                Some(n) => *n += 1,
                None => panic!("sample {k} is not in the plan"),
            }
        }
    }
    let wrong: Vec<_> = uses.iter().filter(|(_, n)| **n != epochs).collect();
    assert!(
        wrong.is_empty(),
        "samples not used exactly once per epoch ({} of {}): {:?}",
        wrong.len(),
        uses.len(),
        wrong.iter().take(10).collect::<Vec<_>>()
    );
    let samples = expected.len() * epochs;
    let total = samples.div_ceil(global_batch) as u64;
    let numbers: Vec<u64> = steps.keys().copied().collect();
    assert_eq!(numbers, (1..=total).collect::<Vec<_>>(), "steps of the run");
    for (step, s) in &steps {
        let want = if *step == total {
            samples - (total as usize - 1) * global_batch
        } else {
            global_batch
        };
        assert_eq!(
            s.keys.len(),
            want,
            "step {step} (generation {}) fed {} samples, not {want}",
            s.generation,
            s.keys.len()
        );
        assert!(
            s.checksums.windows(2).all(|w| w[0] == w[1]),
            "ranks disagree on the parameters after step {step}: {:?}",
            s.checksums
        );
    }
    steps
}

pub const S3_BUCKET: &str = "ferroclip-test";
const S3_ACCESS_KEY: &str = "test-access-key";
const S3_SECRET_KEY: &str = "test-secret-key-0123456789";

/// A real S3-compatible server (s3s-fs) on 127.0.0.1 over a temporary directory; it can be
/// stopped and started again on the same port and data (an outage).
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    pub endpoint: String,
    dir: tempfile::TempDir,
}

fn s3s_fs() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("s3s-fs is not installed: run scripts/setup-test-tools first")
}

impl S3Server {
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().expect("s3 dir");
        std::fs::create_dir_all(dir.path().join(S3_BUCKET)).expect("bucket");
        let port = free_port();
        let mut s = S3Server {
            child: None,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            dir,
        };
        s.resume();
        s
    }

    /// Kills the server (SIGKILL): the store is down.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn resume(&mut self) {
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// Credentials and endpoint for client processes.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("FERROCLIP_S3_ENDPOINT", self.endpoint.clone()),
        ]
    }

    /// Store options for this test process (sets the AWS_* variables of this process).
    pub fn options(&self) -> ferroclip_shards::StoreOptions {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
        ferroclip_shards::StoreOptions {
            s3_endpoint: Some(self.endpoint.clone()),
            allow_http: true,
            ..Default::default()
        }
    }

    /// The file behind an object of the bucket (to check what landed where).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.dir.path().join(S3_BUCKET).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A run config for the real-run tests: a tiny model, fast failure detection, `extra` TOML
/// appended (sections may be repeated only if not already present above).
pub fn run_config(
    dir: &Path,
    run_dir: &str,
    data: &str,
    global_batch: u32,
    extra: &str,
) -> PathBuf {
    let path = dir.join("run.toml");
    let text = format!(
        r#"
[run]
dir = "{run_dir}"
seed = 7
steps = 0
epochs = 1
audit = true
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
global_batch = {global_batch}
lr = 1e-3
warmup_steps = 2
[cluster]
min_workers = 1
max_workers = 4
settle_s = 1.0
heartbeat_interval_s = 0.3
heartbeat_timeout_s = 3.0
collective_timeout_s = 5.0
{extra}
"#
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// `ferroclip-worker join` in working directory `cwd` with extra environment.
pub fn worker_in(grpc: u16, id: &str, cwd: &Path, env: &[(&str, String)]) -> Proc {
    Proc(
        Command::new(bin("ferroclip-worker"))
            .args(["join", "--coordinator", &format!("http://127.0.0.1:{grpc}")])
            .args(["--device", "cpu", "--threads", "1", "--worker-id", id])
            .args(["--advertise-host", "127.0.0.1"])
            .current_dir(cwd)
            .env("FERROCLIP_TOKEN", TOKEN)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .spawn()
            .expect("start worker"),
    )
}

/// Whether the process has exited (and how).
pub fn exited(p: &mut Proc) -> Option<std::process::ExitStatus> {
    p.0.try_wait().expect("try_wait")
}

/// Waits for a process to exit within `timeout`.
pub fn exit_within(p: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = exited(p) {
            return status;
        }
        assert!(
            start.elapsed() < timeout,
            "process did not exit in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
