//! Resume: SIGKILL a real build process midway, re-run the same command, and the manifest and
//! every shard are byte-identical to those of an uninterrupted build.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn build_killed_midway_resumes_to_identical_output() {
    let tmp = tempfile::tempdir().unwrap();
    // Big enough images that a single-threaded build takes seconds, so the kill lands midway.
    let rows = good_rows("k", 1500, 192);
    write_parquet(
        &tmp.path().join("in/a.parquet"),
        &rows[..800],
        "caption",
        false,
        64,
    );
    write_parquet(
        &tmp.path().join("in/b.parquet"),
        &rows[800..],
        "caption",
        false,
        64,
    );
    let out = tmp.path().join("out");
    let src = tmp.path().join("in");
    let args = [
        "build",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "1",
        "--resize",
        "96",
        "--val-fraction",
        "0.1",
        "--rows-per-shard",
        "60",
        "--rows-per-row-group",
        "20",
    ];

    // The reference: an uninterrupted build, moved aside so the re-run uses the same command line.
    let o = run_bin(&args, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let clean = tmp.path().join("clean");
    std::fs::rename(&out, &clean).unwrap();

    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = out.join("train/shard-00003.parquet");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the build wrote no shards in time"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("manifest.json").exists(),
        "the build finished before the kill; enlarge the input"
    );
    assert!(
        !out.join("train/shard-00020.parquet").exists(),
        "killed too late to test resuming"
    );

    let o = run_bin(&args, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("resumed: kept"), "{report}");

    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&manifest),
        String::from_utf8_lossy(&std::fs::read(clean.join("manifest.json")).unwrap())
    );
    let m: ferroclip_shards::Manifest = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m.total_rows(), 1500);
    for split in m.splits.values() {
        for s in &split.shards {
            assert!(
                std::fs::read(out.join(&s.path)).unwrap()
                    == std::fs::read(clean.join(&s.path)).unwrap(),
                "{} differs from the clean build",
                s.path
            );
        }
    }
}
