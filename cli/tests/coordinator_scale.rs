//! The coordinator under `ferroclip bench coordinator`: a real coordinator process and
//! simulated workers speaking the real protocol over loopback (no libtorch). The load
//! generator checks from the coordinator's answers that every committed step fed the full
//! global batch and no sample twice (`--verify`); these tests run it small and assert that,
//! through a worker's death, a SIGKILL of the coordinator with a torn journal entry, and a
//! long run's memory.

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip"))
        .args([
            "bench",
            "coordinator",
            "--json",
            "--coordinator-core",
            "none",
        ])
        .args(["--dir", &dir.path().display().to_string()])
        .args([
            "--blocks",
            "2000",
            "--per-rank-batch",
            "8",
            "--step-hz",
            "0",
        ])
        .args(["--max-seconds", "120"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ferroclip bench coordinator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON report: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        out.status.success() && report["problem"].is_null(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

#[test]
fn simulated_workers_get_full_batches_exactly_once_through_a_death() {
    let r = bench(&[
        "--workers",
        "32",
        "--steps",
        "50",
        "--checkpoint-every",
        "10",
        "--kill-at",
        "20",
        "--verify",
    ]);
    assert_eq!(r["steps"], 50, "{r}");
    assert_eq!(r["workers"], 32);
    assert!(
        r["recovery_s"].as_f64().is_some(),
        "a death was recovered: {r}"
    );
    for rpc in ["Join", "Heartbeat", "NextStep", "CommitStep"] {
        assert!(r["rpc"][rpc]["calls"].as_u64() > Some(0), "{rpc}: {r}");
    }
}

/// The same with `data.lanes = 8` (fewer lanes than the 32 ranks: ranks share lanes' chunks):
/// the lanes' leases outlive the regroup after the death.
#[test]
fn with_fixed_lanes_simulated_workers_get_full_batches_exactly_once_through_a_death() {
    let r = bench(&[
        "--workers",
        "32",
        "--steps",
        "30",
        "--checkpoint-every",
        "10",
        "--kill-at",
        "12",
        "--lanes",
        "8",
        "--verify",
    ]);
    assert_eq!(r["steps"], 30, "{r}");
    assert!(
        r["recovery_s"].as_f64().is_some(),
        "a death was recovered: {r}"
    );
}

#[test]
fn a_coordinator_killed_mid_run_loses_no_acknowledged_step_and_skips_a_torn_entry() {
    // A different point of the run each time: the kill lands wherever the RPCs are.
    let at = 5 + std::process::id() % 30;
    let r = bench(&[
        "--workers",
        "16",
        "--steps",
        "50",
        "--checkpoint-every",
        "7",
        "--crash-at",
        &at.to_string(),
        "--crash-tear",
        "--verify",
    ]);
    let crash = &r["crash"];
    let (acked, resumed) = (crash["acked_step"].as_u64(), crash["resumed_step"].as_u64());
    assert!(acked >= Some(u64::from(at)), "{r}");
    assert!(resumed >= acked, "an acknowledged step was lost: {r}");
    assert_eq!(r["steps"], 50, "{r}");
}

#[test]
fn coordinator_memory_stays_bounded_over_a_long_run() {
    let r = bench(&[
        "--workers",
        "64",
        "--steps",
        "600",
        "--checkpoint-every",
        "50",
    ]);
    let rss = r["rss_mb"].as_f64().expect("rss");
    // Measured precisely by the benchmark (bench/README-coordinator.md); loosely here.
    assert!(rss < 150.0, "RSS {rss} MB: {r}");
    let series: Vec<f64> = r["rss_series"]
        .as_array()
        .expect("series")
        .iter()
        .filter_map(|p| p[1].as_f64())
        .collect();
    if series.len() >= 4 {
        let (early, last) = (series[series.len() / 4], series[series.len() - 1]);
        assert!(last - early < 30.0, "RSS grew {early} → {last} MB: {r}");
    }
}
