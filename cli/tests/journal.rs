//! The coordinator's journal with real processes: a second coordinator on a live journal fails
//! fast while the first keeps the run; a torn newest snapshot (a write never acknowledged) falls
//! back to the previous one; a journal write that fails answers UNAVAILABLE and its retry
//! succeeds; one slower than the heartbeat timeout declares nobody dead.

mod run_common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferroclip_proto::v1::{self, coordinator_client::CoordinatorClient};
use run_common::*;

const BATCH: u32 = 20;

fn setup(rows: u32) -> (tempfile::TempDir, String, String, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), rows, 5);
    let run_dir = tmp.path().join("run").display().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, BATCH, "");
    (tmp, data, run_dir, cfg)
}

#[test]
fn a_second_coordinator_on_the_same_journal_fails_fast_and_the_first_keeps_the_run() {
    let (_tmp, data, run_dir, cfg) = setup(600);
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let _b = worker(grpc, "w-b");
    wait_until(http, "step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3
    });
    let t0 = Instant::now();
    let mut second = Command::new(bin("ferroclip"))
        .args(["coordinator", "--config"])
        .arg(&cfg)
        .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
        .env("FERROCLIP_TOKEN", TOKEN)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("second coordinator");
    let status = loop {
        if let Some(s) = second.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the second coordinator kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    second
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(!status.success(), "the second coordinator started: {err}");
    assert!(err.contains("held by a running coordinator"), "{err}");
    eprintln!(
        "second coordinator refused in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    // The first one keeps the run to its end.
    wait_until(http, "the end", Duration::from_secs(180), |s| {
        s["state"] == "finished"
    });
    assert_step_contract(&data, &run_dir, &Default::default(), BATCH as usize);
}

/// The newest snapshot file of a journal directory.
fn newest_snapshot(journal: &Path) -> (u64, std::path::PathBuf) {
    std::fs::read_dir(journal)
        .expect("journal dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let seq = name
                .strip_prefix("snapshot-")?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()?;
            Some((seq, e.path()))
        })
        .max()
        .expect("a snapshot")
}

#[test]
fn an_empty_newest_snapshot_falls_back_to_the_previous_one() {
    let (tmp, data, run_dir, cfg) = setup(600);
    let (grpc, http) = (free_port(), free_port());
    let mut coord = coordinator(&cfg, grpc, http);
    let _a = worker(grpc, "w-a");
    let _b = worker(grpc, "w-b");
    wait_until(http, "step 3", Duration::from_secs(120), |s| {
        step_of(s) >= 3
    });
    coord.0.kill().expect("kill");
    let _ = coord.0.wait();
    // A write torn by the crash (never acknowledged: nothing is answered before its write is
    // durable) leaves an empty newest snapshot.
    let journal = tmp.path().join("run/journal");
    let (seq, _) = newest_snapshot(&journal);
    let torn = journal.join(format!("snapshot-{:020}.json", seq + 1));
    std::fs::write(&torn, b"").expect("torn snapshot");
    let _coord = coordinator(&cfg, grpc, http);
    let s = wait_until(http, "the end", Duration::from_secs(180), |s| {
        s["state"] == "finished"
    });
    assert!(
        s["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["kind"] == "resume"),
        "{}",
        s["events"]
    );
    assert_step_contract(&data, &run_dir, &Default::default(), BATCH as usize);
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    // A member's session secret (Join adopts the first one presented for a free id).
    r.metadata_mut().insert(
        ferroclip_proto::SESSION_HEADER,
        "test-session-0123456789abcdef".parse().expect("ascii"),
    );
    r
}

#[tokio::test]
async fn a_failed_journal_write_answers_unavailable_and_its_retry_succeeds() {
    let (tmp, data, _run_dir, cfg) = setup(200);
    let (grpc, http) = (free_port(), free_port());
    // Writes of new state: #1 the start, #2 the first generation, #3 the assignments of its
    // first steps, which the Join's answer carries.
    let env = [("FERROCLIP_COORDINATOR_FAULT", "journal:fail:3")];
    let mut coord = coordinator_with(&cfg, grpc, http, &[], &env);
    let url = format!("http://127.0.0.1:{grpc}");
    let mut c = loop {
        if let Ok(c) = CoordinatorClient::connect(url.clone()).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let join = || {
        authed(v1::JoinRequest {
            worker_id: "w-a".into(),
            host: "h".into(),
            device: "cpu".into(),
            collective_addr: "127.0.0.1:1".into(),
            last_generation: 0,
            last_applied_step: 0,
            state_generation: 0,
        })
    };
    // The generation (#2) and its first steps' assignments are staged apart, but the writer
    // may fold them into one write: then the failing write is the next new state's, step 1's
    // commit (carrying step 3's assignment).
    let (place, joined_after_a_failure) = match c.join(join()).await {
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
            assert!(e.message().contains("journal"), "{e}");
            let place = c.join(join()).await.expect("the retry succeeds");
            (place.into_inner(), true)
        }
        Ok(place) => (place.into_inner(), false),
    };
    let first = place.first_steps.first().expect("step 1 rides on the Join");
    assert_eq!((first.step, first.samples.len()), (1, BATCH as usize));
    let r = c
        .next_step(authed(v1::NextStepRequest {
            worker_id: "w-a".into(),
            generation: place.generation,
            step: 1,
        }))
        .await
        .expect("NextStep")
        .into_inner();
    assert_eq!(
        r.samples, first.samples,
        "NextStep answers what the Join carried"
    );
    if !joined_after_a_failure {
        let commit = || {
            authed(v1::CommitStepRequest {
                worker_id: "w-a".into(),
                generation: place.generation,
                step: 1,
                samples: BATCH,
                metrics: vec![],
                next_step: 3,
            })
        };
        let e = c.commit_step(commit()).await.expect_err("the write fails");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains("journal"), "{e}");
        let r = c.commit_step(commit()).await.expect("the retry succeeds");
        let r = r.into_inner();
        assert!(r.committed, "{r:?}");
        assert_eq!(r.next.map(|n| n.step), Some(3));
        return;
    }
    // What the retry answered is durable: a restarted coordinator has step 1 assigned.
    coord.0.kill().expect("kill");
    let _ = coord.0.wait();
    let journal = tmp.path().join("run/journal");
    let (_, newest) = newest_snapshot(&journal);
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&newest).expect("read")).expect("json");
    assert_eq!(snap["pending"][0]["step"], 1, "{snap}");
    let _ = data;
}

#[test]
fn a_journal_write_slower_than_the_heartbeat_timeout_declares_nobody_dead() {
    let (_tmp, data, run_dir, cfg) = setup(400);
    // As with the defaults (10 s heartbeat timeout, 30 s collective timeout), a rank waits in a
    // collective longer than a peer may wait on the coordinator: here 15 s against the 6 s stall.
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("collective_timeout_s = 5.0", "collective_timeout_s = 15.0");
    std::fs::write(&cfg, text).expect("cfg");
    let (grpc, http) = (free_port(), free_port());
    // The 6th write of new state takes 6 s: twice the heartbeat timeout.
    let env = [("FERROCLIP_COORDINATOR_FAULT", "journal:slow:6:6000")];
    let _coord = coordinator_with(&cfg, grpc, http, &[], &env);
    let _a = worker(grpc, "w-a");
    let _b = worker(grpc, "w-b");
    let s = wait_until(http, "the end", Duration::from_secs(180), |s| {
        s["state"] == "finished"
    });
    assert_eq!(s["counters"]["worker_deaths"], 0, "{}", s["counters"]);
    assert_step_contract(&data, &run_dir, &Default::default(), BATCH as usize);
}
