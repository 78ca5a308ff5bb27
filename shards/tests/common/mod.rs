//! Test support: input data generators, the real CLI binary, and a real S3 server (s3s-fs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use ferroclip_shards::build::{build, BuildOptions};
use ferroclip_shards::source::{ColumnNames, InputPlan};
use ferroclip_shards::writer::Sizing;
use ferroclip_shards::{Dataset, Manifest, StoreOptions};
use parquet::arrow::ArrowWriter;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferroclip-shards");

/// A JPEG of w×h with a pattern derived from `seed` (distinct seeds → distinct bytes).
pub fn jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    // The low byte of the seed shifts the colours, the next one draws blocks, so seeds below
    // 65,536 give distinct images (the build drops equal images as duplicates).
    let (lo, hi) = (seed % 256, seed / 256 % 256);
    let rgb: Vec<u8> = (0..w * h * 3)
        .map(|i| {
            let (x, y, c) = (i / 3 % w, i / 3 / w, i % 3);
            (x * 3 + y * 5 + lo * 37 + c * 60 + hi * ((x / 16) * 7 + (y / 16) * 11)) as u8
        })
        .collect();
    ferroclip_shards::jpeg::encode(&rgb, w, h, 90).unwrap()
}

/// One input row for an img2dataset-style Parquet file.
#[derive(Clone)]
pub struct Row {
    pub key: String,
    pub image: Vec<u8>,
    pub caption: Vec<u8>,
}

pub fn good_rows(prefix: &str, n: usize, size: u32) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            key: format!("{prefix}{i:05}"),
            // Distinct prefixes give distinct images (equal images would be dropped as duplicates).
            image: jpeg(
                size,
                size,
                (i as u32) + prefix.bytes().map(u32::from).sum::<u32>() * 1000,
            ),
            caption: format!("caption number {i} of {prefix}").into_bytes(),
        })
        .collect()
}

/// Writes img2dataset-like Parquet: key, jpg, caption (utf8, or binary when `binary_caption`),
/// url (a passthrough column). `row_group` rows per row group.
pub fn write_parquet(
    path: &Path,
    rows: &[Row],
    text_col: &str,
    binary_caption: bool,
    row_group: usize,
) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let keys = StringArray::from_iter_values(rows.iter().map(|r| r.key.as_str()));
    let images = BinaryArray::from_iter_values(rows.iter().map(|r| r.image.as_slice()));
    let captions: ArrayRef = if binary_caption {
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.caption.as_slice()),
        ))
    } else {
        Arc::new(StringArray::from_iter_values(
            rows.iter()
                .map(|r| String::from_utf8(r.caption.clone()).unwrap()),
        ))
    };
    let urls = StringArray::from_iter_values(
        rows.iter()
            .map(|r| format!("http://example.com/{}.jpg", r.key)),
    );
    let batch = RecordBatch::try_from_iter([
        ("key", Arc::new(keys) as ArrayRef),
        ("jpg", Arc::new(images) as ArrayRef),
        (text_col, captions),
        ("url", Arc::new(urls) as ArrayRef),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

pub fn run_bin(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run ferroclip-shards")
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn free_port() -> u16 {
    ferroclip_proto::ports::spare_loopback_port().expect("free port")
}

pub const ACCESS_KEY: &str = "ferroclip-test";
pub const SECRET_KEY: &str = "ferroclip-secret";
pub const BUCKET: &str = "bucket";

/// A real S3-compatible server on 127.0.0.1 with one bucket, killed on drop.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn find_s3s_fs() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

impl S3Server {
    pub fn start() -> S3Server {
        let bin = find_s3s_fs()
            .expect("s3s-fs is not installed: run `scripts/setup-test-tools` (cargo install s3s-fs 0.14.1) first");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start listening on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// Environment for a client process with the given secret.
    pub fn env(&self, secret: &'static str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The image column of `write_parquet` files.
pub fn cols() -> ColumnNames {
    ColumnNames {
        image: "jpg".into(),
        text: None,
        key: None,
    }
}

pub fn opts(out: &std::path::Path) -> BuildOptions {
    let mut o = BuildOptions::new(out.to_str().unwrap());
    o.sizing = Sizing {
        rows_per_shard: Some(16),
        rows_per_row_group: Some(5),
        ..Sizing::default()
    };
    o
}

pub async fn build_from(
    srcs: &[&std::path::Path],
    o: &BuildOptions,
) -> Result<Manifest, ferroclip_shards::ShardsError> {
    let srcs: Vec<String> = srcs
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    let plan = InputPlan::parquet(&srcs, cols(), &StoreOptions::default()).await?;
    Ok(build(plan, o, vec![]).await?.manifest)
}

pub async fn all_samples(url: &str, split: &str) -> Vec<ferroclip_shards::Sample> {
    let ds = Dataset::open(url, &StoreOptions::default()).await.unwrap();
    let mut out = Vec::new();
    for b in ds.blocks(split).unwrap() {
        let rows = ds.read_block(split, b.index).await.unwrap();
        assert_eq!(rows.len() as u32, b.rows);
        out.extend(rows);
    }
    out
}

/// A ustar member: header block + data padded to 512 bytes.
pub fn tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}
