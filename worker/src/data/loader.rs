//! Sample references → [`Batch`]: fetch the blocks (one ranged GET each, prefetched ahead on a
//! small tokio runtime, kept in an LRU cache bounded by bytes), then decode/augment images and
//! tokenise captions on a rayon pool, and collate in the order asked.
//!
//! A loader may read several datasets (`data.sources`): blocks are then numbered globally, as
//! the epoch plan numbers them (`ferroclip_plan::Blocks`), and each maps back to its dataset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferroclip_plan::Blocks;
use ferroclip_shards::{Dataset, Sample, ShardsError, StoreOptions};
use futures::future::{BoxFuture, FutureExt, Shared};
use rayon::prelude::*;
use tch::Tensor;

use super::{sample_seed, Batch, ImageError, ImageTransform, SampleRef, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{dataset}: {source}")]
    Dataset {
        dataset: String,
        #[source]
        source: Arc<ShardsError>,
    },
    #[error("{dataset}: reading block {block} of split {split:?}: {source}")]
    Block {
        dataset: String,
        split: String,
        block: u32,
        #[source]
        source: Arc<ShardsError>,
    },
    #[error("{dataset}: split {split:?} has {count} blocks; block {block} was asked for")]
    NoSuchBlock {
        dataset: String,
        split: String,
        block: u32,
        count: usize,
    },
    #[error(
        "{dataset}: block {block} of split {split:?} has {rows} rows; row {row} was asked for"
    )]
    NoSuchRow {
        dataset: String,
        split: String,
        block: u32,
        row: u32,
        rows: usize,
    },
    #[error("{dataset}: block {block}, sample {key:?}: {source}")]
    Image {
        dataset: String,
        block: u32,
        key: String,
        #[source]
        source: ImageError,
    },
    #[error("cannot start the data loader's {what}: {reason}")]
    Start { what: &'static str, reason: String },
    #[error("the block fetch task died: {0}")]
    Fetch(String),
}

/// Sizes of the loader's resources.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Threads decoding and augmenting images (0 = all cores).
    pub threads: usize,
    /// Blocks fetched at the same time (prefetch depth).
    pub prefetch_blocks: usize,
    /// Bytes of fetched blocks kept in memory (least recently used go first).
    pub cache_bytes: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            prefetch_blocks: 4,
            cache_bytes: 512 << 20,
        }
    }
}

type Fetched = Result<Arc<Vec<Sample>>, Arc<ShardsError>>;
type Fetch = Shared<BoxFuture<'static, Fetched>>;

pub struct Loader {
    /// The sources in plan order (one unless the run mixes datasets).
    datasets: Vec<Dataset>,
    split: String,
    /// Global block number → (source, its block).
    blocks: Blocks,
    /// Rows per global block.
    block_rows: Vec<u32>,
    /// Rows per block of each source.
    source_rows: Vec<Vec<u32>>,
    transform: ImageTransform,
    tokenizer: Arc<Tokenizer>,
    pool: rayon::ThreadPool,
    /// `Option` so `Drop` can shut it down without blocking (safe inside async code too).
    runtime: Option<tokio::runtime::Runtime>,
    cache: Arc<Mutex<BlockCache>>,
    permits: Arc<tokio::sync::Semaphore>,
}

/// The runtime the block fetches run on: object stores need a Tokio reactor, and the batch
/// threads that call them are plain threads.
fn fetch_runtime() -> Result<tokio::runtime::Runtime, LoaderError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferroclip-fetch")
        .enable_all()
        .build()
        .map_err(|e| LoaderError::Start {
            what: "fetch runtime",
            reason: e.to_string(),
        })
}

impl Loader {
    /// A loader over `split` of an opened dataset.
    pub fn new(
        dataset: Dataset,
        split: &str,
        transform: ImageTransform,
        tokenizer: Arc<Tokenizer>,
        options: &LoaderOptions,
    ) -> Result<Self, LoaderError> {
        let runtime = fetch_runtime()?;
        Self::with_runtime(vec![dataset], split, transform, tokenizer, options, runtime)
    }

    /// Opens the dataset at `url` and makes a loader over `split` (usable from sync or async code).
    pub fn open(
        url: &str,
        store: &StoreOptions,
        split: &str,
        transform: ImageTransform,
        tokenizer: Arc<Tokenizer>,
        options: &LoaderOptions,
    ) -> Result<Self, LoaderError> {
        Self::open_all(
            &[url.to_string()],
            store,
            split,
            transform,
            tokenizer,
            options,
        )
    }

    /// Opens every dataset of `urls` (the sources of a mixed run, in plan order) and makes one
    /// loader over their `split`, blocks numbered globally.
    pub fn open_all(
        urls: &[String],
        store: &StoreOptions,
        split: &str,
        transform: ImageTransform,
        tokenizer: Arc<Tokenizer>,
        options: &LoaderOptions,
    ) -> Result<Self, LoaderError> {
        let runtime = fetch_runtime()?;
        let mut datasets = Vec::with_capacity(urls.len());
        for url in urls {
            let (url_owned, store) = (url.clone(), store.clone());
            let task = runtime.spawn(async move { Dataset::open(&url_owned, &store).await });
            let dataset = futures::executor::block_on(task)
                .map_err(|e| LoaderError::Fetch(e.to_string()))?
                .map_err(|e| LoaderError::Dataset {
                    dataset: url.clone(),
                    source: Arc::new(e),
                })?;
            datasets.push(dataset);
        }
        Self::with_runtime(datasets, split, transform, tokenizer, options, runtime)
    }

    fn with_runtime(
        datasets: Vec<Dataset>,
        split: &str,
        transform: ImageTransform,
        tokenizer: Arc<Tokenizer>,
        options: &LoaderOptions,
        runtime: tokio::runtime::Runtime,
    ) -> Result<Self, LoaderError> {
        let mut source_rows = Vec::with_capacity(datasets.len());
        for dataset in &datasets {
            let rows: Vec<u32> = dataset
                .blocks(split)
                .map_err(|e| LoaderError::Dataset {
                    dataset: dataset.url(),
                    source: Arc::new(e),
                })?
                .iter()
                .map(|b| b.rows)
                .collect();
            source_rows.push(rows);
        }
        let blocks = Blocks::new(source_rows.iter().map(Vec::len));
        let block_rows = source_rows.iter().flatten().copied().collect();
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferroclip-decode-{i}"))
            .build()
            .map_err(|e| LoaderError::Start {
                what: "decode thread pool",
                reason: e.to_string(),
            })?;
        Ok(Self {
            datasets,
            split: split.to_string(),
            blocks,
            block_rows,
            source_rows,
            transform,
            tokenizer,
            pool,
            runtime: Some(runtime),
            cache: Arc::new(Mutex::new(BlockCache::new(options.cache_bytes))),
            permits: Arc::new(tokio::sync::Semaphore::new(options.prefetch_blocks.max(1))),
        })
    }

    /// The dataset this loader reads (the first source of a mixed run).
    pub fn dataset(&self) -> &Dataset {
        &self.datasets[0]
    }

    /// Rows per block of the split, indexed by (global) block number.
    pub fn block_rows(&self) -> &[u32] {
        &self.block_rows
    }

    /// Rows per block of each source's split, in plan order (what the epoch plan mixes).
    pub fn source_rows(&self) -> &[Vec<u32>] {
        &self.source_rows
    }

    /// The dataset holding global block `block`, and the block's number in it.
    fn locate(&self, block: u32) -> Option<(&Dataset, u32)> {
        let (source, local) = self.blocks.locate(block)?;
        Some((self.datasets.get(source)?, local))
    }

    /// The sources' URLs, as errors about the whole loader name them.
    fn name(&self) -> String {
        let urls: Vec<String> = self.datasets.iter().map(Dataset::url).collect();
        urls.join(" + ")
    }

    /// Hint: these blocks will be needed soon; start fetching them now (returns at once).
    /// Unknown block numbers are ignored here and reported by `load`.
    pub fn prefetch(&self, blocks: &[u32]) {
        for &b in blocks {
            if (b as usize) < self.block_rows.len() {
                drop(self.fetch(b)); // starting the fetch is the point; the handle is cached
            }
        }
    }

    /// Whether a block is in memory now (fetched and not evicted).
    pub fn is_cached(&self, block: u32) -> bool {
        self.lock_cache().is_ready(block)
    }

    /// Bytes of fetched blocks held in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.lock_cache().bytes
    }

    /// The samples asked for, decoded, augmented and tokenised, in the order given.
    pub fn load(&self, refs: &[SampleRef]) -> Result<Batch, LoaderError> {
        let mut blocks: Vec<u32> = refs.iter().map(|r| r.block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        for &b in &blocks {
            if b as usize >= self.block_rows.len() {
                return Err(LoaderError::NoSuchBlock {
                    dataset: self.name(),
                    split: self.split.clone(),
                    block: b,
                    count: self.block_rows.len(),
                });
            }
        }
        let fetches: Vec<Fetch> = blocks.iter().map(|&b| self.fetch(b)).collect();
        // Whoever polls a shared fetch first drives it, possibly this thread: it must be inside
        // the fetch runtime's context, or an object store's HTTP client finds no reactor.
        let _rt = self.runtime.as_ref().map(|rt| rt.enter());
        let results = futures::executor::block_on(futures::future::join_all(fetches));
        let mut rows_of: HashMap<u32, Arc<Vec<Sample>>> = HashMap::with_capacity(blocks.len());
        for (&b, r) in blocks.iter().zip(results) {
            let samples = r.map_err(|source| {
                let (dataset, block) = self
                    .locate(b)
                    .map_or((self.name(), b), |(d, local)| (d.url(), local));
                LoaderError::Block {
                    dataset,
                    split: self.split.clone(),
                    block,
                    source,
                }
            })?;
            rows_of.insert(b, samples);
        }
        let mut samples: Vec<(&SampleRef, &Sample)> = Vec::with_capacity(refs.len());
        for r in refs {
            let rows = &rows_of[&r.block];
            let s = rows.get(r.row as usize).ok_or_else(|| {
                let (dataset, block) = self
                    .locate(r.block)
                    .map_or((self.name(), r.block), |(d, local)| (d.url(), local));
                LoaderError::NoSuchRow {
                    dataset,
                    split: self.split.clone(),
                    block,
                    row: r.row,
                    rows: rows.len(),
                }
            })?;
            samples.push((r, s));
        }
        self.collate(&samples)
    }

    /// Decode + augment + tokenise on the pool, then build the tensors. Each image's
    /// augmentation is seeded by (run seed, the sample's epoch, its key).
    fn collate(&self, samples: &[(&SampleRef, &Sample)]) -> Result<Batch, LoaderError> {
        let per_image = self.transform.output_len();
        let size = self.transform.image_size;
        let seed = self.transform.seed;
        let mut images = vec![0f32; samples.len() * per_image];
        let (decoded, tokens) = self.pool.install(|| {
            rayon::join(
                || {
                    images
                        .par_chunks_mut(per_image.max(1))
                        .zip(samples.par_iter())
                        .try_for_each(|(out, (r, s))| {
                            let sample = sample_seed(seed, r.epoch as u64, &s.key);
                            self.transform
                                .apply_into(&s.image, sample, out)
                                .map_err(|source| {
                                    let (dataset, block) = self
                                        .locate(r.block)
                                        .map_or((self.name(), r.block), |(d, local)| {
                                            (d.url(), local)
                                        });
                                    LoaderError::Image {
                                        dataset,
                                        block,
                                        key: s.key.clone(),
                                        source,
                                    }
                                })
                        })
                },
                || {
                    samples
                        .par_iter()
                        .flat_map_iter(|(_, s)| self.tokenizer.encode(&s.caption))
                        .collect::<Vec<i64>>()
                },
            )
        });
        decoded?;
        let b = samples.len() as i64;
        Ok(Batch {
            images: Tensor::from_slice(&images).view([b, 3, size, size]),
            tokens: Tensor::from_slice(&tokens).view([b, self.tokenizer.context_length() as i64]),
            keys: samples.iter().map(|(_, s)| s.key.clone()).collect(),
            captions: samples.iter().map(|(_, s)| s.caption.clone()).collect(),
            labels: samples.iter().map(|(_, s)| s.label.clone()).collect(),
            image_ids: samples.iter().map(|(_, s)| s.image_id).collect(),
        })
    }

    /// The block's fetch, started now if it is neither cached nor in flight.
    fn fetch(&self, block: u32) -> Fetch {
        let mut cache = self.lock_cache();
        if let Some(f) = cache.touch(block) {
            return f;
        }
        // Callers check the block number first (`load`, `prefetch`).
        let source = self.locate(block).map(|(d, local)| (d.clone(), local));
        let split = self.split.clone();
        let (permits, weak_cache) = (self.permits.clone(), Arc::downgrade(&self.cache));
        let fut = async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await.ok();
            let result = match &source {
                Some((dataset, local)) => dataset.read_block(&split, *local).await,
                None => dataset_gone(block),
            };
            let cache = weak_cache.upgrade();
            let mut cache = cache
                .as_ref()
                .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()));
            match result {
                Ok(samples) => {
                    let samples = Arc::new(samples);
                    if let Some(c) = cache.as_mut() {
                        c.arrived(block, block_bytes(&samples));
                    }
                    Ok(samples)
                }
                Err(e) => {
                    // Forget the failure so a later load retries the block.
                    if let Some(c) = cache.as_mut() {
                        c.remove(block);
                    }
                    Err(Arc::new(e))
                }
            }
        }
        .boxed()
        .shared();
        cache.insert(block, fut.clone());
        drop(cache);
        if let Some(rt) = &self.runtime {
            // The task drives the fetch; `load` just waits on its shared result.
            rt.spawn(fut.clone().map(|_| ()));
        }
        fut
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, BlockCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A fetch of a block past every source (callers check first; kept an error, not a panic).
fn dataset_gone(block: u32) -> Result<Vec<Sample>, ShardsError> {
    Err(ShardsError::Config(format!(
        "no source holds block {block}"
    )))
}

fn block_bytes(samples: &[Sample]) -> usize {
    samples
        .iter()
        .map(|s| {
            s.image.len()
                + s.caption.len()
                + s.key.len()
                + s.label.as_ref().map_or(0, |l| l.to_string().len())
                + 64
        })
        .sum()
}

/// Fetched and in-flight blocks; fetched ones are evicted least-recently-used first when
/// their bytes exceed the budget. In-flight ones are never evicted.
struct BlockCache {
    slots: HashMap<u32, Slot>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

struct Slot {
    fetch: Fetch,
    /// `Some` once the block has arrived.
    bytes: Option<usize>,
    last_use: u64,
}

impl BlockCache {
    fn new(budget: usize) -> Self {
        Self {
            slots: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    fn touch(&mut self, block: u32) -> Option<Fetch> {
        self.clock += 1;
        let slot = self.slots.get_mut(&block)?;
        slot.last_use = self.clock;
        Some(slot.fetch.clone())
    }

    fn insert(&mut self, block: u32, fetch: Fetch) {
        self.clock += 1;
        let slot = Slot {
            fetch,
            bytes: None,
            last_use: self.clock,
        };
        if let Some(old) = self.slots.insert(block, slot) {
            self.bytes -= old.bytes.unwrap_or(0);
        }
    }

    fn is_ready(&self, block: u32) -> bool {
        self.slots.get(&block).is_some_and(|s| s.bytes.is_some())
    }

    fn arrived(&mut self, block: u32, bytes: usize) {
        if let Some(slot) = self.slots.get_mut(&block) {
            slot.bytes = Some(bytes);
            self.bytes += bytes;
        }
        self.evict(block);
    }

    fn remove(&mut self, block: u32) {
        if let Some(old) = self.slots.remove(&block) {
            self.bytes -= old.bytes.unwrap_or(0);
        }
    }

    /// Drop least-recently-used fetched blocks until within budget, keeping `keep` (the block
    /// that just arrived) unless it alone is over budget.
    fn evict(&mut self, keep: u32) {
        while self.bytes > self.budget {
            let victim = self
                .slots
                .iter()
                .filter(|(&b, s)| b != keep && s.bytes.is_some())
                .min_by_key(|(_, s)| s.last_use)
                .map(|(&b, _)| b)
                .unwrap_or(keep);
            self.remove(victim);
            if victim == keep {
                break;
            }
        }
    }
}
