//! `shards build` on the layouts img2dataset writes: webdataset tar shards (a brace pattern, a
//! prefix) and the `files` layout. Both build to the same rows as the equivalent Parquet source;
//! bad samples (no caption, a corrupt JPEG) are rejected and counted; a truncated tar stops the
//! build naming the tar; the `.json` fields become typed columns.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use ferroclip_shards::Manifest;

/// A sample's members: (extension, bytes).
type Sample = (String, Vec<(&'static str, Vec<u8>)>);

/// The good rows as samples (jpg, txt, json) plus two bad ones: no caption, a corrupt JPEG.
fn samples(rows: &[Row]) -> Vec<Sample> {
    let mut out: Vec<Sample> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let json = serde_json::json!({
                "url": format!("http://example.com/{}.jpg", r.key),
                "similarity": 0.25 + i as f64,
                "n": i,
                "width": 16, // a fixed column's name: not passed through
            });
            (
                r.key.clone(),
                vec![
                    ("jpg", r.image.clone()),
                    ("txt", r.caption.clone()),
                    ("json", json.to_string().into_bytes()),
                ],
            )
        })
        .collect();
    out.insert(
        3,
        ("bad-nocap".into(), vec![("jpg", rows[0].image.clone())]),
    );
    let mut corrupt = rows[1].image.clone();
    corrupt.truncate(corrupt.len() / 2);
    out.insert(
        7,
        (
            "bad-jpeg".into(),
            vec![("jpg", corrupt), ("txt", b"broken".to_vec())],
        ),
    );
    out
}

fn write_tar(path: &Path, samples: &[Sample]) {
    let mut tar = Vec::new();
    for (key, members) in samples {
        for (ext, data) in members {
            tar.extend(tar_entry(&format!("{key}.{ext}"), data));
        }
    }
    tar.extend([0u8; 1024]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, tar).unwrap();
}

fn build(src: &str, out: &Path) -> std::process::Output {
    run_bin(
        &[
            "build",
            src,
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ],
        &[],
    )
}

fn manifest(out: &Path) -> Manifest {
    let text = std::fs::read(out.join("manifest.json")).unwrap();
    Manifest::parse("manifest.json", &text).unwrap()
}

/// (key, caption, image bytes) of every row.
async fn rows_of(out: &Path) -> BTreeSet<(String, String, Vec<u8>)> {
    all_samples(&out.to_string_lossy(), "train")
        .await
        .into_iter()
        .map(|s| (s.key, s.caption, s.image.to_vec()))
        .collect()
}

#[tokio::test]
async fn tars_and_the_files_layout_build_the_rows_of_the_equivalent_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let good = good_rows("w", 10, 16);
    let all = samples(&good);
    write_tar(&tmp.path().join("wds/00000.tar"), &all[..6]);
    write_tar(&tmp.path().join("wds/00001.tar"), &all[6..]);
    for (key, members) in &all {
        for (ext, data) in members {
            let p = tmp.path().join(format!("files/00000/{key}.{ext}"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
    }
    write_parquet(
        &tmp.path().join("pq/a.parquet"),
        &good,
        "caption",
        false,
        100,
    );
    let pq_out = tmp.path().join("out-pq");
    let o = build(tmp.path().join("pq").to_str().unwrap(), &pq_out);
    assert!(o.status.success(), "{}", text(&o));
    let want = rows_of(&pq_out).await;
    assert_eq!(want.len(), 10);

    let pattern = format!("{}/wds/{{00000..00001}}.tar", tmp.path().display());
    let prefix = tmp.path().join("wds").display().to_string();
    let files = tmp.path().join("files").display().to_string();
    for (name, src) in [
        ("brace pattern", &pattern),
        ("tar prefix", &prefix),
        ("files layout", &files),
    ] {
        let out = tmp.path().join(format!("out-{}", name.replace(' ', "-")));
        let o = build(src, &out);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert_eq!(rows_of(&out).await, want, "{name}");
        let m = manifest(&out);
        assert_eq!(
            m.rejected.get("caption_missing"),
            Some(&1),
            "{name}: {:?}",
            m.rejected
        );
        assert_eq!(
            m.rejected.get("image_decode"),
            Some(&1),
            "{name}: {:?}",
            m.rejected
        );
        assert_eq!(m.input_rows, 12, "{name}");
        // The .json fields as typed columns (a fixed column's name is not passed through).
        let columns: Vec<(&str, &str)> = m
            .schema
            .iter()
            .map(|c| (c.name.as_str(), c.data_type.as_str()))
            .collect();
        for col in [("n", "Int64"), ("similarity", "Float64"), ("url", "Utf8")] {
            assert!(columns.contains(&col), "{name}: {columns:?}");
        }
        assert_eq!(
            columns.iter().filter(|c| c.0 == "width").count(),
            1,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_truncated_tar_stops_the_build_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let all = samples(&good_rows("t", 8, 16));
    write_tar(&tmp.path().join("wds/00000.tar"), &all[..2]);
    let cut = tmp.path().join("wds/00001.tar");
    write_tar(&cut, &all[2..]);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2 + 100]).unwrap();
    let o = build(
        &format!("{}/wds/{{00000..00001}}.tar", tmp.path().display()),
        &tmp.path().join("out"),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("00001.tar") && err.contains("truncated tar"),
        "{}",
        text(&o)
    );
    assert!(
        !tmp.path().join("out/manifest.json").exists(),
        "no manifest for a failed build"
    );
}
