//! What the tests of real runs share: a synthetic dataset, a `ferroclip coordinator` and
//! `ferroclip-worker join` processes on free ports, and the coordinator's /api/status.
#![allow(dead_code)] // each test binary uses its own subset

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
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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

pub fn coordinator(config: &Path, grpc: u16, http: u16, resume: bool) -> Proc {
    let mut c = Command::new(bin("ferroclip"));
    c.args(["coordinator", "--config"])
        .arg(config)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .env("FERROCLIP_TOKEN", TOKEN)
        .stdin(Stdio::null());
    if resume {
        c.arg("--resume");
    }
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
