//! Fuzz targets of the dataset files (`ferroclip-fuzz`: time-budgeted mutation of real inputs,
//! `FERROCLIP_FUZZ_SECS` each): `manifest.json`, `classes.json`, and a corrupt Parquet shard
//! through the block reader and `shards verify`. No input may panic, hang or ask for an
//! unbounded allocation; an invalid one is an error naming its file. Regression inputs live in
//! `tests/fuzz_corpus/<target>/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ferroclip_fuzz::{Fuzzer, LimitAlloc, JSON_DICT};
use ferroclip_shards::{Classes, Dataset, Manifest, StoreOptions};
use sha2::{Digest, Sha256};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ferroclip_shards::cli::ShardsArgs,
}

/// A small real dataset made by `shards synth`: 12 rows of 16×16 images, 4 rows a row group.
fn synth(dir: &Path) {
    let out = dir.to_str().unwrap();
    let cli = Cli::parse_from([
        "shards",
        "synth",
        "--out",
        out,
        "--rows",
        "12",
        "--image-size",
        "16",
        "--rows-per-row-group",
        "4",
    ]);
    rt().block_on(ferroclip_shards::cli::run(cli.args)).unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn opts() -> StoreOptions {
    StoreOptions {
        retry_budget: Duration::ZERO,
        ..StoreOptions::default()
    }
}

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

/// Opens the dataset and reads (at most) its first blocks of each split: what a worker does
/// with a manifest. Errors are fine; panics and aborts are findings.
fn open_and_read(rt: &tokio::runtime::Runtime, url: &str) -> Result<usize, String> {
    rt.block_on(async {
        let ds = Dataset::open(url, &opts())
            .await
            .map_err(|e| e.to_string())?;
        let mut rows = 0;
        for split in ds.manifest().splits.keys() {
            let blocks = ds.blocks(split).map_err(|e| e.to_string())?;
            for b in blocks.iter().take(4) {
                match ds.read_block(split, b.index).await {
                    Ok(s) => rows += s.len(),
                    Err(e) => {
                        let m = e.to_string();
                        assert!(!m.is_empty());
                    }
                }
            }
        }
        Ok(rows)
    })
}

#[test]
fn fuzz_manifest() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let path = dir.path().join("manifest.json");
    let seed = std::fs::read(&path).unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    let rt = rt();
    Fuzzer::new("manifest")
        .dict(JSON_DICT)
        .dict(&[
            b"\"row_groups\"",
            b"\"rows\"",
            b"\"bytes\"",
            b"\"shards\"",
            b"\"train\"",
        ])
        .corpus_dir(corpus("manifest"))
        .run(&[seed], |input| {
            if let Err(e) = Manifest::parse("x/manifest.json", input) {
                let m = e.to_string();
                assert!(m.contains("x/manifest.json"), "{m}");
            }
            std::fs::write(&path, input).unwrap();
            if let Err(m) = open_and_read(&rt, &url) {
                assert!(m.contains("manifest.json"), "{m}");
            }
        });
}

#[test]
fn fuzz_classes() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    let path = dir.path().join("classes.json");
    let seed = std::fs::read(&path).unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    let file = path.to_str().unwrap().to_string();
    let rt = rt();
    Fuzzer::new("classes")
        .dict(JSON_DICT)
        .dict(&[b"\"classes\"", b"\"templates\"", b"\"{}\""])
        .corpus_dir(corpus("classes"))
        .run(&[seed], |input| {
            std::fs::write(&path, input).unwrap();
            if let Err(e) = rt.block_on(Classes::load(&file, &opts())) {
                let m = e.to_string();
                assert!(m.contains("classes.json"), "{m}");
            }
            if let Err(e) = rt.block_on(Dataset::open(&url, &opts())) {
                let m = e.to_string();
                assert!(m.contains("classes.json"), "{m}");
            }
        });
}

/// The dataset's first shard, and the manifest rewritten so that its size (and, for verify,
/// its sha256) matches `bytes`: the corruption reaches the Parquet decoder instead of stopping
/// at the size check.
struct ShardFixture {
    dir: tempfile::TempDir,
    manifest: Manifest,
    shard: String,
}

impl ShardFixture {
    fn new() -> (Self, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path());
        let bytes = std::fs::read(dir.path().join("manifest.json")).unwrap();
        let manifest = Manifest::parse("manifest.json", &bytes).unwrap();
        let shard = manifest.splits["train"].shards[0].path.clone();
        let seed = std::fs::read(dir.path().join(&shard)).unwrap();
        (
            ShardFixture {
                dir,
                manifest,
                shard,
            },
            seed,
        )
    }

    fn install(&self, shard: &[u8]) {
        let mut m = self.manifest.clone();
        for s in m.splits.values_mut().flat_map(|s| s.shards.iter_mut()) {
            if s.path == self.shard {
                s.bytes = shard.len() as u64;
                s.sha256 = hex(&Sha256::digest(shard));
            }
        }
        std::fs::write(self.dir.path().join(&self.shard), shard).unwrap();
        std::fs::write(
            self.dir.path().join("manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
    }

    fn url(&self) -> String {
        self.dir.path().to_str().unwrap().to_string()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn fuzz_shard_reader() {
    let (fx, seed) = ShardFixture::new();
    let url = fx.url();
    let rt = rt();
    Fuzzer::new("shard_reader")
        .dict(&[b"PAR1"])
        .corpus_dir(corpus("shard"))
        .run(&[seed], |input| {
            fx.install(input);
            rt.block_on(async {
                let ds = Dataset::open(&url, &opts()).await.unwrap();
                for b in ds.blocks("train").unwrap() {
                    if b.shard != fx.shard {
                        continue;
                    }
                    if let Err(e) = ds.read_block("train", b.index).await {
                        let m = e.to_string();
                        assert!(m.contains(&fx.shard), "{m}");
                    }
                }
            })
        });
}

#[test]
fn fuzz_shards_verify() {
    let (fx, seed) = ShardFixture::new();
    let url = fx.url();
    let rt = rt();
    Fuzzer::new("shards_verify")
        .dict(&[b"PAR1"])
        .corpus_dir(corpus("shard"))
        .run(std::slice::from_ref(&seed), |input| {
            fx.install(input);
            let report = rt
                .block_on(ferroclip_shards::verify::verify(&url, &opts()))
                .unwrap();
            for bad in &report.bad {
                assert_eq!(bad.path, fx.shard);
                // verify decodes on a blocking task: a panic there would come back as an error.
                assert!(!bad.problem.starts_with("task "), "{}", bad.problem);
            }
            if input == seed.as_slice() {
                assert!(report.bad.is_empty(), "{:?}", report.bad);
            }
        });
}

/// A regression input of the shard corpus installed as the fixture's first shard: the errors
/// of reading every train block, and what `verify` says of the shard (exactly one bad shard,
/// the fixture's).
fn read_and_verify(input: &str) -> (Vec<String>, String) {
    let (fx, _) = ShardFixture::new();
    let bad = std::fs::read(corpus("shard").join(input)).unwrap();
    fx.install(&bad);
    let rt = rt();
    let url = fx.url();
    let errors: Vec<String> = rt.block_on(async {
        let ds = Dataset::open(&url, &opts()).await.unwrap();
        let mut errors = Vec::new();
        for b in ds.blocks("train").unwrap() {
            if let Err(e) = ds.read_block("train", b.index).await {
                errors.push(e.to_string());
            }
        }
        errors
    });
    for e in &errors {
        assert!(e.contains(&fx.shard), "{e}");
    }
    let report = rt
        .block_on(ferroclip_shards::verify::verify(&url, &opts()))
        .unwrap();
    assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
    assert_eq!(report.bad[0].path, fx.shard);
    (errors, report.bad[0].problem.clone())
}

/// Found by `fuzz_shard_reader` (and then `fuzz_shards_verify`): one byte, a dictionary page
/// header's value count set to 0, made the parquet crate divide by zero. Both readers now
/// name the shard and call it corrupt.
#[test]
fn a_dictionary_page_of_zero_values_is_an_error_naming_the_shard() {
    let (errors, problem) = read_and_verify("dictionary-page-of-zero-values");
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(e.contains("corrupt"), "{e}");
    }
    assert!(problem.contains("corrupt"), "{problem}");
}

/// Found by `fuzz_shard_reader` (slow, not yet a hang): a deletion shifts a page header onto
/// bytes that read as an unknown field holding a list of ~2^31 booleans, which parquet 60.1
/// skips at no byte per element (39.7 s in a debug build). Both readers now walk the headers
/// first (`page_headers`): this one gives a field the crate knows another Thrift type, where the
/// crate's reading parts from the bytes' own, and is rejected there, naming the shard.
#[test]
fn a_page_header_of_billions_of_booleans_is_an_error_naming_the_shard() {
    let (errors, problem) = read_and_verify("page-header-list-of-2g-booleans");
    assert!(
        errors.iter().any(|e| e.contains("page header")),
        "{errors:?}"
    );
    assert!(problem.contains("page header"), "{problem}");
}
