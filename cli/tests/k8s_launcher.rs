//! `k8s/base/launch-workers.sh`, the worker pods' launcher, run as a real process with real
//! signals, as each kind's rendered worker pod runs it: the script from the launcher ConfigMap
//! and the container's environment, from `ferroclip k8s render --kind job` and `--kind jobset`.
//! Its children are a small stand-in for `ferroclip-worker` (set through FERROCLIP_WORKER_BIN)
//! that records its flags and then serves, crashes or exits as told, since what is under test is
//! the launcher's supervision: flags per local rank, restarts, SIGTERM forwarding and the exit
//! status the Job's podFailurePolicy acts on.

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

/// Every test runs against both kinds' worker pods.
const KINDS: [&str; 2] = ["job", "jobset"];

struct Pod {
    dir: tempfile::TempDir,
    child: Child,
    /// FERROCLIP_COORDINATOR of the rendered pod.
    coordinator: String,
}

impl Pod {
    /// The worker pod that `k8s render --kind KIND` gives for `local_workers` GPUs (or CPU
    /// processes, for device "cpu"), started as its container would be.
    fn start(kind: &str, local_workers: u32, device: &str, modes: &[(u32, &str)]) -> Pod {
        let n = local_workers.to_string();
        let mut args = vec!["--kind", kind, "--workers", "1", "--gpus-per-worker", &n];
        args.extend(["--config", "k8s/base/run.toml", "--data", "s3://b/ds"]);
        if device == "cpu" {
            args.push("--cpu");
        }
        let (_, docs) = k8s_common::render(&args);
        let container =
            &k8s_common::workers_job(&docs, "ferroclip")["template"]["spec"]["containers"][0];
        assert_eq!(
            container["command"],
            serde_json::json!(["bash", "/opt/ferroclip/launch-workers.sh"])
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let launcher = dir.path().join("launch-workers.sh");
        let script = k8s_common::find(&docs, "ConfigMap", "ferroclip-launcher")["data"]
            ["launch-workers.sh"]
            .as_str()
            .expect("launcher text");
        std::fs::write(&launcher, script).expect("write launcher");
        let stub = dir.path().join("ferroclip-worker");
        std::fs::write(&stub, STUB).expect("write stub");
        make_executable(&stub);
        for (port, mode) in modes {
            std::fs::write(dir.path().join(format!("mode-{port}")), mode).expect("write mode");
        }
        let mut cmd = Command::new("bash");
        cmd.arg(&launcher);
        // The container's literal environment (POD_IP comes from the downward API: not here).
        for var in container["env"].as_array().expect("env") {
            if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
                cmd.env(name, value);
            }
        }
        let child = cmd
            .env("STUB_DIR", dir.path())
            .env("FERROCLIP_WORKER_BIN", &stub)
            .env("FERROCLIP_MAX_RESTARTS", "2")
            .env("FERROCLIP_RESTART_DELAY_S", "0")
            .spawn()
            .expect("start launcher");
        let coordinator = k8s_common::env(container, "FERROCLIP_COORDINATOR")["value"]
            .as_str()
            .expect("a literal value")
            .to_string();
        Pod {
            dir,
            child,
            coordinator,
        }
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
    for (kind, coordinator) in KINDS.into_iter().zip([
        "https://ferroclip-coordinator:50051",
        "https://ferroclip-coordinator-0-0.ferroclip:50051",
    ]) {
        each_local_rank_gets_its_place(kind, coordinator);
    }
}

fn each_local_rank_gets_its_place(kind: &str, coordinator: &str) {
    let mut pod = Pod::start(kind, 3, "cuda", &[]);
    assert_eq!(pod.coordinator, coordinator, "{kind}");
    let calls = pod.wait_lines("calls", 3);
    for i in 0..3 {
        let want = format!(
            "join --coordinator {coordinator} --token-file /var/run/ferroclip/token/token \
             --device cuda:{i} --collective-port {}",
            29500 + i
        );
        assert_eq!(count(&calls, &want), 1, "{kind}: {calls:?}");
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
    for kind in KINDS {
        a_crashed_worker_is_restarted_in_place_and_its_siblings_keep_running_under(kind);
    }
}

fn a_crashed_worker_is_restarted_in_place_and_its_siblings_keep_running_under(kind: &str) {
    let mut pod = Pod::start(kind, 2, "cpu", &[(29501, "crash-once")]);
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
    for kind in KINDS {
        a_worker_that_keeps_crashing_fails_the_pod_after_its_restarts_under(kind);
    }
}

fn a_worker_that_keeps_crashing_fails_the_pod_after_its_restarts_under(kind: &str) {
    let mut pod = Pod::start(kind, 2, "cuda", &[(29501, "crash")]);
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
    for kind in KINDS {
        a_usage_error_fails_at_once_with_exit_2_under(kind);
    }
}

fn a_usage_error_fails_at_once_with_exit_2_under(kind: &str) {
    let mut pod = Pod::start(kind, 2, "cuda", &[(29500, "usage")]);
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
    for kind in KINDS {
        the_pod_succeeds_when_every_worker_is_done_under(kind);
    }
}

fn the_pod_succeeds_when_every_worker_is_done_under(kind: &str) {
    let mut pod = Pod::start(kind, 2, "cuda", &[(29500, "done"), (29501, "done")]);
    assert_eq!(pod.exit_code(), 0);
    assert_eq!(pod.lines("calls").len(), 2);
}
