//! A ferroclip cluster on simulated hosts (`netns`): an S3 server, the coordinator and workers,
//! each on its own host, and what the tests read back from them.
#![allow(dead_code)]

use crate::netns::{Host, Net};
use crate::run_common::{bin, TOKEN};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "ferroclip-test";
pub const SECRET_KEY: &str = "ferroclip-secret";
pub const BUCKET: &str = "bucket";
// Every service is alone in its namespace: fixed ports cannot collide.
pub const S3_PORT: u16 = 9000;
pub const GRPC_PORT: u16 = 50051;
pub const HTTP_PORT: u16 = 8080;
pub const TCP_LINE: &str = "ranks on other hosts: all-reduce over TCP";

pub fn find_s3s_fs() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .expect("s3s-fs is not installed: run `scripts/setup-test-tools` first")
}

/// A simulated cluster: S3 host, coordinator host, worker hosts, a run reading its data from S3.
pub struct Cluster {
    // Dropped first: kills every process, then the namespaces go; then the files.
    pub net: Net,
    pub tmp: tempfile::TempDir,
    pub s3: Arc<Host>,
    pub coord: Arc<Host>,
    pub hosts: Vec<Arc<Host>>,
    pub s3_endpoint: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Cluster {
    /// Switch, S3 server, `rows` synthetic rows on it, a coordinator and `hosts` hosts ×
    /// `per_host` workers. `None` when the machine cannot simulate hosts (the test skips).
    pub fn start(hosts: usize, per_host: usize, rows: u32) -> Option<Cluster> {
        let net = Net::new()?;
        let mut tmp = tempfile::tempdir().expect("tmp");
        if std::env::var_os("MULTIHOST_KEEP").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("keeping {}", tmp.path().display());
        }
        std::fs::create_dir_all(tmp.path().join("s3").join(BUCKET)).expect("bucket dir");
        std::fs::create_dir_all(tmp.path().join("logs")).expect("logs dir");
        let s3 = net.host("s3");
        let coord = net.host("coord");
        let hosts: Vec<_> = (0..hosts).map(|i| net.host(&format!("host{i}"))).collect();
        let c = Cluster {
            s3_endpoint: format!("http://{}:{S3_PORT}", s3.ip),
            grpc: SocketAddr::from((coord.ip, GRPC_PORT)),
            http: SocketAddr::from((coord.ip, HTTP_PORT)),
            net,
            tmp,
            s3,
            coord,
            hosts,
        };
        eprintln!(
            "cluster on {}: s3 {}, coordinator {}, hosts {:?}",
            c.net.subnet(),
            c.s3.ip,
            c.coord.ip,
            c.hosts.iter().map(|h| h.ip).collect::<Vec<_>>()
        );
        let mut s3s = Command::new(find_s3s_fs());
        s3s.args([
            "--host",
            &c.s3.ip.to_string(),
            "--port",
            &S3_PORT.to_string(),
        ])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(c.tmp.path().join("s3"));
        c.s3.spawn(c.logged(s3s, "s3")).expect("start s3s-fs");
        c.s3.wait_listening(
            SocketAddr::from((c.s3.ip, S3_PORT)),
            Duration::from_secs(20),
        )
        .expect("s3s-fs listening");

        let t0 = Instant::now();
        let mut synth = c.command(bin("ferroclip"));
        synth
            .args(["shards", "synth", "--out", &c.data_url()])
            .args([
                "--rows",
                &rows.to_string(),
                "--seed",
                "3",
                "--image-size",
                "16",
            ])
            .args(["--rows-per-row-group", "20", "--val-fraction", "0.1"])
            .args([
                "--no-progress",
                "--s3-endpoint",
                &c.s3_endpoint,
                "--allow-http",
            ]);
        let out = c.hosts[0]
            .run(synth, Duration::from_secs(120))
            .expect("run shards synth");
        assert!(
            out.status.success(),
            "shards synth: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{rows} rows on S3 in {:.1}s", t0.elapsed().as_secs_f64());

        let cfg = c.write_config();
        let mut coordinator = c.command(bin("ferroclip"));
        coordinator
            .args(["coordinator", "--config"])
            .arg(&cfg)
            .args(["--grpc-addr", &c.grpc.to_string()])
            .args(["--http-addr", &c.http.to_string()])
            .args(["--s3-endpoint", &c.s3_endpoint, "--allow-http"]);
        c.coord
            .spawn(c.logged(coordinator, "coordinator"))
            .expect("start coordinator");
        c.coord
            .wait_listening(c.http, Duration::from_secs(30))
            .expect("coordinator listening");
        for h in &c.hosts {
            for w in 0..per_host {
                c.start_worker(h, &format!("{}-w{w}", h.name));
            }
        }
        Some(c)
    }

    pub fn data_url(&self) -> String {
        format!("s3://{BUCKET}/data")
    }

    /// Where the run reads the dataset: over S3, or, with `MULTIHOST_DATA_FROM_FILES=1`, straight
    /// from the S3 server's files (to tell problems of the S3 path from the rest).
    pub fn data_root(&self) -> String {
        if std::env::var_os("MULTIHOST_DATA_FROM_FILES").is_some() {
            self.data_dir().display().to_string()
        } else {
            self.data_url()
        }
    }

    /// The dataset as the S3 server stores it (s3s-fs keeps objects as plain files).
    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("s3").join(BUCKET).join("data")
    }

    /// The run directory (journal, checkpoints, audit) on the S3 server.
    pub fn run_url(&self) -> String {
        format!("s3://{BUCKET}/run")
    }

    /// The run directory as the S3 server stores it (the test reads the audit from there).
    pub fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("s3").join(BUCKET).join("run")
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.tmp.path().join("logs").join(format!("{name}.log"))
    }

    /// `program` with the run's token, S3 credentials, plain logs and no proxies.
    pub fn command(&self, program: PathBuf) -> Command {
        let mut c = Command::new(program);
        c.env("FERROCLIP_TOKEN", TOKEN)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("NO_PROXY", "*");
        for v in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            c.env_remove(v).env_remove(v.to_lowercase());
        }
        c
    }

    /// `cmd` with stdout and stderr appended to `logs/<name>.log`.
    pub fn logged(&self, mut cmd: Command, name: &str) -> Command {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))
            .expect("open log");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        cmd
    }

    pub fn start_worker(&self, host: &Host, id: &str) {
        let mut w = self.command(bin("ferroclip-worker"));
        w.args(["join", "--coordinator", &format!("http://{}", self.grpc)])
            .args(["--advertise-host", &host.ip.to_string()])
            .args(["--device", "cpu", "--threads", "1", "--worker-id", id])
            .args(["--s3-endpoint", &self.s3_endpoint, "--allow-http"]);
        host.spawn(self.logged(w, id)).expect("start worker");
    }

    pub fn write_config(&self) -> PathBuf {
        // 60 rows per step: whole rows per rank for any world of 1 to 6 workers.
        let path = crate::run_common::run_config(
            self.tmp.path(),
            &self.run_url(),
            &self.data_root(),
            60,
            "",
        );
        let text = std::fs::read_to_string(&path)
            .expect("config")
            .replace("max_workers = 4", "max_workers = 6");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// A plain HTTP/1.1 GET to the coordinator, from inside the coordinator's host.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = self.coord.connect(self.http, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: coord\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    }

    /// `/api/status` (the last step record only); None while the coordinator does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.get("/api/status?history=1")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
            }
            // Every worker gone (and the status, asked again, still not there): no use waiting.
            let why = if start.elapsed() > timeout {
                Some(format!("timed out after {timeout:?}"))
            } else if self.workers_alive() == 0 && !self.status().is_some_and(|s| pred(&s)) {
                Some("every worker process has exited".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                panic!(
                    "{why} waiting for {what}\nstatus: {}\n{}",
                    self.status().map(|s| s.to_string()).unwrap_or_default(),
                    self.log_tails(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn workers_alive(&self) -> usize {
        self.hosts.iter().map(|h| h.running().len()).sum()
    }

    /// The last `n` lines of every log (backtrace frames left out), for failure messages.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        let mut logs: Vec<_> = std::fs::read_dir(self.tmp.path().join("logs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for path in logs {
            let text = strip_ansi(&std::fs::read_to_string(&path).unwrap_or_default());
            let lines: Vec<_> = text.lines().filter(|l| !l.starts_with(' ')).collect();
            out += &format!("--- {} (last {n} lines)\n", path.display());
            for l in &lines[lines.len().saturating_sub(n)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    /// The step contract, from the audit records on the S3 server's files: every sample of the
    /// epoch exactly once, every step a full global batch of 60 but the last, the run as many
    /// steps as it announced, and the ranks' parameters equal after every step.
    pub fn assert_contract(&self) {
        let steps = crate::run_common::assert_step_contract(
            &self.data_dir().display().to_string(),
            &self.run_dir().display().to_string(),
            &Default::default(),
            60,
        );
        let total = self.status().and_then(|s| s["total_steps"].as_u64());
        assert_eq!(Some(steps.len() as u64), total, "steps vs total_steps");
        // Checkpoints landed on S3, committed; nothing under a local "s3:" folder.
        assert!(
            std::fs::read_dir(self.run_dir().join("checkpoints"))
                .map(|d| d.count() > 0)
                .unwrap_or(false),
            "no checkpoint on S3"
        );
        assert!(!Path::new("s3:").exists(), "a local s3: folder was created");
    }

    /// The worker's log, without terminal colours.
    pub fn worker_log(&self, id: &str) -> String {
        strip_ansi(&std::fs::read_to_string(self.log(id)).unwrap_or_default())
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
