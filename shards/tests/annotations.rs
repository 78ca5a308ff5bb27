//! `shards build --format coco|karpathy`: a captioning dataset's annotation file and its image
//! folder, built by the real binary. Every caption of an image is a row (5 per image, as COCO and
//! Flickr30K have), rows of one image share an `image_id`, the file's splits are the shards'
//! splits, and only a repeated (image, caption) pair is dropped as a duplicate.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{Array, Int64Array, StringArray};
use common::*;
use ferroclip_shards::Manifest;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// (key, caption, image_id) of every row of a split, read from its shards.
fn rows_of(out: &Path, m: &Manifest, split: &str) -> Vec<(String, String, i64)> {
    let mut rows = Vec::new();
    for shard in &m.splits[split].shards {
        let file = std::fs::File::open(out.join(&shard.path)).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let b = batch.unwrap();
            let col = |name: &str| b.column_by_name(name).unwrap().clone();
            let (keys, caps, ids) = (col("key"), col("caption"), col("image_id"));
            let keys = keys.as_any().downcast_ref::<StringArray>().unwrap();
            let caps = caps.as_any().downcast_ref::<StringArray>().unwrap();
            let ids = ids.as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                rows.push((
                    keys.value(i).to_string(),
                    caps.value(i).to_string(),
                    ids.value(i),
                ));
            }
        }
    }
    rows
}

fn manifest(out: &Path) -> Manifest {
    let text = std::fs::read(out.join("manifest.json")).unwrap();
    Manifest::parse("manifest.json", &text).unwrap()
}

/// Writes `n` distinct JPEGs `img-<i>.jpg` under `dir/sub`.
fn images(dir: &Path, sub: &str, n: u32, seed: u32) {
    std::fs::create_dir_all(dir.join(sub)).unwrap();
    for i in 0..n {
        std::fs::write(
            dir.join(sub).join(format!("img-{i}.jpg")),
            jpeg(16, 16, seed + i),
        )
        .unwrap();
    }
}

#[test]
fn coco_captions_keep_five_captions_per_image_grouped_by_image_id() {
    let tmp = tempfile::tempdir().unwrap();
    images(tmp.path(), "val2017", 3, 100);
    let mut annotations = Vec::new();
    for img in 0..3 {
        for c in 0..5 {
            annotations.push(serde_json::json!({
                "image_id": 1000 + img, "id": img * 10 + c,
                "caption": format!("caption {c} of image {img}"),
            }));
        }
    }
    // The same pair twice (a duplicate), and an empty caption (rejected, counted).
    annotations
        .push(serde_json::json!({"image_id": 1001, "id": 99, "caption": "caption 2 of image 1"}));
    annotations.push(serde_json::json!({"image_id": 1002, "id": 98, "caption": "  "}));
    let coco = serde_json::json!({
        "images": (0..3).map(|i| serde_json::json!({"id": 1000 + i, "file_name": format!("img-{i}.jpg")})).collect::<Vec<_>>(),
        "annotations": annotations,
    });
    let ann = tmp.path().join("captions_val2017.json");
    std::fs::write(&ann, serde_json::to_vec(&coco).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let o = run_bin(
        &[
            "build",
            "--format",
            "coco",
            "--annotations",
            ann.to_str().unwrap(),
            "--images",
            tmp.path().join("val2017").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = manifest(&out);
    assert_eq!(m.splits.keys().collect::<Vec<_>>(), ["val"]);
    assert_eq!(m.rejected.get("duplicate"), Some(&1));
    assert_eq!(m.rejected.get("caption_empty"), Some(&1));
    let rows = rows_of(&out, &m, "val");
    assert_eq!(rows.len(), 15);
    let mut by_image: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for (key, caption, id) in &rows {
        assert!(key.starts_with(&id.to_string()), "{key} of image {id}");
        by_image.entry(*id).or_default().insert(caption.clone());
    }
    for (n, (id, caps)) in by_image.iter().enumerate() {
        assert_eq!(*id, 1000 + n as i64);
        let want: BTreeSet<String> = (0..5)
            .map(|c| format!("caption {c} of image {n}"))
            .collect();
        assert_eq!(caps, &want);
    }
    // A dangling image id is a clear error naming the file and the field.
    std::fs::write(
        &ann,
        br#"{"images": [], "annotations": [{"image_id": 5, "caption": "x"}]}"#,
    )
    .unwrap();
    let o = run_bin(
        &[
            "build",
            "--format",
            "coco",
            "--annotations",
            ann.to_str().unwrap(),
            "--images",
            tmp.path().join("val2017").to_str().unwrap(),
            "--out",
            tmp.path().join("out2").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = text(&o);
    assert!(
        err.contains("captions_val2017.json") && err.contains("annotations[0].image_id 5"),
        "{err}"
    );
}

#[test]
fn karpathy_splits_become_the_shards_splits() {
    let tmp = tempfile::tempdir().unwrap();
    images(tmp.path(), "flickr", 6, 300);
    let splits = ["train", "train", "restval", "val", "test", "test"];
    let karpathy = serde_json::json!({
        "dataset": "flickr30k",
        "images": splits.iter().enumerate().map(|(i, split)| serde_json::json!({
            "filename": format!("img-{i}.jpg"), "imgid": i, "split": split,
            "sentences": (0..5).map(|s| serde_json::json!({"raw": format!("{split} image {i} says {s}"), "sentid": i * 5 + s})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let ann = tmp.path().join("dataset_flickr30k.json");
    std::fs::write(&ann, serde_json::to_vec(&karpathy).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let o = run_bin(
        &[
            "build",
            "--format",
            "karpathy",
            "--annotations",
            ann.to_str().unwrap(),
            "--images",
            tmp.path().join("flickr").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rows-per-row-group",
            "4",
            "--no-progress",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = manifest(&out);
    let names: Vec<&str> = m.splits.keys().map(String::as_str).collect();
    assert_eq!(names, ["restval", "test", "train", "val"]);
    for (split, images) in [("train", 2), ("restval", 1), ("val", 1), ("test", 2)] {
        let rows = rows_of(&out, &m, split);
        assert_eq!(rows.len(), images * 5, "{split}");
        let ids: BTreeSet<i64> = rows.iter().map(|r| r.2).collect();
        assert_eq!(ids.len(), images, "{split}");
        for (_, caption, id) in rows {
            assert!(
                caption.starts_with(&format!("{split} image {id} says")),
                "{caption}"
            );
        }
    }
    // Splits come from the file: --val-fraction would contradict it.
    let o = run_bin(
        &[
            "build",
            "--format",
            "karpathy",
            "--annotations",
            ann.to_str().unwrap(),
            "--images",
            tmp.path().join("flickr").to_str().unwrap(),
            "--out",
            tmp.path().join("out2").to_str().unwrap(),
            "--val-fraction",
            "0.1",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("--val-fraction"), "{}", text(&o));
}

#[test]
fn visual_genome_regions_caption_whole_images() {
    let tmp = tempfile::tempdir().unwrap();
    images(tmp.path(), "vg/VG_100K", 2, 500);
    // img-0 is image 10, img-1 is image 11; image 10's "sky" phrase appears twice (a duplicate).
    let regions = serde_json::json!([
        {"id": 10, "regions": [
            {"region_id": 1, "image_id": 10, "phrase": "sky"},
            {"region_id": 2, "image_id": 10, "phrase": "a red bus"},
            {"region_id": 3, "image_id": 10, "phrase": "sky"}]},
        {"id": 11, "regions": [{"region_id": 4, "image_id": 11, "phrase": "a dog"}]}
    ]);
    let data = serde_json::json!([
        {"image_id": 10, "url": "https://cs.example/rak248/VG_100K/img-0.jpg"},
        {"image_id": 11, "url": "https://cs.example/rak248/VG_100K/img-1.jpg"}
    ]);
    let (reg, dat) = (
        tmp.path().join("region_descriptions.json"),
        tmp.path().join("image_data.json"),
    );
    std::fs::write(&reg, regions.to_string()).unwrap();
    std::fs::write(&dat, data.to_string()).unwrap();
    let out = tmp.path().join("out");
    let o = run_bin(
        &[
            "build",
            "--format",
            "vg",
            "--annotations",
            reg.to_str().unwrap(),
            "--image-data",
            dat.to_str().unwrap(),
            "--images",
            tmp.path().join("vg").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let m = manifest(&out);
    assert_eq!(m.rejected.get("duplicate"), Some(&1));
    let mut rows = rows_of(&out, &m, "train");
    rows.sort();
    let got: Vec<(&str, &str, i64)> = rows
        .iter()
        .map(|(k, c, i)| (k.as_str(), c.as_str(), *i))
        .collect();
    assert_eq!(
        got,
        [
            ("10-1", "sky", 10),
            ("10-2", "a red bus", 10),
            ("11-4", "a dog", 11)
        ]
    );
}
