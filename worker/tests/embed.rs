//! `ferroclip-worker embed` as a real process: the val split's images and the class prompts of
//! a trained checkpoint, as .parquet and .npy. Shapes, unit norms, and agreement with the
//! Trainer's own model features on the same inputs.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, FixedSizeListArray, Float32Array, StringArray};
use clap::Parser;
use common::{embed, ok, read_npy};
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::StoreOptions;
use ferroclip_worker::checkpoint::{self, TrainerState};
use ferroclip_worker::collective::Single;
use ferroclip_worker::data::{ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};
use ferroclip_worker::train::Trainer;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tch::Tensor;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    shards: ferroclip_shards::cli::ShardsArgs,
}

fn synth(dir: &Path) -> String {
    let out = dir.join("data").display().to_string();
    let cli = Cli::parse_from([
        "shards",
        "synth",
        "--out",
        &out,
        "--rows",
        "100",
        "--seed",
        "9",
        "--image-size",
        "16",
        "--rows-per-row-group",
        "10",
        "--val-fraction",
        "0.2",
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

fn config(data: &str) -> RunConfig {
    let mut c = RunConfig::default();
    c.data.root = Some(data.to_string());
    let m = &mut c.model;
    m.preset = "custom".into();
    (m.embed_dim, m.image_size, m.patch_size) = (Some(32), Some(16), Some(4));
    (m.vision_width, m.vision_layers, m.vision_heads) = (Some(32), Some(1), Some(2));
    m.context_length = Some(16);
    (m.text_width, m.text_layers, m.text_heads) = (Some(32), Some(1), Some(2));
    c.optim.lr = 3e-3;
    c.optim.warmup_steps = 1;
    c
}

fn loader(data: &str, split: &str, transform: ImageTransform) -> Loader {
    Loader::open(
        data,
        &StoreOptions::default(),
        split,
        transform,
        Arc::new(Tokenizer::clip(16).expect("tokenizer")),
        &LoaderOptions::default(),
    )
    .expect("loader")
}

fn all_refs(l: &Loader) -> Vec<SampleRef> {
    l.block_rows()
        .iter()
        .enumerate()
        .flat_map(|(b, &rows)| (0..rows).map(move |row| SampleRef::at(b as u32, row)))
        .collect()
}

/// (ids, dim, values) of an embed Parquet file.
fn read_parquet(path: &Path, id_column: &str) -> (Vec<String>, usize, Vec<f32>) {
    let file = std::fs::File::open(path).expect("open parquet");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let (mut ids, mut dim, mut values) = (Vec::new(), 0, Vec::new());
    for batch in reader {
        let batch = batch.expect("batch");
        let id = batch
            .column_by_name(id_column)
            .expect("id column")
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("strings");
        ids.extend(id.iter().map(|s| s.unwrap_or_default().to_string()));
        let emb = batch
            .column_by_name("embedding")
            .expect("embedding column")
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .expect("fixed-size list");
        dim = emb.value_length() as usize;
        let v = emb
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .expect("f32");
        values.extend(v.values().iter().copied());
    }
    (ids, dim, values)
}

fn check_rows(values: &[f32], dim: usize, reference: &Tensor, what: &str) {
    let reference = Vec::<f32>::try_from(reference.contiguous().view([-1])).expect("floats");
    assert_eq!(values.len(), reference.len(), "{what}: sizes");
    for (r, row) in values.chunks(dim).enumerate() {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{what} row {r}: norm {norm}");
    }
    let worst = values
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{what}: max |embed - Trainer| = {worst}");
}

#[test]
fn embed_images_and_texts_match_the_trainers_features() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());
    let cfg = config(&data);

    // A checkpoint that is not the init: two steps on training batches.
    let mut tr = Trainer::new(&cfg, 10).expect("trainer");
    let train = loader(&data, "train", ImageTransform::train(16, 0));
    let refs = all_refs(&train);
    for chunk in refs.chunks(16).take(2) {
        let b = train.load(chunk).expect("batch");
        tr.compute_grads(&b, chunk.len(), &mut Single)
            .expect("grads");
        tr.apply_update().expect("update");
    }
    let root = tmp.path().join("ckpt").display().to_string();
    let state = TrainerState {
        step: tr.step(),
        epoch: 0,
        seed: 0,
        model: tr.model.config.clone(),
        config: cfg.to_toml(),
        data: None,
    };
    checkpoint::save(&root, &StoreOptions::default(), &tr, &state, 0).expect("save");

    // The Trainer's features on the val images (eval transform) and the class prompts.
    let val = loader(&data, "val", ImageTransform::eval(16));
    let val_refs = all_refs(&val);
    assert!(!val_refs.is_empty());
    let vb = val.load(&val_refs).expect("val batch");
    let classes = ferroclip_shards::synth::classes();
    let prompts: Vec<String> = classes
        .classes
        .iter()
        .flat_map(|c| classes.templates.iter().map(move |t| t.replace("{}", c)))
        .collect();
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tok = Tokenizer::clip(16).expect("tokenizer");
    let (img_ref, txt_ref) = tch::no_grad(|| {
        (
            tr.model.image_features(&vb.images, None),
            tr.model.text_features(&tok.encode_batch(&prompt_refs)),
        )
    });
    let prompts_file = tmp.path().join("prompts.txt");
    std::fs::write(&prompts_file, prompts.join("\n") + "\n\n").expect("write prompts");

    // Images → Parquet and .npy, from the checkpoint directory (newest checkpoint).
    let img_pq = tmp.path().join("img.parquet");
    let img_npy = tmp.path().join("img.npy");
    for out in [&img_pq, &img_npy] {
        let o = embed(&[
            "--checkpoint",
            &root,
            "--images",
            &data,
            "--split",
            "val",
            "--batch",
            "7",
            "--out",
            out.to_str().expect("utf8"),
        ]);
        ok(&o);
    }
    let (keys, dim, values) = read_parquet(&img_pq, "key");
    assert_eq!(dim, 32);
    assert_eq!(keys, vb.keys, "one row per val image, in split order");
    check_rows(&values, dim, &img_ref, "image parquet");
    let (rows, dim2, values2) = read_npy(&img_npy);
    assert_eq!((rows, dim2), (vb.keys.len(), 32));
    assert_eq!(values, values2, "npy and parquet hold the same numbers");

    // Texts → .npy and Parquet, from the checkpoint itself.
    let ckpt = checkpoint::latest(&root, &StoreOptions::default())
        .expect("latest")
        .expect("one");
    let txt_npy = tmp.path().join("txt.npy");
    let txt_pq = tmp.path().join("txt.parquet");
    for out in [&txt_npy, &txt_pq] {
        let o = embed(&[
            "--checkpoint",
            &ckpt,
            "--texts",
            prompts_file.to_str().expect("utf8"),
            "--out",
            out.to_str().expect("utf8"),
        ]);
        ok(&o);
    }
    let (rows, dim, values) = read_npy(&txt_npy);
    assert_eq!((rows, dim), (prompts.len(), 32), "blank lines are skipped");
    check_rows(&values, dim, &txt_ref, "text npy");
    let (texts, _, values2) = read_parquet(&txt_pq, "text");
    assert_eq!(texts, prompts);
    assert_eq!(values, values2);
}

#[test]
fn embed_refuses_bad_outputs_and_missing_checkpoints() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = embed(&[
        "--checkpoint",
        tmp.path().to_str().expect("utf8"),
        "--texts",
        "/dev/null",
        "--out",
        "x.csv",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(".npy or .parquet"));
    let o = embed(&[
        "--checkpoint",
        tmp.path().to_str().expect("utf8"),
        "--texts",
        "/dev/null",
        "--out",
        "x.npy",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("committed checkpoint"), "{err}");
    let o = embed(&["--checkpoint", "x", "--out", "x.npy"]);
    assert!(!o.status.success(), "--images or --texts is required");
}
