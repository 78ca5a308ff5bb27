//! `ferroclip`'s exit codes, which a Job's podFailurePolicy reads (k8s/README.md): 2 for a usage
//! or config error (retrying cannot help), 128 + 15 for a coordinator SIGTERMed before its run
//! ended (stopped, not done: a Job replaces the pod instead of counting it as succeeded).

mod run_common;

use run_common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_bad_config_or_flag_exits_2_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let typo = tmp.path().join("typo.toml");
    std::fs::write(&typo, "[optim]\nglobal_bach = 3\n").expect("write");
    let typo = typo.to_string_lossy().to_string();
    let (grpc, http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let cases: [(&[&str], &str); 3] = [
        (&["config", &typo], "global_bach"),
        (
            &[
                "coordinator",
                "--config",
                &typo,
                "--grpc-addr",
                &grpc,
                "--http-addr",
                &http,
            ],
            "global_bach",
        ),
        (&["coordinator", "--no-such-flag"], "--no-such-flag"),
    ];
    for (args, named) in cases {
        let out = Command::new(bin("ferroclip"))
            .args(args)
            .env("FERROCLIP_TOKEN", TOKEN)
            .output()
            .expect("run ferroclip");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?} should name {named}: {stderr}"
        );
    }
}

#[test]
fn a_coordinator_sigtermed_before_its_run_ended_exits_143() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 40, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let (grpc, http) = (free_port(), free_port());
    let mut coord = coordinator(&cfg, grpc, http);
    wait_until(
        http,
        "the coordinator serving",
        Duration::from_secs(60),
        |s| s["state"] == "waiting",
    );
    let ok = Command::new("kill")
        .args(["-TERM", &coord.0.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM failed");
    let status = exit_within(&mut coord, Duration::from_secs(15));
    assert_eq!(status.code(), Some(143), "128 + SIGTERM: stopped, not done");
}
