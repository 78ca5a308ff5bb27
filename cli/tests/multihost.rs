//! Runs across simulated hosts (network namespaces, see `netns/mod.rs`): an S3 server
//! (`s3s-fs`) on one host, `ferroclip coordinator` on another, `ferroclip-worker join` processes on
//! three more, all over real TCP through a virtual switch. Whole hosts are SIGKILLed and links cut
//! mid-run; the workers' audit logs must show every sample of the epoch in exactly one applied
//! update and equal parameters on every rank at every step.
//!
//! Needs root, `ip` and `unshare` (skipped without them, failing when `CI=true`), and `s3s-fs`.
//! `MULTIHOST_KEEP=1` keeps each test's directory (logs, run dir, S3 files) and prints its path;
//! `MULTIHOST_DATA_FROM_FILES=1` has the run read the dataset from the S3 server's files instead
//! of over S3 (to tell a problem of the S3 path from the rest).

mod netns;
mod run_common;

use netns::{Host, Net};
use run_common::{bin, step_of, TOKEN};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACCESS_KEY: &str = "ferroclip-test";
const SECRET_KEY: &str = "ferroclip-secret";
const BUCKET: &str = "bucket";
// Every service is alone in its namespace: fixed ports cannot collide.
const S3_PORT: u16 = 9000;
const GRPC_PORT: u16 = 50051;
const HTTP_PORT: u16 = 8080;
const TCP_LINE: &str = "ranks on other hosts: all-reduce over TCP";

fn find_s3s_fs() -> PathBuf {
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
struct Cluster {
    // Dropped first: kills every process, then the namespaces go; then the files.
    net: Net,
    tmp: tempfile::TempDir,
    s3: Arc<Host>,
    coord: Arc<Host>,
    hosts: Vec<Arc<Host>>,
    s3_endpoint: String,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Cluster {
    /// Switch, S3 server, `rows` synthetic rows on it, a coordinator and `hosts` hosts ×
    /// `per_host` workers. `None` when the machine cannot simulate hosts (the test skips).
    fn start(hosts: usize, per_host: usize, rows: u32) -> Option<Cluster> {
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

    fn data_url(&self) -> String {
        format!("s3://{BUCKET}/data")
    }

    /// Where the run reads the dataset: over S3, or, with `MULTIHOST_DATA_FROM_FILES=1`, straight
    /// from the S3 server's files (to tell problems of the S3 path from the rest).
    fn data_root(&self) -> String {
        if std::env::var_os("MULTIHOST_DATA_FROM_FILES").is_some() {
            self.data_dir().display().to_string()
        } else {
            self.data_url()
        }
    }

    /// The dataset as the S3 server stores it (s3s-fs keeps objects as plain files).
    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("s3").join(BUCKET).join("data")
    }

    /// The run directory (journal, checkpoints, audit) on the S3 server.
    fn run_url(&self) -> String {
        format!("s3://{BUCKET}/run")
    }

    /// The run directory as the S3 server stores it (the test reads the audit from there).
    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("s3").join(BUCKET).join("run")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.tmp.path().join("logs").join(format!("{name}.log"))
    }

    /// `program` with the run's token, S3 credentials, plain logs and no proxies.
    fn command(&self, program: PathBuf) -> Command {
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
    fn logged(&self, mut cmd: Command, name: &str) -> Command {
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

    fn start_worker(&self, host: &Host, id: &str) {
        let mut w = self.command(bin("ferroclip-worker"));
        w.args(["join", "--coordinator", &format!("http://{}", self.grpc)])
            .args(["--advertise-host", &host.ip.to_string()])
            .args(["--device", "cpu", "--threads", "1", "--worker-id", id])
            .args(["--s3-endpoint", &self.s3_endpoint, "--allow-http"]);
        host.spawn(self.logged(w, id)).expect("start worker");
    }

    fn write_config(&self) -> PathBuf {
        // 60 rows per step: whole rows per rank for any world of 1 to 6 workers.
        let path =
            run_common::run_config(self.tmp.path(), &self.run_url(), &self.data_root(), 60, "");
        let text = std::fs::read_to_string(&path)
            .expect("config")
            .replace("max_workers = 4", "max_workers = 6");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// A plain HTTP/1.1 GET to the coordinator, from inside the coordinator's host.
    fn get(&self, path: &str) -> Option<(u16, String)> {
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
    fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.get("/api/status?history=1")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    fn wait_until(
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

    fn workers_alive(&self) -> usize {
        self.hosts.iter().map(|h| h.running().len()).sum()
    }

    /// The last `n` lines of every log (backtrace frames left out), for failure messages.
    fn log_tails(&self, n: usize) -> String {
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
    fn assert_contract(&self) {
        let steps = run_common::assert_step_contract(
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
    fn worker_log(&self, id: &str) -> String {
        strip_ansi(&std::fs::read_to_string(self.log(id)).unwrap_or_default())
    }
}

fn strip_ansi(s: &str) -> String {
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

/// The `others=[..]` ranks of each "all-reduce over TCP" line of a worker log.
fn tcp_lines(log: &str) -> Vec<Vec<u64>> {
    log.lines()
        .filter(|l| l.contains(TCP_LINE))
        .map(|l| {
            l.split_once("others=[")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(list, _)| {
                    list.split(',')
                        .filter_map(|r| r.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

fn workers(s: &serde_json::Value) -> usize {
    s["workers"].as_array().map(|w| w.len()).unwrap_or(0)
}

fn recoveries(s: &serde_json::Value) -> u64 {
    s["counters"]["recoveries"].as_u64().unwrap_or(0)
}

/// The harness itself: hostnames, /dev/shm and PID namespaces per host, TCP over the switch, a
/// cut cable, and a host's power loss.
#[test]
fn hosts_are_separate_machines_on_one_network() {
    let Some(net) = Net::new() else { return };
    let a = net.host("alpha");
    let b = net.host("beta");
    let facts = |h: &Host| {
        let mut c = Command::new("sh");
        c.args(["-c", "echo $(hostname) $(stat -c %d /dev/shm)"]);
        let out = h.run(c, Duration::from_secs(10)).expect("probe");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (fa, fb) = (facts(&a), facts(&b));
    let (fa, fb): (Vec<_>, Vec<_>) = (fa.split(' ').collect(), fb.split(' ').collect());
    assert_eq!((fa[0], fb[0]), ("alpha", "beta"));
    assert_ne!(fa[1], fb[1], "two hosts share one /dev/shm");
    let mut pwd = Command::new("pwd");
    pwd.current_dir("/tmp");
    let out = a.run(pwd, Duration::from_secs(10)).expect("pwd");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/tmp");

    // Each process is in its host's PID namespace (NSpid: the test's pid, then the host's).
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let pid = a.spawn(sleeper).expect("spawn sleep");
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let nspid = st.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid");
    assert_eq!(nspid.split_whitespace().count(), 3, "{nspid}");
    // A grandchild: killing the host must take it too.
    let mut forker = Command::new("sh");
    forker
        .args(["-c", "sleep 600 & echo $!; wait"])
        .stdout(Stdio::piped());
    a.spawn(forker).expect("spawn forker");

    // TCP from beta to alpha over the switch; nothing gets through while alpha's cable is cut.
    let addr = SocketAddr::from((a.ip, 7000));
    let listener = a.listen(addr).expect("listen on alpha");
    let ping = || {
        let mut s = b.connect(addr, Duration::from_secs(1))?;
        s.write_all(b"x")?;
        let (mut peer, _) = listener.accept()?;
        let mut buf = [0u8; 1];
        peer.read_exact(&mut buf)?;
        std::io::Result::Ok(buf[0])
    };
    assert_eq!(ping().expect("beta reaches alpha"), b'x');
    a.cut_link().expect("cut");
    let err = b
        .connect(addr, Duration::from_secs(1))
        .expect_err("connected through a cut cable");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    a.restore_link().expect("restore");
    assert_eq!(ping().expect("beta reaches alpha again"), b'x');

    // Power loss: every process of the host is gone, the grandchild included.
    let in_ns = |ns: &str| -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert!(in_ns(&a.ns).len() >= 3, "{:?}", in_ns(&a.ns));
    let t = Instant::now();
    a.kill_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_ns(&a.ns).is_empty() {
        assert!(Instant::now() < deadline, "left alive: {:?}", in_ns(&a.ns));
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("host powered off in {:?}", t.elapsed());
    assert!(
        a.spawn(Command::new("true")).is_err(),
        "spawned on a dead host"
    );
    assert!(facts(&b).starts_with("beta "), "the other host lives on");
    // And it boots again, with a fresh /dev/shm.
    a.boot().expect("reboot");
    assert_eq!(facts(&a).split(' ').next(), Some("alpha"));
}

/// Three hosts × two workers: the epoch finishes exactly once, and ranks on other hosts
/// all-reduce over TCP while the two on one host still see one host.
#[test]
fn a_run_across_three_hosts_finishes_exactly_once_over_tcp() {
    let t0 = Instant::now();
    let Some(c) = Cluster::start(3, 2, 2400) else {
        return;
    };
    let s = c.wait_until("the end of the epoch", Duration::from_secs(150), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "finished: {} steps in {:.1}s ({} generations, {} recoveries)",
        step_of(&s),
        t0.elapsed().as_secs_f64(),
        s["counters"]["generations"],
        recoveries(&s)
    );
    c.assert_contract();
    for h in &c.hosts {
        for w in 0..2 {
            let id = format!("{}-w{w}", h.name);
            let lines = tcp_lines(&c.worker_log(&id));
            assert!(!lines.is_empty(), "{id} never said \"{TCP_LINE}\"");
            // In the last generation (all six): four ranks elsewhere, the co-located one not.
            let last = lines.last().expect("a line");
            assert_eq!(last.len(), 4, "{id}: others = {last:?}");
        }
    }
}

/// Loses host `which` mid-run by `lose` (described as `how`); the other four workers go on, and
/// the run ends with the whole contract.
fn a_host_lost_mid_run(which: usize, how: &str, lose: impl FnOnce(&Host)) {
    let t0 = Instant::now();
    let Some(c) = Cluster::start(3, 2, 2400) else {
        return;
    };
    let s = c.wait_until("6 workers at step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3 && workers(s) == 6
    });
    let before = step_of(&s);
    lose(&c.hosts[which]);
    let killed = Instant::now();
    let s = c.wait_until(
        "a step committed after the host's loss",
        Duration::from_secs(60),
        |s| recoveries(s) >= 1 && step_of(s) > before,
    );
    eprintln!(
        "host {how} at step {before}: step {} committed {:.2}s later (coordinator: {:.2}s from detection)",
        step_of(&s),
        killed.elapsed().as_secs_f64(),
        s["counters"]["last_recovery_s"].as_f64().unwrap_or(f64::NAN)
    );
    assert_eq!(workers(&s), 4, "the survivors go on: {s}");
    let s = c.wait_until("the end of the epoch", Duration::from_secs(150), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "finished: {} steps in {:.1}s",
        step_of(&s),
        t0.elapsed().as_secs_f64()
    );
    c.assert_contract();
}

/// SIGKILL every process of one host mid-run (a power loss): the others go on without it.
#[test]
fn losing_a_whole_host_mid_run_recovers() {
    a_host_lost_mid_run(1, "lost", |h| h.kill_all());
}

/// A power loss as the network sees it: the host's cable is cut first, then its processes die,
/// so no FIN or RST ever reaches the others; they find out by timeouts alone.
#[test]
fn a_host_gone_silent_mid_run_recovers() {
    a_host_lost_mid_run(0, "silent", |h| {
        h.cut_link().expect("cut the link");
        h.kill_all();
    });
}

/// One host's cable is pulled mid-run for a few seconds, then plugged back in.
#[test]
fn a_cut_link_mid_step_recovers() {
    let t0 = Instant::now();
    let Some(c) = Cluster::start(3, 2, 2400) else {
        return;
    };
    let s = c.wait_until("6 workers at step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3 && workers(s) == 6
    });
    let before = step_of(&s);
    c.hosts[2].cut_link().expect("cut the link");
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    c.hosts[2].restore_link().expect("restore the link");
    let s = c.wait_until(
        "a step committed after the cut",
        Duration::from_secs(60),
        |s| recoveries(s) >= 1 && step_of(s) > before,
    );
    eprintln!(
        "link cut at step {before} for 6s: step {} committed {:.2}s after the cut, {} workers",
        step_of(&s),
        cut.elapsed().as_secs_f64(),
        workers(&s)
    );
    let s = c.wait_until("the end of the epoch", Duration::from_secs(150), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "finished: {} steps in {:.1}s, {} workers, {} deaths, {} recoveries",
        step_of(&s),
        t0.elapsed().as_secs_f64(),
        workers(&s),
        s["counters"]["worker_deaths"],
        recoveries(&s)
    );
    c.assert_contract();
}
