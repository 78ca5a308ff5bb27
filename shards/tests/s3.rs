//! The same paths against a real S3-compatible server (s3s-fs on 127.0.0.1, started per test).

mod common;

use std::collections::HashSet;
use std::sync::Once;
use std::time::{Duration, Instant};

use common::*;
use ferroclip_shards::build::{build, BuildOptions};
use ferroclip_shards::source::{ColumnNames, InputPlan};
use ferroclip_shards::writer::Sizing;
use ferroclip_shards::{open_url, Dataset, StoreOptions};
use object_store::{ObjectStoreExt, PutPayload};

/// All tests in this binary use the same credentials; set them once, before any client exists.
fn credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}

fn store_opts(s: &S3Server) -> StoreOptions {
    StoreOptions {
        s3_endpoint: Some(s.endpoint.clone()),
        allow_http: true,
        ..StoreOptions::default()
    }
}

#[tokio::test]
async fn s3_build_read_verify_round_trip() {
    credentials();
    let server = S3Server::start();
    let so = store_opts(&server);
    // Upload raw img2dataset-style Parquet to the bucket.
    let tmp = tempfile::tempdir().unwrap();
    let rows = good_rows("s", 40, 24);
    for (i, chunk) in rows.chunks(20).enumerate() {
        let p = tmp.path().join(format!("raw-{i}.parquet"));
        write_parquet(&p, chunk, "caption", false, 8);
        let (store, path) = open_url(&format!("s3://{BUCKET}/raw/part-{i}.parquet"), &so).unwrap();
        store
            .put(&path, PutPayload::from(std::fs::read(&p).unwrap()))
            .await
            .unwrap();
    }

    let src = format!("s3://{BUCKET}/raw/");
    let out = format!("s3://{BUCKET}/datasets/one");
    let plan = InputPlan::parquet(
        &[src],
        ColumnNames {
            image: "jpg".into(),
            text: None,
            key: None,
        },
        &so,
    )
    .await
    .unwrap();
    let mut o = BuildOptions::new(&out);
    o.store = so.clone();
    o.val_fraction = 0.25;
    o.rejects = Some(format!("s3://{BUCKET}/datasets/one-rejects.jsonl"));
    o.sizing = Sizing {
        rows_per_shard: Some(12),
        rows_per_row_group: Some(4),
        ..Sizing::default()
    };
    let m = build(plan, &o, vec![]).await.unwrap().manifest;
    assert_eq!(m.total_rows(), 40);

    let ds = Dataset::open(&out, &so).await.unwrap();
    let mut keys = HashSet::new();
    for split in ["train", "val"] {
        for b in ds.blocks(split).unwrap() {
            for s in ds.read_block(split, b.index).await.unwrap() {
                assert!(keys.insert(s.key));
            }
        }
    }
    assert_eq!(keys.len(), 40);
    let r = ferroclip_shards::verify::verify(&out, &so).await.unwrap();
    assert!(r.bad.is_empty() && r.rows == 40, "{r:?}");

    // The real CLI against the same server: synth (multipart uploads), inspect, verify.
    let env: Vec<(&str, String)> = server.env(SECRET_KEY);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ep = server.endpoint.as_str();
    let synth = format!("s3://{BUCKET}/synth");
    let out = run_bin(
        &[
            "synth",
            "--out",
            &synth,
            "--rows",
            "300",
            "--rows-per-shard",
            "100",
            "--s3-endpoint",
            ep,
            "--allow-http",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run_bin(
        &["verify", &synth, "--s3-endpoint", ep, "--allow-http"],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run_bin(
        &["inspect", &synth, "--s3-endpoint", ep, "--allow-http"],
        &env,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("train"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn s3_wrong_credential_is_a_clear_error() {
    credentials();
    let server = S3Server::start();
    let env = server.env("not-the-secret");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let src = format!("s3://{BUCKET}/raw/");
    let o = run_bin(
        &[
            "build",
            &src,
            "--out",
            "/tmp/never",
            "--s3-endpoint",
            &server.endpoint,
            "--allow-http",
        ],
        &env,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("access denied") && err.contains("s3://bucket/raw"),
        "{}",
        text(&o)
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn unreachable_endpoint_is_a_clear_error() {
    credentials();
    let port = free_port(); // nothing listens there
    let started = Instant::now();
    let o = run_bin(
        &[
            "inspect",
            "s3://bucket/ds",
            "--s3-endpoint",
            &format!("http://127.0.0.1:{port}"),
            "--allow-http",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unreachable") && err.contains("s3://bucket/ds/manifest.json"),
        "{}",
        text(&o)
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "gave up only after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn webdataset_tars_stream_from_s3() {
    credentials();
    let server = S3Server::start();
    let so = store_opts(&server);
    let rows = good_rows("wds", 12, 16);
    for (n, chunk) in rows.chunks(6).enumerate() {
        let mut tar = Vec::new();
        for r in chunk {
            tar.extend(tar_entry(&format!("{}.jpg", r.key), &r.image));
            tar.extend(tar_entry(&format!("{}.txt", r.key), &r.caption));
        }
        let (store, path) = open_url(&format!("s3://{BUCKET}/wds/{n:05}.tar"), &so).unwrap();
        store.put(&path, PutPayload::from(tar)).await.unwrap();
    }
    let out = format!("s3://{BUCKET}/datasets/wds");
    let plan = InputPlan::webdataset(
        &[format!("s3://{BUCKET}/wds/{{00000..00001}}.tar")],
        Default::default(),
        &so,
    )
    .await
    .unwrap();
    let mut opts = BuildOptions::new(&out);
    opts.store = so.clone();
    let report = build(plan, &opts, vec![]).await.unwrap();
    assert_eq!(report.manifest.total_rows(), 12);
    let ds = Dataset::open(&out, &so).await.unwrap();
    let mut keys = HashSet::new();
    for b in ds.blocks("train").unwrap() {
        for s in ds.read_block("train", b.index).await.unwrap() {
            keys.insert(s.key);
        }
    }
    let want: HashSet<String> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, want);
}
