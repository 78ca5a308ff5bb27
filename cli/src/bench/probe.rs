//! What the benchmark reads about the coordinator process: CPU time and RSS from `/proc`, and
//! over HTTP its journal's write counters and committed step.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::setup::TOKEN;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// User + system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// Resident set size in MB.
pub fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A plain HTTP/1.1 GET with the run token: the body when the answer is 200.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let out = String::from_utf8_lossy(&out).to_string();
        let (head, body) = out.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1)? == "200").then(|| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(30), fetch)
        .await
        .ok()
        .flatten()
}

async fn status(port: u16) -> Option<serde_json::Value> {
    let body = http_get(port, "/api/status?history=1").await?;
    serde_json::from_str(&body).ok()
}

/// The journal writer's counters, as the coordinator reports them.
pub use ferroclip_coordinator::writer::WriteStats as JournalIo;

pub async fn journal_io(port: u16) -> Option<JournalIo> {
    let s = status(port).await?;
    serde_json::from_value(s["journal_io"].clone()).ok()
}

pub async fn committed_step(port: u16) -> Option<u64> {
    status(port).await?["step"].as_u64()
}

/// Seconds the coordinator took to read its journal (its `journal loaded` log line).
pub fn journal_load_s(log: &Path) -> Option<f64> {
    let text = strip_ansi(&std::fs::read_to_string(log).ok()?);
    let line = text.lines().find(|l| l.contains("journal loaded"))?;
    let at = line.find("load_s=")? + "load_s=".len();
    line[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// The text without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
