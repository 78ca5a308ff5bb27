//! Elastic, exactly-once training with real processes: a `ferroclip coordinator`, three
//! `ferroclip-worker join` processes over real TCP, one SIGKILLed mid-epoch and a new one joining
//! later. The workers' own audit logs must show every sample of the epoch's plan in exactly one
//! applied update, and the survivors' parameters identical at every step.

mod run_common;

use run_common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The shared test config (tiny model, fast failure detection) with a global batch of 24.
fn write_config(dir: &Path, data: &str, extra: &str) -> PathBuf {
    run_config(dir, &dir.join("run").display().to_string(), data, 24, extra)
}

/// Every sample exactly once, full batches of 24 (the last step: the remainder), ranks equal.
fn assert_exactly_once(data: &str, run: &Path) {
    let steps = assert_step_contract(data, &run.display().to_string(), &Default::default(), 24);
    eprintln!("{} steps, all full but the last", steps.len());
}

#[test]
fn exactly_once_across_a_sigkill_and_a_join() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 600, 3);
    let cfg = write_config(tmp.path(), &data, "");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let mut b = worker(grpc, "w-b");
    let _c = worker(grpc, "w-c");
    let s = wait_until(http, "3 workers at step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3 && s["workers"].as_array().map(|w| w.len()) == Some(3)
    });
    // SIGKILL one worker mid-epoch.
    b.0.kill().expect("kill");
    let killed_at = Instant::now();
    let before = step_of(&s);
    let s = wait_until(
        http,
        "a step after the kill",
        Duration::from_secs(60),
        |s| step_of(s) > before + 1 && s["counters"]["recoveries"].as_u64().unwrap_or(0) >= 1,
    );
    eprintln!(
        "recovered {:.1}s after SIGKILL (step {})",
        killed_at.elapsed().as_secs_f64(),
        step_of(&s)
    );
    // A new worker joins later and gets the state by broadcast.
    let after = step_of(&s);
    let _d = worker(grpc, "w-d");
    wait_until(http, "the joiner at work", Duration::from_secs(60), |s| {
        step_of(s) > after && s["workers"].as_array().map(|w| w.len()) == Some(3)
    });
    wait_until(
        http,
        "the end of the epoch",
        Duration::from_secs(240),
        |s| s["state"] == "finished",
    );
    assert_exactly_once(&data, &tmp.path().join("run"));
}

/// The coordinator is stopped by `stop` at step 3 and started again with the same arguments
/// (as Kubernetes restarts it): the run goes
/// past where it was and finishes, every sample used exactly once.
fn coordinator_restarted(stop: impl FnOnce(&mut Proc)) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 400, 3);
    let cfg = write_config(tmp.path(), &data, "");
    let (grpc, http) = (free_port(), free_port());
    let mut coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let _b = worker(grpc, "w-b");
    let s = wait_until(http, "step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3
    });
    stop(&mut coord);
    let _coord = coordinator(&cfg, grpc, http);
    let s2 = wait_until(
        http,
        "progress after the restart",
        Duration::from_secs(90),
        |x| step_of(x) > step_of(&s) + 1,
    );
    assert!(step_of(&s2) > step_of(&s));
    wait_until(
        http,
        "the end of the epoch",
        Duration::from_secs(240),
        |s| s["state"] == "finished",
    );
    assert_exactly_once(&data, &tmp.path().join("run"));
}

#[test]
fn a_sigkilled_coordinator_resumes_and_the_run_finishes() {
    coordinator_restarted(|coord| {
        coord.0.kill().expect("kill coordinator");
        let _ = coord.0.wait();
    });
}

/// One worker SIGKILLs itself at an exact moment of a step (see worker/src/fault.rs); the
/// other two finish the epoch, every sample used exactly once.
fn killed_at(fault: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 300, 3);
    // Small buckets: the gradient all-reduce has several, so `allreduce` dies between two.
    let cfg = write_config(tmp.path(), &data, "bucket_mb = 0.02");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let mut b = worker_with(grpc, "w-b", &[("FERROCLIP_FAULT", fault)]);
    let _c = worker(grpc, "w-c");
    let status = b.0.wait().expect("wait for the faulty worker");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "{fault}: the worker did not SIGKILL itself"
    );
    let s = wait_until(
        http,
        "the end of the epoch",
        Duration::from_secs(240),
        |s| s["state"] == "finished",
    );
    assert!(
        s["counters"]["recoveries"].as_u64().unwrap_or(0) >= 1,
        "{fault}: no recovery recorded: {s}"
    );
    assert_exactly_once(&data, &tmp.path().join("run"));
}

/// A rank that waits for a peer while forming the ring, longer than the heartbeat timeout, is
/// alive: its heartbeats run from the Join on. Only the silent peer is declared dead.
#[test]
fn a_rank_waiting_to_form_the_ring_is_not_declared_dead() {
    ring_wait_outlasts_the_heartbeat_timeout(&[]);
}

/// The same with the coordinator's heartbeat port out of the worker's reach (as behind a
/// Service that does not expose it): the worker's beats go to the main port instead.
#[test]
fn a_worker_that_cannot_reach_the_heartbeat_port_beats_on_the_main_port() {
    // Bound on 127.0.0.2: the worker, which reached the coordinator at 127.0.0.1, is refused.
    let unreachable = format!("127.0.0.2:{}", free_port());
    ring_wait_outlasts_the_heartbeat_timeout(&["--heartbeat-addr", &unreachable]);
}

fn ring_wait_outlasts_the_heartbeat_timeout(coordinator_args: &[&str]) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 300, 3);
    let cfg = write_config(tmp.path(), &data, "");
    // The wait for a peer (8 s) outlasts the heartbeat timeout (3 s).
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("collective_timeout_s = 5.0", "collective_timeout_s = 8.0");
    std::fs::write(&cfg, text).expect("cfg");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator_with(&cfg, grpc, http, coordinator_args, &[]);
    let _a = worker(grpc, "w-a");
    // "w-b" stops itself (SIGSTOP) once placed, before it dials its peer.
    let _b = worker_with(grpc, "w-b", &[("FERROCLIP_FAULT", "ring:1:stop")]);
    let s = wait_until(http, "the end", Duration::from_secs(240), |s| {
        s["state"] == "finished"
    });
    let said = |text: &str| {
        s["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
    };
    assert!(said("w-b missed its heartbeats"), "{}", s["events"]);
    assert!(!said("w-a missed its heartbeats"), "{}", s["events"]);
    assert_eq!(s["counters"]["worker_deaths"], 1, "{}", s["counters"]);
    assert_exactly_once(&data, &tmp.path().join("run"));
}

#[test]
fn exactly_once_when_killed_during_data_loading() {
    killed_at("load:3");
}

#[test]
fn exactly_once_when_killed_during_the_all_reduce() {
    killed_at("allreduce:12");
}

#[test]
fn exactly_once_when_killed_right_after_the_optimizer_step() {
    killed_at("applied:3");
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM failed");
}

#[test]
fn a_sigtermed_worker_leaves_cleanly_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 400, 3);
    let cfg = write_config(tmp.path(), &data, "");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let mut b = worker(grpc, "w-b");
    let _c = worker(grpc, "w-c");
    let s = wait_until(http, "3 workers at step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3 && s["workers"].as_array().map(|w| w.len()) == Some(3)
    });
    sigterm(&b);
    let status = exit_within(&mut b, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "a SIGTERMed worker exits 0");
    let before = step_of(&s);
    let s = wait_until(
        http,
        "progress on 2 workers",
        Duration::from_secs(60),
        |s| step_of(s) > before + 1 && s["workers"].as_array().map(|w| w.len()) == Some(2),
    );
    // It said goodbye: the coordinator did not have to detect a death.
    assert_eq!(
        s["counters"]["worker_deaths"].as_u64().unwrap_or(0),
        0,
        "{s}"
    );
    wait_until(
        http,
        "the end of the epoch",
        Duration::from_secs(240),
        |s| s["state"] == "finished",
    );
    assert_exactly_once(&data, &tmp.path().join("run"));
}

#[test]
fn a_sigtermed_coordinator_journals_exits_and_resumes() {
    coordinator_restarted(|coord| {
        sigterm(coord);
        let status = exit_within(coord, Duration::from_secs(15));
        assert_eq!(
            status.code(),
            Some(143),
            "a coordinator SIGTERMed before the run ended exits 128 + 15: stopped, not done"
        );
    });
}

#[test]
fn a_gpu_config_on_cpu_workers_stops_at_once_naming_the_key() {
    // cluster.backend = "nccl" with CPU workers must not hang the launcher or train on the wrong
    // collective: every worker refuses before building anything, and the launcher says so.
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 60, 1);
    let cfg = write_config(tmp.path(), &data, "backend = \"nccl\"");
    let t0 = Instant::now();
    let out = Command::new(bin("ferroclip"))
        .args(["train", "--workers", "2", "--config"])
        .arg(&cfg)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ferroclip train");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "train succeeded: {stderr}");
    assert!(
        stderr.contains("cluster.backend = \"nccl\"") && stderr.contains("--device cuda"),
        "{stderr}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}
