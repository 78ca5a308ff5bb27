//! `k8s/base/launch-workers.sh`, the worker pods' launcher, run as a real process with real
//! signals. Its children are a small stand-in for `ferroclip-worker` (set through
//! FERROCLIP_WORKER_BIN) that records its flags and then serves, crashes or exits as told, since
//! what is under test is the launcher's supervision: flags per local rank, restarts, SIGTERM
//! forwarding and the exit status the Job's podFailurePolicy acts on.

mod k8s_common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Behaves per collective port as `$STUB_DIR/mode-<port>` says: serve (until SIGTERM, then leave
/// and exit 0), crash (exit 7), crash-once (crash the first time, then serve), usage (exit 2),
/// done (exit 0 at once).
/// Every start is recorded only once its SIGTERM trap is set, and failing modes wait until all
/// local ranks have started, so a sibling is always able to leave.
const STUB: &str = r#"#!/usr/bin/env bash
port=""; prev=""
for a in "$@"; do [[ $prev == --collective-port ]] && port=$a; prev=$a; done
trap 'echo "$port" >> "$STUB_DIR/left"; exit 0' TERM
echo "$*" >> "$STUB_DIR/calls"
mode=$(cat "$STUB_DIR/mode-$port" 2>/dev/null || echo serve)
while (( $(wc -l < "$STUB_DIR/calls") < FERROCLIP_LOCAL_WORKERS )); do sleep 0.02; done
if [[ $mode == crash-once ]]; then echo serve > "$STUB_DIR/mode-$port"; exit 7; fi
case $mode in
  crash) exit 7 ;;
  usage) exit 2 ;;
  done) exit 0 ;;
esac
while :; do sleep 0.05; done
"#;

struct Pod {
    dir: tempfile::TempDir,
    child: Child,
}

impl Pod {
    fn start(local_workers: u32, device: &str, modes: &[(u32, &str)]) -> Pod {
        let dir = tempfile::tempdir().expect("tempdir");
        let stub = dir.path().join("ferroclip-worker");
        std::fs::write(&stub, STUB).expect("write stub");
        make_executable(&stub);
        for (port, mode) in modes {
            std::fs::write(dir.path().join(format!("mode-{port}")), mode).expect("write mode");
        }
        let child = Command::new("bash")
            .arg(k8s_common::repo_root().join("k8s/base/launch-workers.sh"))
            .env("STUB_DIR", dir.path())
            .env("FERROCLIP_WORKER_BIN", &stub)
            .env("FERROCLIP_LOCAL_WORKERS", local_workers.to_string())
            .env("FERROCLIP_DEVICE", device)
            .env("FERROCLIP_COORDINATOR", "http://run-coordinator:50051")
            .env("FERROCLIP_TOKEN_FILE", "/var/run/ferroclip/token/token")
            .env("FERROCLIP_COLLECTIVE_PORT_BASE", "29500")
            .env("FERROCLIP_MAX_RESTARTS", "2")
            .env("FERROCLIP_RESTART_DELAY_S", "0")
            .spawn()
            .expect("start launcher");
        Pod { dir, child }
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until `file` has at least `n` lines.
    fn wait_lines(&self, file: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.lines(file);
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{file} has {lines:?}, waited for {n} lines"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// The launcher's exit code (killed after 20 s: a hang is a failure).
    fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status
                    .code()
                    .expect("launcher exited by a signal, not with a status");
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("launcher did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).expect("stat").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms).expect("chmod");
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn each_local_rank_gets_its_gpu_and_port_and_sigterm_makes_all_leave_then_exit_143() {
    let mut pod = Pod::start(3, "cuda", &[]);
    let calls = pod.wait_lines("calls", 3);
    for i in 0..3 {
        let want = format!(
            "join --coordinator http://run-coordinator:50051 --token-file /var/run/ferroclip/token/token \
             --device cuda:{i} --collective-port {}",
            29500 + i
        );
        assert_eq!(count(&calls, &want), 1, "{calls:?}");
    }
    pod.sigterm();
    assert_eq!(
        pod.exit_code(),
        143,
        "143 makes the Job replace the pod without using a retry"
    );
    let mut left = pod.lines("left");
    left.sort();
    assert_eq!(
        left,
        ["29500", "29501", "29502"],
        "every worker got SIGTERM and left"
    );
}

#[test]
fn a_crashed_worker_is_restarted_in_place_and_its_siblings_keep_running() {
    let mut pod = Pod::start(2, "cpu", &[(29501, "crash-once")]);
    let calls = pod.wait_lines("calls", 3);
    assert_eq!(count(&calls, "--collective-port 29501"), 2, "{calls:?}");
    assert_eq!(count(&calls, "--collective-port 29500"), 1, "{calls:?}");
    assert_eq!(count(&calls, "--device cpu"), 3, "{calls:?}");
    assert!(pod.lines("left").is_empty(), "no one was stopped");
    pod.sigterm();
    assert_eq!(pod.exit_code(), 143);
    assert_eq!(pod.lines("left").len(), 2);
}

#[test]
fn a_worker_that_keeps_crashing_fails_the_pod_after_its_restarts() {
    let mut pod = Pod::start(2, "cuda", &[(29501, "crash")]);
    assert_eq!(
        pod.exit_code(),
        1,
        "exit 1 counts against the index's backoffLimitPerIndex"
    );
    let calls = pod.lines("calls");
    assert_eq!(
        count(&calls, "--collective-port 29501"),
        3,
        "first start + 2 restarts: {calls:?}"
    );
    assert_eq!(
        pod.lines("left"),
        ["29500"],
        "the sibling was asked to leave"
    );
}

#[test]
fn a_usage_error_fails_at_once_with_exit_2() {
    let mut pod = Pod::start(2, "cuda", &[(29500, "usage")]);
    assert_eq!(
        pod.exit_code(),
        2,
        "2 makes the podFailurePolicy fail the Job"
    );
    let calls = pod.lines("calls");
    assert_eq!(
        count(&calls, "--collective-port 29500"),
        1,
        "no restart: {calls:?}"
    );
    assert_eq!(pod.lines("left"), ["29501"]);
}

#[test]
fn the_pod_succeeds_when_every_worker_is_done() {
    let mut pod = Pod::start(2, "cuda", &[(29500, "done"), (29501, "done")]);
    assert_eq!(pod.exit_code(), 0);
    assert_eq!(pod.lines("calls").len(), 2);
}
