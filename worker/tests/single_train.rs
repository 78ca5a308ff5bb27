//! `ferroclip-worker train` as a real process on `shards synth` data: per-step losses,
//! checkpoints, periodic eval, and exact resume after a SIGKILL (the next losses of the resumed
//! run equal the uninterrupted run's within 1e-5).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    shards: ferroclip_shards::cli::ShardsArgs,
}

/// 120 synth rows of 16×16 in blocks of 12, a tenth held out as `val`.
fn synth(dir: &Path) -> String {
    let out = dir.join("data").display().to_string();
    let cli = Cli::parse_from([
        "shards",
        "synth",
        "--out",
        &out,
        "--rows",
        "120",
        "--seed",
        "5",
        "--image-size",
        "16",
        "--rows-per-row-group",
        "12",
        "--val-fraction",
        "0.1",
        "--no-progress",
        "--threads",
        "2",
    ]);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(ferroclip_shards::cli::run(cli.shards))
        .expect("synth");
    out
}

fn config(dir: &Path, data: &str, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        r#"
[run]
dir = "{run}"
seed = 11
steps = 20
[data]
root = "{data}"
decode_threads = 1
prefetch_blocks = 2
shuffle_window_blocks = 2
[model]
preset = "custom"
embed_dim = 32
image_size = 16
patch_size = 4
vision_width = 32
vision_layers = 1
vision_heads = 2
context_length = 16
text_width = 32
text_layers = 1
text_heads = 2
decoder_width = 16
decoder_layers = 1
decoder_heads = 2
[objectives]
contrastive = 1.0
mlm = 0.3
mae = 0.3
patch_dropout = 0.25
[optim]
global_batch = 16
lr = 2e-3
warmup_steps = 2
[checkpoint]
every_steps = 2
keep = 2
{extra}
"#,
        run = dir.join(name).display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    worker().args(args).output().expect("run ferroclip-worker")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `step N loss X ...` lines → {N: X}.
fn losses(stdout: &str) -> BTreeMap<u64, f64> {
    stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["step", n, "loss", x, ..] => Some((n.parse().ok()?, x.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("COMMIT").is_file())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn train_checkpoints_evaluates_and_resumes_exactly_after_sigkill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());

    // The uninterrupted run, with eval every 5 steps.
    let cfg_a = config(tmp.path(), &data, "a", "[eval]\nevery_steps = 5\n");
    let out = run(&["train", "--config", cfg_a.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let full = losses(&stdout);
    assert_eq!(
        full.keys().copied().collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>(),
        "{stdout}"
    );
    assert!(full.values().all(|l| l.is_finite() && *l > 0.0), "{full:?}");
    let evals: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("eval step"))
        .collect();
    assert_eq!(evals.len(), 4, "eval every 5 steps: {stdout}");
    assert!(evals[3].starts_with("eval step 20 samples "), "{stdout}");
    assert!(stdout.contains("waiting for data"), "{stdout}");
    // keep = 2: the newest two of the checkpoints at 2, 4, …, 20.
    assert_eq!(checkpoint_steps(&tmp.path().join("a")), vec![18, 20]);

    // The same run, SIGKILLed once step 5 is printed (checkpoint 4 is committed by then; the
    // process may be a step or two further when the signal lands).
    let cfg_b = config(tmp.path(), &data, "b", "");
    let mut child = worker()
        .args(["train", "--config", cfg_b.to_str().expect("utf8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut before = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read");
        before.push_str(&line);
        before.push('\n');
        if line.starts_with("step 5 ") {
            break;
        }
        assert!(Instant::now() < deadline, "no step 5 yet: {before}");
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let first = losses(&before);
    assert!(first.contains_key(&5), "{before}");
    let committed = checkpoint_steps(&tmp.path().join("b"));
    let resumed_from = *committed.last().expect("a committed checkpoint");
    assert!(
        (4..=14).contains(&resumed_from),
        "checkpoints {committed:?}"
    );

    // Without --resume the run refuses to overwrite its checkpoints.
    let out = run(&["train", "--config", cfg_b.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--resume"), "{}", text(&out));

    let out = run(&[
        "train",
        "--config",
        cfg_b.to_str().expect("utf8"),
        "--resume",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let after = losses(&String::from_utf8_lossy(&out.stdout));
    let want: Vec<u64> = (resumed_from + 1..=20).collect();
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), want);
    assert!(want.len() >= 5);
    for (s, l) in &after {
        assert!(
            (l - full[s]).abs() < 1e-5,
            "step {s}: resumed {l} vs uninterrupted {}\nfull {full:?}\nresumed {after:?}",
            full[s]
        );
    }
    // The steps before the kill matched too (same seed, same data order).
    for (s, l) in &first {
        assert!((l - full[s]).abs() < 1e-5, "step {s}: {l} vs {}", full[s]);
    }
}

#[test]
fn stop_after_then_resume_equals_one_run_and_bad_configs_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());
    let cfg_a = config(tmp.path(), &data, "a", "");
    let out = run(&["train", "--config", cfg_a.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out));
    let full = losses(&String::from_utf8_lossy(&out.stdout));

    let cfg_b = config(tmp.path(), &data, "b", "");
    let b = cfg_b.to_str().expect("utf8");
    let out = run(&["train", "--config", b, "--stop-after", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    let part1 = losses(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(part1.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    // The last step of a stopped run is checkpointed even off the every_steps grid.
    assert_eq!(checkpoint_steps(&tmp.path().join("b")), vec![2, 3]);
    let out = run(&["train", "--config", b, "--resume"]);
    assert!(out.status.success(), "{}", text(&out));
    let part2 = losses(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        part2.keys().copied().collect::<Vec<_>>(),
        (4..=20).collect::<Vec<_>>()
    );
    for (s, l) in part1.iter().chain(part2.iter()) {
        assert!((l - full[s]).abs() < 1e-5, "step {s}: {l} vs {}", full[s]);
    }

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[optim]\nglobal_bach = 3\n").expect("write");
    let out = run(&["train", "--config", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("global_bach"), "{}", text(&out));
}
