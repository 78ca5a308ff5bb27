//! Building, reading, inspecting and verifying datasets on the local file system, through the
//! library API and the real CLI binary.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use ferroclip_shards::{Dataset, Manifest, StoreOptions};

#[tokio::test]
async fn build_inspect_verify_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_rows("a", 30, 24);
    let b = good_rows("b", 25, 32);
    write_parquet(
        &tmp.path().join("in/part-0.parquet"),
        &a,
        "caption",
        false,
        7,
    );
    // The second file uses img2dataset's `txt` column: the fallback for the caption.
    write_parquet(&tmp.path().join("in/part-1.parquet"), &b, "txt", false, 10);
    let out = tmp.path().join("out");
    let mut o = opts(&out);
    o.val_fraction = 0.2;
    let m = build_from(&[&tmp.path().join("in")], &o).await.unwrap();

    assert_eq!(m.input_rows, 55);
    assert_eq!(m.total_rows(), 55);
    assert!(m.rejected.is_empty(), "{:?}", m.rejected);
    let (train, val) = (&m.splits["train"], &m.splits["val"]);
    assert!(
        val.rows > 0 && train.rows > val.rows,
        "train {} val {}",
        train.rows,
        val.rows
    );
    for s in train.shards.iter().chain(&val.shards) {
        assert!(
            s.rows <= 16 && s.row_groups.iter().all(|&r| r <= 5),
            "{s:?}"
        );
        assert_eq!(s.bytes, std::fs::metadata(out.join(&s.path)).unwrap().len());
    }
    assert_eq!(train.shards[0].path, "train/shard-00000.parquet");
    assert!(
        m.schema.iter().any(|c| c.name == "url"),
        "passthrough column kept: {:?}",
        m.schema
    );
    assert_eq!(m.stats.width.min, 24);
    assert_eq!(m.stats.width.max, 32);

    // Every input row comes back once, with its caption, size and image bytes.
    let url = out.to_str().unwrap();
    let mut got = all_samples(url, "train").await;
    got.extend(all_samples(url, "val").await);
    assert_eq!(got.len(), 55);
    let input: BTreeMap<String, Row> = a
        .iter()
        .chain(&b)
        .map(|r| (r.key.clone(), r.clone()))
        .collect();
    let mut seen = HashSet::new();
    for s in &got {
        assert!(seen.insert(s.key.clone()), "{} read twice", s.key);
        let r = &input[&s.key];
        assert_eq!(s.image.as_ref(), r.image.as_slice());
        assert_eq!(s.caption.as_bytes(), r.caption.as_slice());
        assert_eq!(s.width, if s.key.starts_with('a') { 24 } else { 32 });
    }

    let report = ferroclip_shards::verify::verify(url, &StoreOptions::default())
        .await
        .unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.rows, 55);

    let o = run_bin(&["inspect", url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("train") && s.contains("val") && s.contains("caption chars"),
        "{s}"
    );
    let o = run_bin(&["inspect", url, "--json"], &[]);
    let parsed: Manifest = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(parsed, m);
    let o = run_bin(&["verify", url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let thumbs = tmp.path().join("thumbs");
    let o = run_bin(
        &[
            "head",
            url,
            "-n",
            "3",
            "--thumbnails",
            thumbs.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("caption number"))
            .count(),
        3
    );
    assert_eq!(std::fs::read_dir(&thumbs).unwrap().count(), 3);
}

#[tokio::test]
async fn synth_blocks_cover_every_row_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("synth");
    let url = out.to_str().unwrap();
    let o = run_bin(
        &[
            "synth",
            "--out",
            url,
            "--rows",
            "600",
            "--seed",
            "3",
            "--image-size",
            "32",
            "--rows-per-shard",
            "100",
            "--rows-per-row-group",
            "16",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let ds = Dataset::open(url, &StoreOptions::default()).await.unwrap();
    let classes = ds.classes().expect("classes.json").clone();
    assert_eq!(classes.classes.len(), 12);
    let m = ds.manifest();
    assert_eq!(m.total_rows(), 600);
    // Blocks are numbered 0.. over shards in manifest order, then row groups.
    let blocks = ds.blocks("train").unwrap();
    assert!(blocks.len() > 30);
    let mut expected = Vec::new();
    for s in &m.splits["train"].shards {
        for (rg, &rows) in s.row_groups.iter().enumerate() {
            expected.push((s.path.clone(), rg as u32, rows as u32));
        }
    }
    let listed: Vec<_> = blocks
        .iter()
        .map(|b| (b.shard.clone(), b.row_group, b.rows))
        .collect();
    assert_eq!(listed, expected);
    assert!(blocks
        .iter()
        .enumerate()
        .all(|(i, b)| b.index as usize == i));

    // Read every block of both splits concurrently, as the worker's prefetcher does.
    let mut tasks = Vec::new();
    for split in ["train", "val"] {
        for b in ds.blocks(split).unwrap() {
            let ds = ds.clone();
            tasks.push(tokio::spawn(async move {
                ds.read_block(split, b.index).await.unwrap()
            }));
        }
    }
    let mut keys = HashSet::new();
    for t in tasks {
        for s in t.await.unwrap() {
            let Some(ferroclip_shards::Label::Name(label)) = s.label.clone() else {
                panic!("synth rows have class-name labels: {:?}", s.label);
            };
            assert!(classes.classes.contains(&label));
            assert!(s.caption.contains(&label), "{} / {label}", s.caption);
            assert_eq!((s.width, s.height), (32, 32));
            assert!(keys.insert(s.key), "a row was read twice");
        }
    }
    assert_eq!(keys.len(), 600);
    let err = ds
        .read_block("train", blocks.len() as u32)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let err = ds.blocks("test").unwrap_err().to_string();
    assert!(err.contains("unknown split"), "{err}");
}
#[tokio::test]
async fn resize_downscales_and_reencodes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = good_rows("r", 4, 64);
    rows.push(Row {
        key: "small".into(),
        image: jpeg(20, 30, 5),
        caption: b"a small one".to_vec(),
    });
    rows.push(Row {
        key: "wide".into(),
        image: jpeg(96, 48, 6),
        caption: b"a wide one".to_vec(),
    });
    write_parquet(&tmp.path().join("in.parquet"), &rows, "caption", false, 100);
    let out = tmp.path().join("out");
    let mut o = opts(&out);
    o.validate.resize = Some(32);
    o.validate.min_size = 24;
    let m = build_from(&[&tmp.path().join("in.parquet")], &o)
        .await
        .unwrap();
    assert_eq!(m.rejected.get("image_too_small"), Some(&1));
    let got = all_samples(out.to_str().unwrap(), "train").await;
    assert_eq!(got.len(), 5);
    for s in got {
        let img = image::load_from_memory(&s.image).unwrap();
        assert_eq!((img.width(), img.height()), (s.width, s.height));
        let expect = if s.key == "wide" { (64, 32) } else { (32, 32) };
        assert_eq!((s.width, s.height), expect, "{}", s.key);
    }
}

#[tokio::test]
async fn folder_of_images_with_csv_or_jsonl_captions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..5 {
        std::fs::write(dir.join(format!("sub/{i}.jpg")), jpeg(16, 16, i)).unwrap();
    }
    let csv = "path,caption\nsub/0.jpg,\"a cat, sitting\"\nsub/1.jpg,a dog\nsub/2.jpg,\nsub/missing.jpg,ghost\nsub/3.jpg,a bird\n";
    std::fs::write(dir.join("captions.csv"), csv).unwrap();
    let out = tmp.path().join("out");
    let o = run_bin(
        &[
            "build",
            dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rows-per-shard",
            "2",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = Dataset::open(out.to_str().unwrap(), &StoreOptions::default())
        .await
        .unwrap()
        .manifest()
        .clone();
    assert_eq!(m.total_rows(), 3);
    assert_eq!(m.rejected.get("caption_empty"), Some(&1));
    assert_eq!(m.rejected.get("image_missing"), Some(&1));
    let got = all_samples(out.to_str().unwrap(), "train").await;
    assert_eq!(got[0].key, "sub/0");
    assert_eq!(got[0].caption, "a cat, sitting");

    let jsonl = tmp.path().join("caps.jsonl");
    std::fs::write(
        &jsonl,
        "{\"path\": \"sub/4.jpg\", \"caption\": \"a fish\", \"key\": \"k4\"}\n",
    )
    .unwrap();
    let out2 = tmp.path().join("out2");
    let o = run_bin(
        &[
            "build",
            dir.to_str().unwrap(),
            "--captions",
            jsonl.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let got = all_samples(out2.to_str().unwrap(), "train").await;
    assert_eq!(
        (got[0].key.as_str(), got[0].caption.as_str()),
        ("k4", "a fish")
    );
}

#[tokio::test]
async fn verify_names_a_damaged_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let url = out.to_str().unwrap();
    let o = run_bin(
        &[
            "synth",
            "--out",
            url,
            "--rows",
            "100",
            "--image-size",
            "16",
            "--rows-per-shard",
            "30",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let victim = out.join("train/shard-00001.parquet");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0xFF;
    std::fs::write(&victim, bytes).unwrap();
    let o = run_bin(&["verify", url], &[]);
    assert!(!o.status.success());
    let s = text(&o);
    assert!(
        s.contains("BAD train/shard-00001.parquet") && s.contains("sha256"),
        "{s}"
    );
    assert!(!s.contains("shard-00000.parquet:"), "{s}");
}

#[tokio::test]
async fn rerunning_a_finished_build_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let args = [
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--rows",
        "50",
        "--image-size",
        "16",
    ];
    assert!(run_bin(&args, &[]).status.success());
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let o = run_bin(&args, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already built"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
}
