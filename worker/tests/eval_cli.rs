//! `ferroclip-worker eval --json` on datasets as users have them: a Karpathy-format dataset with 5
//! captions per image (retrieval grouped by image: each image encoded once, an image→text hit when
//! any of its captions ranks within k), and an integer label column with the class list from
//! `eval.classes` or `--classes` (a label outside the list is counted and reported).

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

/// Trains the tiny model 2 steps on `data` (`extra` TOML appended); returns the checkpoints dir.
fn train(dir: &Path, data: &str, extra: &str) -> std::path::PathBuf {
    let run_dir = dir.join("run");
    let cfg = dir.join("run.toml");
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
{extra}
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

/// `ferroclip-worker eval --json ARGS --checkpoint CKPT`: the report.
fn eval(args: &[&str], checkpoint: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .args(["eval", "--json"])
        .args(args)
        .arg("--checkpoint")
        .arg(checkpoint)
        .env("RUST_LOG", "warn")
        .output()
        .expect("eval");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

#[test]
fn eval_groups_retrieval_by_image_and_prints_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = karpathy(tmp.path());
    let checkpoints = train(tmp.path(), &data, "");
    let report = eval(&["--split", "test", "--data", &data], &checkpoints);
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

/// 24 images of three kinds with an Int32 `label` column (0, 1, 2, and one 3: outside a list of
/// three classes), as img2dataset Parquet, built into shards.
fn labelled(dir: &Path) -> String {
    use arrow::array::{BinaryArray, Int32Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let n = 24u32;
    let label = |i: u32| if i == n - 1 { 3 } else { (i % 3) as i32 };
    let images: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let rgb: Vec<u8> = (0..16 * 16 * 3)
                .map(|p| ((p % 3 == label(i) as u32 % 3) as u32 * 200 + p * (i + 1) % 40) as u8)
                .collect();
            ferroclip_shards::jpeg::encode(&rgb, 16, 16, 90).expect("encode")
        })
        .collect();
    let batch = RecordBatch::try_from_iter([
        (
            "key",
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("k{i:03}")),
            )) as arrow::array::ArrayRef,
        ),
        (
            "jpg",
            Arc::new(BinaryArray::from_iter_values(
                images.iter().map(Vec::as_slice),
            )),
        ),
        (
            "caption",
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("a thing of kind {}", label(i))),
            )),
        ),
        (
            "label",
            Arc::new(Int32Array::from_iter_values((0..n).map(label))),
        ),
    ])
    .expect("batch");
    let src = dir.join("raw.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&src).expect("create"),
        batch.schema(),
        None,
    )
    .expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
    let out = dir.join("data").display().to_string();
    shards(&[
        "build",
        &src.display().to_string(),
        "--out",
        &out,
        "--no-progress",
    ]);
    out
}

#[test]
fn zero_shot_reads_integer_labels_with_eval_classes_or_the_classes_flag() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = labelled(tmp.path());
    let three = tmp.path().join("three.json");
    std::fs::write(
        &three,
        r#"{"classes": ["red", "green", "blue"], "templates": ["a {} thing", "{}"]}"#,
    )
    .expect("write");
    let extra = format!("[eval]\nclasses = \"{}\"\n", three.display());
    let checkpoints = train(tmp.path(), &data, &extra);
    // The run's eval.classes (in the checkpoint's config): label 3 names no class.
    let r = eval(&["--split", "train", "--data", &data], &checkpoints);
    assert_eq!(r["classes"], 3, "{r}");
    assert_eq!(r["labelled"], 23, "{r}");
    assert_eq!(r["bad_labels"], 1, "{r}");
    assert_eq!(r["bad_label_examples"], serde_json::json!(["3"]), "{r}");
    let top1 = r["zeroshot_top1"].as_f64().expect("top1");
    assert!((0.0..=1.0).contains(&top1), "{r}");
    assert_eq!(
        r["zeroshot_top5"], 1.0,
        "3 classes: every label is in the top 5"
    );
    // --classes wins over eval.classes: with four classes every label is one.
    let four = tmp.path().join("four.json");
    std::fs::write(
        &four,
        r#"{"classes": ["red", "green", "blue", "grey"], "templates": ["{}"]}"#,
    )
    .expect("write");
    let r = eval(
        &[
            "--split",
            "train",
            "--data",
            &data,
            "--classes",
            four.to_str().expect("utf8"),
        ],
        &checkpoints,
    );
    assert_eq!(
        (
            r["classes"].clone(),
            r["labelled"].clone(),
            r["bad_labels"].clone()
        ),
        (4.into(), 24.into(), 0.into()),
        "{r}"
    );
}
