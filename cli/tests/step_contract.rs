//! The step contract with real processes: every committed step feeds exactly the global batch
//! (the epoch-limited run's last step holds the remainder), the run takes exactly the steps its
//! schedule says, and every run ends — whatever dies in its last steps or while its final
//! checkpoint is written, and with its data, journal and checkpoints on S3.

mod run_common;

use std::path::Path;
use std::time::{Duration, Instant};

use run_common::*;

/// 600 synthetic rows (540 train) in row groups of 20, chunks of 4 blocks; batch 20 over 3
/// workers: 27 steps, each rank's share 7/7/6, chunks ending mid-step at the tail.
const BATCH: u32 = 20;

fn status_total_steps(http: u16) -> u64 {
    let s = wait_until(http, "the coordinator", Duration::from_secs(60), |_| true);
    s["total_steps"].as_u64().expect("total_steps")
}

#[test]
fn every_step_is_a_full_global_batch_and_the_schedule_counts_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 600, 5);
    let run_dir = tmp.path().join("run").display().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, BATCH, "");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _w: Vec<Proc> = ["w-a", "w-b", "w-c"]
        .iter()
        .map(|id| worker(grpc, id))
        .collect();
    let total = status_total_steps(http);
    let s = wait_until(http, "the end", Duration::from_secs(180), |s| {
        s["state"] == "finished"
    });
    let steps = assert_step_contract(&data, &run_dir, &Default::default(), BATCH as usize);
    assert_eq!(
        steps.len() as u64,
        total,
        "total_steps is what the run commits"
    );
    assert_eq!(s["step"].as_u64(), Some(total));
    let short = steps
        .iter()
        .filter(|(n, st)| st.keys.len() != BATCH as usize && **n != total)
        .count();
    eprintln!("{total} steps, {short} with a short batch before the last");
    // The final checkpoint is recorded once, of the last step.
    let ckpt = s["last_checkpoint"].as_str().expect("checkpoint");
    assert!(ckpt.ends_with(&format!("step-{total:08}")), "{ckpt}");
    let recorded = s["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "checkpoint")
        .count();
    assert_eq!(recorded, 1, "{}", s["events"]);
}

/// One of three workers SIGKILLs itself at the fault `fault(total_steps)`; the run must
/// still reach `finished` within `bound` of the kill, with the whole contract.
fn killed_near_the_end(fault: impl Fn(u64) -> String, bound: Duration) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 600, 5);
    let total = (train_keys(&data, &Default::default()).len() as u64).div_ceil(BATCH as u64);
    let fault = fault(total);
    let run_dir = tmp.path().join("run").display().to_string();
    // The faulty worker joins first and the others within the (long) settle time, so it is
    // rank 0 (the final checkpoint's writer) when that matters; any survivors may go on.
    let cfg = run_config(tmp.path(), &run_dir, &data, BATCH, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("max_workers = 4", "max_workers = 3")
        .replace("settle_s = 1.0", "settle_s = 10.0");
    std::fs::write(&cfg, text).expect("config");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let mut faulty = worker_with(grpc, "w-a", &[("FERROCLIP_FAULT", &fault)]);
    wait_until(http, "w-a waiting", Duration::from_secs(60), |s| {
        s["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "join"))
    });
    let _b = worker(grpc, "w-b");
    let _c = worker(grpc, "w-c");
    let status = faulty.0.wait().expect("wait for the faulty worker");
    let killed = Instant::now();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{fault}: the worker did not die");
    let s = wait_until(http, "the end", bound, |s| s["state"] == "finished");
    eprintln!(
        "{fault} of {total} steps: finished {:.1}s after the kill, at step {}",
        killed.elapsed().as_secs_f64(),
        s["step"]
    );
    assert_eq!(s["step"].as_u64(), Some(total));
    assert_step_contract(&data, &run_dir, &Default::default(), BATCH as usize);
}

#[test]
fn a_death_at_each_of_the_last_three_steps_still_ends_the_run() {
    // The worker dies right after applying the last step, the one before, or the one before
    // that (before its CommitStep).
    for back in 0..3 {
        killed_near_the_end(
            |total| format!("applied:{}", total - back),
            Duration::from_secs(60),
        );
    }
}

#[test]
fn a_death_while_the_final_checkpoint_is_written_still_ends_the_run() {
    // No periodic checkpoints: rank 0 (w-a) dies between the final checkpoint's files and its
    // COMMIT; the survivors re-form and the new rank 0 writes it.
    killed_near_the_end(|_| "checkpoint:1".into(), Duration::from_secs(60));
}

/// A directory that must stay empty: the processes' working directory.
fn assert_empty(dir: &Path, who: &str) {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(entries.is_empty(), "{who} wrote locally: {entries:?}");
}

/// `ferroclip shards synth` of `rows` rows onto the S3 server; the dataset's URL.
fn synth_on_s3(s3: &S3Server, rows: u32) -> String {
    let data = format!("s3://{S3_BUCKET}/data");
    let out = std::process::Command::new(bin("ferroclip"))
        .args([
            "shards",
            "synth",
            "--rows",
            &rows.to_string(),
            "--seed",
            "5",
        ])
        .args([
            "--image-size",
            "16",
            "--rows-per-row-group",
            "20",
            "--val-fraction",
            "0.1",
        ])
        .args(["--no-progress", "--out", &data])
        .envs(s3_env(s3).iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("synth");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

/// The S3 server's credentials and endpoint, plain HTTP allowed.
fn s3_env(s3: &S3Server) -> Vec<(&'static str, String)> {
    let mut env = s3.env();
    env.push(("FERROCLIP_ALLOW_HTTP", "true".into()));
    env
}

/// `ferroclip coordinator` reaching the S3 server, in working directory `cwd`.
fn coordinator_s3(cfg: &Path, grpc: u16, http: u16, s3: &S3Server, cwd: &Path) -> Proc {
    let mut c = std::process::Command::new(bin("ferroclip"));
    c.args(["coordinator", "--config"])
        .arg(cfg)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .current_dir(cwd)
        .env("FERROCLIP_TOKEN", TOKEN)
        .envs(s3_env(s3).iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null());
    Proc(c.spawn().expect("coordinator"))
}

#[test]
fn on_s3_a_run_survives_losing_every_process_and_finishes_exactly_once() {
    let s3 = S3Server::start();
    let opts = s3.options();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth_on_s3(&s3, 600);
    let run_dir = format!("s3://{S3_BUCKET}/run");
    let cfg = run_config(
        tmp.path(),
        &run_dir,
        &data,
        BATCH,
        "[checkpoint]\nevery_steps = 5",
    );
    let (grpc, http) = (free_port(), free_port());
    // Every process in a working directory of its own, which must stay empty.
    let start = |tag: &str| {
        let cwd = tmp.path().join(format!("cwd-{tag}"));
        std::fs::create_dir_all(&cwd).expect("cwd");
        let coord = coordinator_s3(&cfg, grpc, http, &s3, &cwd);
        let workers: Vec<Proc> = ["w-a", "w-b", "w-c"]
            .iter()
            .map(|id| {
                let wcwd = cwd.join(id);
                std::fs::create_dir_all(&wcwd).expect("cwd");
                worker_in(grpc, id, &wcwd, &s3_env(&s3))
            })
            .collect();
        (coord, workers, cwd)
    };
    let (mut coord, mut workers, cwd1) = start("first");
    wait_until(http, "step 12", Duration::from_secs(120), |s| {
        step_of(s) >= 12
    });
    // Lose everything at once.
    for w in workers.iter_mut() {
        let _ = w.0.kill();
        let _ = w.0.wait();
    }
    let _ = coord.0.kill();
    let _ = coord.0.wait();
    // Checkpoints landed in the bucket, whole; nothing was written locally.
    let ckpt = s3.object_path("run/checkpoints/step-00000010/COMMIT");
    assert!(ckpt.is_file(), "no committed checkpoint in the bucket");
    for id in ["w-a", "w-b", "w-c"] {
        assert_empty(&cwd1.join(id), id);
    }
    // Start all of them again, elsewhere: the run rolls back to its checkpoint and finishes.
    let (_coord, _workers, cwd2) = start("second");
    let s = wait_until(
        http,
        "the end after the restart",
        Duration::from_secs(180),
        |s| s["state"] == "finished",
    );
    assert!(
        s["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["kind"] == "restore"),
        "no rollback to a checkpoint: {}",
        s["events"]
    );
    for id in ["w-a", "w-b", "w-c"] {
        assert_empty(&cwd2.join(id), id);
    }
    assert_step_contract(&data, &run_dir, &opts, BATCH as usize);
}

#[test]
fn a_store_outage_of_45_seconds_is_ridden_out_by_every_process() {
    let mut s3 = S3Server::start();
    let opts = s3.options();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth_on_s3(&s3, 600);
    let run_dir = format!("s3://{S3_BUCKET}/run");
    // Two epochs: the run is still going when the store comes back.
    let cfg = run_config(tmp.path(), &run_dir, &data, BATCH, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("epochs = 1", "epochs = 2");
    std::fs::write(&cfg, text).expect("cfg");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator_s3(&cfg, grpc, http, &s3, tmp.path());
    let mut workers: Vec<Proc> = ["w-a", "w-b"]
        .iter()
        .map(|id| worker_in(grpc, id, tmp.path(), &s3_env(&s3)))
        .collect();
    wait_until(http, "step 5", Duration::from_secs(120), |s| {
        step_of(s) >= 5
    });
    s3.stop();
    let down = Instant::now();
    // While it is down the run waits, and says so.
    let mut waited_seen = false;
    while down.elapsed() < Duration::from_secs(45) {
        if let Some(s) = status(http) {
            let worker_wait = s["workers"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["store_wait_s"].as_f64() > Some(0.0)));
            waited_seen |= s["store_wait_s"].as_f64() > Some(0.0) || worker_wait;
        }
        for (i, w) in workers.iter_mut().enumerate() {
            assert!(exited(w).is_none(), "worker {i} exited during the outage");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    s3.resume();
    assert!(
        waited_seen,
        "the status never showed a process waiting on the store"
    );
    wait_until(http, "the end", Duration::from_secs(240), |s| {
        s["state"] == "finished"
    });
    for (i, w) in workers.iter_mut().enumerate() {
        let st = exit_within(w, Duration::from_secs(30));
        assert!(st.success(), "worker {i} ended with {st}");
    }
    assert_epochs_contract(&data, &run_dir, &opts, BATCH as usize, 2);
}

/// `step N loss … batch n …` lines of `ferroclip-worker train`: each step's batch size.
fn single_process_batches(stdout: &str) -> Vec<(u64, usize)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "step").then_some(())?;
            let step: u64 = w.next()?.parse().ok()?;
            let mut w = l.split_whitespace();
            w.find(|t| *t == "batch")?;
            Some((step, w.next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn one_process_and_the_launcher_take_the_same_steps_for_one_config() {
    // Two epochs of 553 samples in batches of 20: 56 steps, the one across the epoch boundary
    // full, only the last short (13). Both entry points run the plan crate's ledger.
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 600, 5);
    let samples = 2 * train_keys(&data, &Default::default()).len();
    let want: Vec<usize> = (0..samples.div_ceil(20))
        .map(|i| (samples - 20 * i).min(20))
        .collect();
    let one = tmp.path().join("one");
    std::fs::create_dir_all(&one).expect("dir");
    let cfg = run_config(&one, &one.join("run").display().to_string(), &data, 20, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("epochs = 1", "epochs = 2");
    std::fs::write(&cfg, text).expect("cfg");
    let out = std::process::Command::new(bin("ferroclip-worker"))
        .args(["train", "--no-progress", "--threads", "1", "--config"])
        .arg(&cfg)
        .output()
        .expect("ferroclip-worker train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single = single_process_batches(&String::from_utf8_lossy(&out.stdout));
    let single_sizes: Vec<usize> = single.iter().map(|(_, n)| *n).collect();
    assert_eq!(single_sizes, want, "ferroclip-worker train's batches");

    let many = tmp.path().join("many");
    std::fs::create_dir_all(&many).expect("dir");
    // A relative run.dir, as configs/demo.toml has: the coordinator must recognise the
    // checkpoints the workers report under their absolute paths, or the run never finishes.
    let run_dir = many.join("run").display().to_string();
    let cfg = run_config(&many, "run", &data, 20, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("epochs = 1", "epochs = 2");
    std::fs::write(&cfg, text).expect("cfg");
    let out = std::process::Command::new(bin("ferroclip"))
        .args(["train", "--workers", "2", "--threads", "1", "--config"])
        .arg(&cfg)
        .current_dir(&many)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ferroclip train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps = assert_epochs_contract(&data, &run_dir, &Default::default(), 20, 2);
    let launcher_sizes: Vec<usize> = steps.values().map(|s| s.keys.len()).collect();
    assert_eq!(
        launcher_sizes, want,
        "ferroclip train --workers 2's batches"
    );
}

#[test]
fn ferroclip_worker_train_reads_s3_data_and_checkpoints_there() {
    let s3 = S3Server::start();
    let env = s3_env(&s3);
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth_on_s3(&s3, 200);
    let run_dir = format!("s3://{S3_BUCKET}/single");
    let cfg = run_config(
        tmp.path(),
        &run_dir,
        &data,
        20,
        "[checkpoint]\nevery_steps = 4",
    );
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).expect("cwd");
    let out = std::process::Command::new(bin("ferroclip-worker"))
        .args([
            "train",
            "--no-progress",
            "--threads",
            "1",
            "--allow-http",
            "--config",
        ])
        .arg(&cfg)
        .current_dir(&cwd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let batches = single_process_batches(&String::from_utf8_lossy(&out.stdout));
    let samples = train_keys(&data, &s3.options()).len();
    assert_eq!(batches.len(), samples.div_ceil(20));
    assert!(
        s3.object_path("single/checkpoints/step-00000004/COMMIT")
            .is_file(),
        "no checkpoint on S3"
    );
    let last = batches.len();
    assert!(
        s3.object_path(&format!("single/checkpoints/step-{last:08}/COMMIT"))
            .is_file(),
        "no final checkpoint on S3"
    );
    assert_empty(&cwd, "ferroclip-worker train");
}

/// Whether a process is stopped (SIGSTOP): state `T` in /proc.
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Three workers; w-a stops itself right after applying step `total - 1`; while the run is
/// paused there, `act` happens (a coordinator restart, a joiner, a SIGTERM); then w-a goes on.
/// The run must reach `finished` with the whole contract.
/// `act` gets the coordinator, the config, the ports and w-b.
fn event_in_the_last_steps(
    what: &str,
    act: impl FnOnce(&mut Proc, &Path, u16, u16, &Proc) -> Vec<Proc>,
) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 600, 5);
    let total = (train_keys(&data, &Default::default()).len() as u64).div_ceil(BATCH as u64);
    let run_dir = tmp.path().join("run").display().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, BATCH, "");
    let (grpc, http) = (free_port(), free_port());
    let mut coord = coordinator(&cfg, grpc, http);
    let fault = format!("applied:{}:stop", total - 1);
    let a = worker_with(grpc, "w-a", &[("FERROCLIP_FAULT", &fault)]);
    let b = worker(grpc, "w-b");
    let _c = worker(grpc, "w-c");
    let t0 = Instant::now();
    while !stopped(a.0.id()) {
        assert!(t0.elapsed() < Duration::from_secs(120), "w-a never paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    let extra = act(&mut coord, &cfg, grpc, http, &b);
    signal(a.0.id(), "CONT");
    let t = Instant::now();
    let s = wait_until(http, "the end", Duration::from_secs(120), |s| {
        s["state"] == "finished"
    });
    eprintln!(
        "{what} at step {} of {total}: finished {:.1}s later",
        total - 1,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(s["step"].as_u64(), Some(total));
    drop(extra);
    assert_step_contract(&data, &run_dir, &Default::default(), BATCH as usize);
}

#[test]
fn a_coordinator_restart_in_the_last_steps_still_ends_the_run() {
    event_in_the_last_steps(
        "coordinator SIGKILL + restart",
        |coord, cfg, grpc, http, _| {
            coord.0.kill().expect("kill");
            let _ = coord.0.wait();
            *coord = coordinator(cfg, grpc, http);
            Vec::new()
        },
    );
}

#[test]
fn a_join_in_the_last_steps_still_ends_the_run() {
    event_in_the_last_steps("a new worker", |_, _, grpc, _, _| vec![worker(grpc, "w-d")]);
}

#[test]
fn a_sigterm_in_the_last_steps_still_ends_the_run() {
    event_in_the_last_steps("SIGTERM of a worker", |_, _, _, _, b| {
        // w-b leaves cleanly; the paused w-a and w-c go on without it.
        signal(b.0.id(), "TERM");
        Vec::new()
    });
}
