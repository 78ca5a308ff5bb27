//! `ferroclip-worker eval --json` on a Karpathy-format dataset with 5 captions per image (built by
//! `shards build --format karpathy`): retrieval is grouped by image (each image encoded once, an
//! image→text hit when any of its captions ranks within k), and the JSON report says so.

use std::path::Path;
use std::process::Command;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    shards: ferroclip_shards::cli::ShardsArgs,
}

fn shards(args: &[&str]) {
    let cli = Cli::parse_from(std::iter::once("shards").chain(args.iter().copied()));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(ferroclip_shards::cli::run(cli.shards))
        .expect("shards build");
}

/// 12 images of 16×16 with 5 captions each: 8 in `train`, 4 in `test`.
fn karpathy(dir: &Path) -> String {
    let imgs = dir.join("images");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    let mut images = Vec::new();
    for i in 0..12u32 {
        let rgb: Vec<u8> = (0..16 * 16 * 3)
            .map(|p| (p as u32 * (i + 3) * 7 % 251) as u8)
            .collect();
        let jpeg = ferroclip_shards::jpeg::encode(&rgb, 16, 16, 90).expect("encode");
        std::fs::write(imgs.join(format!("{i}.jpg")), jpeg).expect("write");
        let sentences: Vec<_> = (0..5)
            .map(|s| serde_json::json!({ "raw": format!("picture {i} caption {s}") }))
            .collect();
        let split = if i < 8 { "train" } else { "test" };
        images.push(serde_json::json!({
            "filename": format!("{i}.jpg"), "imgid": i, "split": split, "sentences": sentences,
        }));
    }
    let ann = dir.join("dataset_flickr30k.json");
    std::fs::write(&ann, serde_json::json!({ "images": images }).to_string()).expect("write");
    let out = dir.join("data").display().to_string();
    shards(&[
        "build",
        "--format",
        "karpathy",
        "--annotations",
        &ann.display().to_string(),
        "--images",
        &imgs.display().to_string(),
        "--out",
        &out,
        "--rows-per-row-group",
        "10",
        "--no-progress",
    ]);
    out
}

#[test]
fn eval_groups_retrieval_by_image_and_prints_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = karpathy(tmp.path());
    let run_dir = tmp.path().join("run");
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
dir = "{run}"
steps = 2
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
context_length = 12
text_width = 16
text_layers = 1
text_heads = 2
[optim]
global_batch = 8
[checkpoint]
every_steps = 2
"#,
            run = run_dir.display()
        ),
    )
    .expect("config");
    let worker = env!("CARGO_BIN_EXE_ferroclip-worker");
    let out = Command::new(worker)
        .args(["train", "--config", cfg.to_str().expect("utf8")])
        .env("RUST_LOG", "warn")
        .output()
        .expect("train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(worker)
        .args([
            "eval",
            "--json",
            "--split",
            "test",
            "--data",
            &data,
            "--checkpoint",
        ])
        .arg(run_dir.join("checkpoints"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("eval");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["samples"], 20, "{report}");
    assert_eq!(report["images"], 4, "each image once: {report}");
    assert_eq!(report["split"], "test");
    for way in ["image_to_text", "text_to_image"] {
        let r: Vec<f64> = serde_json::from_value(report[way].clone()).expect("recalls");
        assert_eq!(r.len(), 3);
        assert!(r.windows(2).all(|w| w[0] <= w[1]), "{way} {r:?}");
        // 4 images: every image→text and text→image candidate list has its answer within 10.
        if way == "text_to_image" {
            assert_eq!(r[1], 1.0, "4 images: every caption's image is in the top 5");
        }
    }
}
