//! ITM end to end on the synthetic shapes dataset: `ferroclip-worker train` with
//! `objectives.itm` on a fusion encoder, its checkpoint saved and loaded with the `fusion.` and
//! `itm_head.` tensors, then `eval --itm-rerank K` reporting recall before and after re-ranking.
//! Whether re-ranking improves recall needs a longer training than a test: `bench/itm.sh`
//! measures it (`bench/README-itm.md`); here only what re-ranking must do whatever the weights.

use std::path::Path;
use std::process::Command;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    shards: ferroclip_shards::cli::ShardsArgs,
}

fn synth(out: &str) {
    let args = [
        "shards",
        "synth",
        "--out",
        out,
        "--rows",
        "160",
        "--image-size",
        "16",
        "--val-fraction",
        "0.3",
        "--rows-per-row-group",
        "32",
        "--threads",
        "1",
        "--no-progress",
    ];
    let cli = Cli::parse_from(args);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(ferroclip_shards::cli::run(cli.shards))
        .expect("shards synth");
}

fn train(dir: &Path, data: &str) -> std::path::PathBuf {
    let run_dir = dir.join("run");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
dir = "{run}"
steps = 3
[data]
root = "{data}"
decode_threads = 1
[model]
preset = "custom"
embed_dim = 16
image_size = 16
patch_size = 8
vision_width = 16
vision_layers = 1
vision_heads = 2
context_length = 16
text_width = 16
text_layers = 1
text_heads = 2
fusion_layers = 1
[objectives]
contrastive = 1.0
itm = 1.0
[optim]
global_batch = 16
[checkpoint]
every_steps = 3
"#,
            run = run_dir.display()
        ),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .args(["train", "--config", cfg.to_str().expect("utf8")])
        .env("RUST_LOG", "warn")
        .output()
        .expect("train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_dir.join("checkpoints")
}

fn eval(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .arg("eval")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("eval");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn recalls(v: &serde_json::Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).expect("three recalls")
}

#[test]
fn itm_trains_and_reranking_reports_recall_before_and_after() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data").display().to_string();
    synth(&data);
    let checkpoints = train(tmp.path(), &data);
    let ckpt = checkpoints.display().to_string();
    let base = [
        "--data",
        data.as_str(),
        "--split",
        "val",
        "--checkpoint",
        &ckpt,
    ];
    let json = eval(&[&base[..], &["--json", "--itm-rerank", "5"]].concat());
    let report: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    let rr = &report["itm_rerank"];
    assert_eq!(rr["k"], 5, "{report}");
    for way in ["image_to_text", "text_to_image"] {
        let (before, after) = (recalls(&report[way]), recalls(&rr[way]));
        assert_eq!(after.len(), 3, "{report}");
        assert!(after.iter().all(|r| (0.0..=1.0).contains(r)), "{report}");
        // Re-ranking reorders each query's top 5 only: what is within 5 (and 10) stays.
        assert_eq!(before[1], after[1], "{way} R@5 changed: {report}");
        assert_eq!(before[2], after[2], "{way} R@10 changed: {report}");
        // The R@1 change is the fixed queries less the broken ones, over the queries.
        let queries = if way == "image_to_text" {
            report["images"].as_f64()
        } else {
            report["samples"].as_f64()
        }
        .expect("counts");
        let c = &rr[format!("{way}_changes")];
        let (fixed, broken, p) = (
            c["fixed"].as_f64().expect("fixed"),
            c["broken"].as_f64().expect("broken"),
            c["p"].as_f64().expect("p"),
        );
        let moved = after[0] - before[0];
        assert!(
            (moved - (fixed - broken) / queries).abs() < 1e-9,
            "{way}: {report}"
        );
        assert!(p > 0.0 && p <= 1.0, "{report}");
    }
    // Without the flag no re-ranking is reported; the text report names both figures.
    let plain: serde_json::Value =
        serde_json::from_str(eval(&[&base[..], &["--json"]].concat()).trim()).expect("json");
    assert!(plain["itm_rerank"].is_null(), "{plain}");
    assert_eq!(plain["image_to_text"], report["image_to_text"]);
    let text = eval(&[&base[..], &["--itm-rerank", "5"]].concat());
    assert!(text.contains("image→text retrieval: R@1"), "{text}");
    assert!(text.contains("top-1 changed by re-ranking"), "{text}");
    assert!(
        text.contains("image→text retrieval, ITM re-ranking of the top 5: R@1"),
        "{text}"
    );
    assert!(
        text.contains("text→image retrieval, ITM re-ranking of the top 5: R@1"),
        "{text}"
    );
}

#[test]
fn reranking_a_model_without_fusion_encoder_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data").display().to_string();
    synth(&data);
    // A one-step checkpoint of a model without fusion encoder.
    let run_dir = tmp.path().join("run");
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\ndir = \"{}\"\nsteps = 1\n[data]\nroot = \"{data}\"\ndecode_threads = 1\n[model]\npreset = \"custom\"\nembed_dim = 16\nimage_size = 16\npatch_size = 8\nvision_width = 16\nvision_layers = 1\nvision_heads = 2\ncontext_length = 16\ntext_width = 16\ntext_layers = 1\ntext_heads = 2\n[optim]\nglobal_batch = 16\n",
            run_dir.display()
        ),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .args(["train", "--config", cfg.to_str().expect("utf8")])
        .env("RUST_LOG", "warn")
        .output()
        .expect("train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .args([
            "eval",
            "--split",
            "val",
            "--itm-rerank",
            "5",
            "--data",
            &data,
            "--checkpoint",
        ])
        .arg(run_dir.join("checkpoints"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("eval");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--itm-rerank") && err.contains("fusion"),
        "{err}"
    );
}
