//! The loader on real shards (`shards synth` through the shards CLI, read over file://):
//! samples come back in the order asked with the right keys, captions and tokens; the prefetch
//! hint fetches in the background; the block cache stays within its byte budget; bad
//! references are clear errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ferroclip_shards::{Dataset, Sample, StoreOptions};
use ferroclip_worker::data::{ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    shards: ferroclip_shards::cli::ShardsArgs,
}

const ROWS: u64 = 40;
const ROWS_PER_BLOCK: u64 = 8;

/// A synth dataset of 40 rows in blocks of 8 (all in `train`).
fn synth(dir: &std::path::Path) -> String {
    let url = format!("file://{}", dir.display());
    let (rows, per_block) = (ROWS.to_string(), ROWS_PER_BLOCK.to_string());
    let cli = Cli::parse_from([
        "shards",
        "synth",
        "--out",
        &url,
        "--rows",
        &rows,
        "--image-size",
        "48",
        "--rows-per-row-group",
        &per_block,
        "--val-fraction",
        "0",
        "--no-progress",
        "--threads",
        "2",
    ]);
    runtime()
        .block_on(ferroclip_shards::cli::run(cli.shards))
        .unwrap();
    url
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// All samples of the split, read straight from the shards API, by block.
fn read_all(url: &str) -> Vec<Vec<Sample>> {
    runtime().block_on(async {
        let ds = Dataset::open(url, &StoreOptions::default()).await.unwrap();
        let mut out = Vec::new();
        for b in ds.blocks("train").unwrap() {
            out.push(ds.read_block("train", b.index).await.unwrap());
        }
        out
    })
}

fn loader(url: &str, options: LoaderOptions) -> Loader {
    let tok = Arc::new(Tokenizer::clip(77).unwrap());
    Loader::open(
        url,
        &StoreOptions::default(),
        "train",
        ImageTransform::train(32, 3),
        tok,
        &options,
    )
    .unwrap()
}

#[test]
fn samples_come_back_in_the_order_asked() {
    let dir = tempfile::tempdir().unwrap();
    let url = synth(dir.path());
    let blocks = read_all(&url);
    assert_eq!(blocks.len() as u64, ROWS / ROWS_PER_BLOCK);
    let l = loader(
        &url,
        LoaderOptions {
            threads: 2,
            prefetch_blocks: 2,
            cache_bytes: 64 << 20,
        },
    );
    assert_eq!(
        l.block_rows(),
        vec![ROWS_PER_BLOCK as u32; blocks.len()].as_slice()
    );

    // Across blocks, out of order, with a repeat.
    let refs: Vec<SampleRef> = [(3, 1), (0, 7), (4, 0), (0, 0), (2, 5), (3, 1), (1, 3)]
        .iter()
        .map(|&(block, row)| SampleRef::at(block, row))
        .collect();
    let batch = l.load(&refs).unwrap();
    assert_eq!(batch.images.size(), vec![7, 3, 32, 32]);
    assert_eq!(batch.images.kind(), tch::Kind::Float);
    assert_eq!(batch.tokens.size(), vec![7, 77]);
    let tok = Tokenizer::clip(77).unwrap();
    for (i, r) in refs.iter().enumerate() {
        let want = &blocks[r.block as usize][r.row as usize];
        assert_eq!(batch.keys[i], want.key);
        assert_eq!(batch.captions[i], want.caption);
        assert_eq!(batch.labels[i], want.label);
        assert!(want.label.is_some(), "synth rows carry a label");
        assert_eq!(
            Vec::<i64>::try_from(batch.tokens.get(i as i64)).unwrap(),
            tok.encode(&want.caption)
        );
    }
    // The same sample in the same epoch gets the same crop; normalised values are in range.
    assert!(batch.images.get(0).equal(&batch.images.get(5)));
    let max = batch.images.abs().max().double_value(&[]);
    assert!(max > 0.1 && max < 2.7, "{max}");

    // Reproducible across loaders (and thread schedules); a new epoch re-crops.
    let again = loader(
        &url,
        LoaderOptions {
            threads: 1,
            ..LoaderOptions::default()
        },
    );
    assert!(again.load(&refs).unwrap().images.equal(&batch.images));
    let next_epoch: Vec<SampleRef> = refs.iter().map(|r| SampleRef { epoch: 1, ..*r }).collect();
    let recropped = again.load(&next_epoch).unwrap();
    assert!(!recropped.images.equal(&batch.images));
    assert_eq!(recropped.keys, batch.keys);
}

#[test]
fn prefetch_fetches_in_the_background_and_the_cache_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let url = synth(dir.path());
    // Room for two blocks (the loader counts image bytes plus a little per row), not four.
    let largest: usize = read_all(&url)
        .iter()
        .map(|b| b.iter().map(|s| s.image.len()).sum())
        .max()
        .unwrap();
    let budget = 2 * (largest + ROWS_PER_BLOCK as usize * 256);
    let l = loader(
        &url,
        LoaderOptions {
            threads: 2,
            prefetch_blocks: 2,
            cache_bytes: budget,
        },
    );
    assert!(!l.is_cached(2));
    l.prefetch(&[2, 3, 99]); // 99 does not exist: ignored by the hint
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(l.is_cached(2) && l.is_cached(3)) {
        assert!(Instant::now() < deadline, "prefetched blocks never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    let batch = l.load(&[SampleRef::at(2, 0), SampleRef::at(3, 7)]).unwrap();
    assert_eq!(batch.keys.len(), 2);

    // Touch every block: the cache never holds more than its budget, old blocks go first.
    for b in [0u32, 1, 4, 0] {
        l.load(&[SampleRef::at(b, 1)]).unwrap();
        assert!(
            l.cached_bytes() <= budget,
            "{} > {budget}",
            l.cached_bytes()
        );
    }
    assert!(l.is_cached(0) && l.is_cached(4));
    assert!(
        !l.is_cached(2) && !l.is_cached(3),
        "least recently used blocks stayed"
    );
}

#[test]
fn bad_references_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let url = synth(dir.path());
    let l = loader(&url, LoaderOptions::default());
    let err = l.load(&[SampleRef::at(17, 0)]).unwrap_err().to_string();
    assert!(
        err.contains("block 17") && err.contains(dir.path().to_str().unwrap()),
        "{err}"
    );
    let err = l.load(&[SampleRef::at(1, 8)]).unwrap_err().to_string();
    assert!(err.contains("row 8") && err.contains("block 1"), "{err}");
    let empty = l.load(&[]).unwrap();
    assert_eq!(empty.images.size(), vec![0, 3, 32, 32]);

    let tok = Arc::new(Tokenizer::clip(77).unwrap());
    let missing = format!("file://{}/nothing-here", dir.path().display());
    let err = Loader::open(
        &missing,
        &StoreOptions::default(),
        "train",
        ImageTransform::eval(32),
        tok.clone(),
        &LoaderOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("nothing-here"), "{err}");
    let err = Loader::open(
        &url,
        &StoreOptions::default(),
        "nope",
        ImageTransform::eval(32),
        tok,
        &LoaderOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("nope"), "{err}");
}
