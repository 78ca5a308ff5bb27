//! Bad input while building shards: corrupt or truncated images, empty or non-UTF-8 captions,
//! duplicates, wrong schemas, truncated Parquet files, empty sources. Each is rejected with a
//! clear error or counted in the manifest and the rejects file, naming file, row and reason.

mod common;

use common::*;
use ferroclip_shards::Manifest;

/// Builds one good file plus one file holding a bad row; returns the manifest and rejects text.
async fn build_with_bad_row(bad: Row, binary_caption: bool) -> (Manifest, String) {
    let tmp = tempfile::tempdir().unwrap();
    write_parquet(
        &tmp.path().join("in/a.parquet"),
        &good_rows("g", 6, 16),
        "caption",
        binary_caption,
        100,
    );
    let mut rows = good_rows("h", 3, 16);
    rows.insert(1, bad);
    write_parquet(
        &tmp.path().join("in/b.parquet"),
        &rows,
        "caption",
        binary_caption,
        100,
    );
    let mut o = opts(&tmp.path().join("out"));
    let rejects = tmp.path().join("rejects.jsonl");
    o.rejects = Some(rejects.to_str().unwrap().to_string());
    let m = build_from(&[&tmp.path().join("in")], &o).await.unwrap();
    assert_eq!(m.input_rows, 10);
    assert_eq!(m.total_rows(), 9);
    (m, std::fs::read_to_string(rejects).unwrap())
}

fn bad_row(image: Vec<u8>, caption: &[u8]) -> Row {
    Row {
        key: "bad-row".into(),
        image,
        caption: caption.to_vec(),
    }
}

fn assert_rejected(m: &Manifest, rejects: &str, reason: &str) {
    assert_eq!(m.rejected.get(reason), Some(&1), "{:?}", m.rejected);
    assert_eq!(m.rejected.values().sum::<u64>(), 1);
    let line: serde_json::Value = serde_json::from_str(rejects.lines().next().unwrap()).unwrap();
    assert_eq!(line["key"], "bad-row");
    assert_eq!(line["reason"], reason);
    assert_eq!(line["row"], 1, "row number within its source file");
    assert!(
        line["source"].as_str().unwrap().ends_with("in/b.parquet"),
        "{line}"
    );
}

#[tokio::test]
async fn corrupt_jpeg_is_rejected_and_counted() {
    let mut img = jpeg(16, 16, 999);
    for b in img[4..120].iter_mut() {
        *b = 0x33;
    }
    let (m, rejects) = build_with_bad_row(bad_row(img, b"fine caption"), false).await;
    assert_rejected(&m, &rejects, "image_decode");
}

#[tokio::test]
async fn truncated_jpeg_is_rejected_and_counted() {
    let img = jpeg(16, 16, 999);
    let (m, rejects) = build_with_bad_row(
        bad_row(img[..img.len() / 2].to_vec(), b"fine caption"),
        false,
    )
    .await;
    assert_rejected(&m, &rejects, "image_decode");
}

#[tokio::test]
async fn empty_caption_is_rejected_and_counted() {
    let (m, rejects) = build_with_bad_row(bad_row(jpeg(16, 16, 999), b"   \n"), false).await;
    assert_rejected(&m, &rejects, "caption_empty");
}

#[tokio::test]
async fn non_utf8_caption_is_rejected_and_counted() {
    let (m, rejects) =
        build_with_bad_row(bad_row(jpeg(16, 16, 999), b"caf\xe9 au lait"), true).await;
    assert_rejected(&m, &rejects, "caption_not_utf8");
}

#[tokio::test]
async fn exact_duplicate_pairs_are_dropped_and_counted_but_an_images_other_captions_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = good_rows("d", 8, 16);
    // Row 2 again under another key: the same image and caption, a duplicate.
    let mut dup = rows[2].clone();
    dup.key = "copy-of-2".into();
    rows.push(dup);
    // Row 3's image with four more captions (as COCO and Flickr30K have): five pairs, all kept.
    for n in 0..4 {
        let mut other = rows[3].clone();
        other.key = format!("d00003-caption-{n}");
        other.caption = format!("another caption {n} of the same image").into_bytes();
        rows.push(other);
    }
    write_parquet(&tmp.path().join("in.parquet"), &rows, "caption", false, 100);
    let out = tmp.path().join("out");
    let m = build_from(&[&tmp.path().join("in.parquet")], &opts(&out))
        .await
        .unwrap();
    assert_eq!(m.rejected.get("duplicate"), Some(&1));
    assert_eq!(m.total_rows(), 12);
    let kept = all_samples(&out.to_string_lossy(), "train").await;
    assert_eq!(kept.len(), 12, "no validation split here");
    let image_3 = kept
        .iter()
        .filter(|s| s.image.as_ref() == rows[3].image.as_slice())
        .count();
    assert_eq!(image_3, 5, "every caption of image 3 is a sample");
}

#[tokio::test]
async fn missing_column_names_file_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.parquet");
    write_parquet(&input, &good_rows("m", 4, 16), "caption", false, 100);
    let o = run_bin(
        &[
            "build",
            input.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
            "--image-col",
            "image_bytes",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("in.parquet") && err.contains("missing column \"image_bytes\""),
        "{}",
        text(&o)
    );
    assert!(!err.contains("panicked"), "{err}");
    let o = run_bin(
        &[
            "build",
            input.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
            "--text-col",
            "alt",
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing column \"alt\""),
        "{}",
        text(&o)
    );
}

#[tokio::test]
async fn truncated_parquet_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in/t.parquet");
    write_parquet(&input, &good_rows("t", 10, 16), "caption", false, 100);
    let bytes = std::fs::read(&input).unwrap();
    std::fs::write(&input, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let o = run_bin(
        &[
            "build",
            input.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("t.parquet") && err.contains("unreadable Parquet"),
        "{}",
        text(&o)
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!tmp.path().join("out/manifest.json").exists());
}

#[tokio::test]
async fn empty_source_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run_bin(
        &[
            "build",
            empty.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no input rows") && err.contains("empty"),
        "{}",
        text(&o)
    );
    // A Parquet file with zero rows is an empty source too.
    write_parquet(&empty.join("zero.parquet"), &[], "caption", false, 10);
    let o = run_bin(
        &[
            "build",
            empty.to_str().unwrap(),
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("0 rows"),
        "{}",
        text(&o)
    );
}
