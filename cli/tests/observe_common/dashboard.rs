//! The live dashboard rendered by headless Chromium.

use crate::run_common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace;

pub fn chromium() -> Option<PathBuf> {
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
pub fn run_chromium(exe: &Path, profile: &Path, extra: &[&str], url: &str) -> String {
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
pub fn attr_of(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{attr}=\"");
    let i = tag.find(&key)? + key.len();
    Some(tag[i..].split('"').next()?.to_string())
}

pub fn check_dashboard(http: u16, tmp: &Path) {
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
