//! Reading a built dataset: the manifest, its blocks (one Parquet row group each), and one block's
//! rows with a single ranged GET. Footers are read once per shard and cached, so many tasks can
//! call `read_block` concurrently and cheaply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, UInt32Type};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::error::ShardsError;
use crate::manifest::*;
use crate::pq::{guard, load_metadata, row_group_range, ObjectReader, RangeReader};
use crate::store::{Location, StoreOptions};

/// One row group of one shard: the unit a worker fetches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub index: u32,
    pub shard: String,
    pub row_group: u32,
    pub rows: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub key: String,
    /// Encoded image (JPEG, or PNG when the source was PNG and not resized).
    pub image: Bytes,
    pub caption: String,
    pub width: u32,
    pub height: u32,
    pub label: Option<Label>,
    /// The image this caption belongs to, where the dataset groups several captions per image.
    pub image_id: Option<i64>,
}

/// A sample's class: a name (a string label column) or an index into the class list (an
/// integer label column, as ImageNet-style datasets have).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Label {
    Name(String),
    Index(i64),
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Label::Name(n) => write!(f, "{n}"),
            Label::Index(i) => write!(f, "{i}"),
        }
    }
}

/// `classes.json`: class names and zero-shot prompt templates (`"a photo of a {}."`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classes {
    pub classes: Vec<String>,
    pub templates: Vec<String>,
}

impl Classes {
    /// A classes file (the `classes.json` shape) at a path or URL: `eval.classes`, `--classes`.
    pub async fn load(url: &str, opts: &StoreOptions) -> Result<Classes, ShardsError> {
        let loc = Location::open(url, opts)?;
        let bytes = get_all(&loc).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ShardsError::bad_input(
                url,
                format!("not a classes file ({{\"classes\": [...], \"templates\": [...]}}): {e}"),
            )
        })
    }
}

#[derive(Clone)]
pub struct Dataset {
    inner: Arc<Inner>,
}

struct Inner {
    root: Location,
    /// How long a read retries an unavailable store.
    retry_budget: std::time::Duration,
    manifest: Manifest,
    classes: Option<Classes>,
    /// Per split: (shard index, row group) of each block.
    blocks: HashMap<String, Vec<Block>>,
    footers: Mutex<HashMap<String, Arc<OnceCell<ArrowReaderMetadata>>>>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dataset({})", self.inner.root.url())
    }
}

impl Dataset {
    /// Opens a dataset root (the directory/prefix holding `manifest.json`), riding out a store
    /// outage of up to `opts.retry_budget`.
    pub async fn open(url: &str, opts: &StoreOptions) -> Result<Dataset, ShardsError> {
        crate::retry::with_retry(
            &format!("opening the dataset {url}"),
            opts.retry_budget,
            ShardsError::is_transient,
            || Self::open_once(url, opts),
        )
        .await
    }

    async fn open_once(url: &str, opts: &StoreOptions) -> Result<Dataset, ShardsError> {
        let root = Location::open(url, opts)?;
        let mloc = root.join(MANIFEST_FILE);
        let bytes = get_all(&mloc).await?;
        let manifest = Manifest::parse(&mloc.url(), &bytes)?;
        let cloc = root.join(CLASSES_FILE);
        let classes = match cloc.store.get(&cloc.path).await {
            Ok(r) => {
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| ShardsError::store(cloc.url(), e))?;
                Some(
                    serde_json::from_slice(&b).map_err(|e| ShardsError::Manifest {
                        url: cloc.url(),
                        message: e.to_string(),
                    })?,
                )
            }
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(ShardsError::store(cloc.url(), e)),
        };
        let blocks = manifest
            .splits
            .iter()
            .map(|(name, split)| (name.clone(), list_blocks(split)))
            .collect();
        Ok(Dataset {
            inner: Arc::new(Inner {
                root,
                retry_budget: opts.retry_budget,
                manifest,
                classes,
                blocks,
                footers: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    pub fn classes(&self) -> Option<&Classes> {
        self.inner.classes.as_ref()
    }

    pub fn url(&self) -> String {
        self.inner.root.url()
    }

    /// Blocks numbered 0.. over the split's shards in manifest order, then row groups.
    pub fn blocks(&self, split: &str) -> Result<Vec<Block>, ShardsError> {
        Ok(self.split_blocks(split)?.to_vec())
    }

    fn split_blocks(&self, split: &str) -> Result<&[Block], ShardsError> {
        self.inner
            .blocks
            .get(split)
            .map(|b| b.as_slice())
            .ok_or_else(|| ShardsError::UnknownSplit {
                split: split.to_string(),
                available: self
                    .inner
                    .manifest
                    .splits
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The rows of one block, fetched with one ranged GET (after the shard's footer is cached).
    /// A store outage is retried for up to the store options' `retry_budget`.
    pub async fn read_block(&self, split: &str, block: u32) -> Result<Vec<Sample>, ShardsError> {
        crate::retry::with_retry(
            &format!("reading block {block} of {} split {split}", self.url()),
            self.inner.retry_budget,
            ShardsError::is_transient,
            || self.read_block_once(split, block),
        )
        .await
    }

    async fn read_block_once(&self, split: &str, block: u32) -> Result<Vec<Sample>, ShardsError> {
        let blocks = self.split_blocks(split)?;
        let b = blocks.get(block as usize).ok_or(ShardsError::NoSuchBlock {
            split: split.to_string(),
            block,
            count: blocks.len(),
        })?;
        let shard = self
            .inner
            .manifest
            .splits
            .get(split)
            .and_then(|s| s.shards.iter().find(|s| s.path == b.shard))
            .ok_or_else(|| ShardsError::Manifest {
                url: self.url(),
                message: format!("shard {} missing", b.shard),
            })?;
        let loc = self.inner.root.join(&shard.path);
        let url = loc.url();
        let meta = self.footer(&loc, shard.bytes).await?;
        let rg = b.row_group as usize;
        if rg >= meta.metadata().num_row_groups() {
            return Err(ShardsError::bad_input(
                &url,
                format!(
                    "has {} row groups, manifest expects more",
                    meta.metadata().num_row_groups()
                ),
            ));
        }
        // The footer's count before anything is sized by the manifest's: a manifest claiming
        // billions of rows must not reserve room for them.
        let file_rows = meta.metadata().row_group(rg).num_rows();
        if file_rows != i64::from(b.rows) {
            return Err(ShardsError::bad_input(
                &url,
                format!(
                    "row group {rg} has {file_rows} rows, manifest says {}",
                    b.rows
                ),
            ));
        }
        let range =
            row_group_range(meta.metadata(), rg).map_err(|m| ShardsError::bad_input(&url, m))?;
        let data = loc
            .store
            .get_range(&loc.path, range.clone())
            .await
            .map_err(|e| ShardsError::store(&url, e))?;
        // parquet 60.1 can spin for seconds on a corrupt page header (`page_headers`).
        crate::page_headers::check_row_group(meta.metadata(), rg, &data, range.start)
            .map_err(|m| ShardsError::bad_input(&url, format!("corrupt Parquet: {m}")))?;
        let reader = RangeReader {
            base: range.start,
            data,
            metadata: meta.metadata().clone(),
        };
        let batches: Vec<RecordBatch> = guard(async {
            ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta)
                .with_row_groups(vec![rg])
                .with_batch_size(b.rows.max(1) as usize)
                .build()?
                .try_collect()
                .await
        })
        .await
        .map_err(|e| ShardsError::parquet(&url, e))?;
        let mut out = Vec::with_capacity(b.rows as usize);
        for batch in &batches {
            samples_from_batch(&url, batch, &mut out)?;
        }
        if out.len() != b.rows as usize {
            return Err(ShardsError::bad_input(
                &url,
                format!(
                    "row group {rg} has {} rows, manifest says {}",
                    out.len(),
                    b.rows
                ),
            ));
        }
        Ok(out)
    }

    async fn footer(&self, loc: &Location, size: u64) -> Result<ArrowReaderMetadata, ShardsError> {
        let cell = {
            let mut footers = self.inner.footers.lock().unwrap_or_else(|p| p.into_inner());
            footers.entry(loc.path.to_string()).or_default().clone()
        };
        let meta = cell
            .get_or_try_init(|| async {
                let mut reader = ObjectReader {
                    store: loc.store.clone(),
                    path: loc.path.clone(),
                    size,
                };
                load_metadata(&mut reader)
                    .await
                    .map_err(|e| ShardsError::parquet(loc.url(), e))
            })
            .await?;
        Ok(meta.clone())
    }
}

fn list_blocks(split: &Split) -> Vec<Block> {
    let mut blocks = Vec::new();
    for shard in &split.shards {
        for (rg, &rows) in shard.row_groups.iter().enumerate() {
            blocks.push(Block {
                index: blocks.len() as u32,
                shard: shard.path.clone(),
                row_group: rg as u32,
                rows: rows as u32,
            });
        }
    }
    blocks
}

pub(crate) async fn get_all(loc: &Location) -> Result<Bytes, ShardsError> {
    let r = loc
        .store
        .get(&loc.path)
        .await
        .map_err(|e| ShardsError::store(loc.url(), e))?;
    r.bytes()
        .await
        .map_err(|e| ShardsError::store(loc.url(), e))
}

/// Converts a record batch in the shard schema into samples.
pub(crate) fn samples_from_batch(
    file: &str,
    batch: &RecordBatch,
    out: &mut Vec<Sample>,
) -> Result<(), ShardsError> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| ShardsError::MissingColumn {
                file: file.to_string(),
                column: name.to_string(),
                available: batch
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    };
    let type_err = |name: &str, expected: &str, found: &dyn Array| ShardsError::ColumnType {
        file: file.to_string(),
        column: name.to_string(),
        found: found.data_type().to_string(),
        expected: expected.to_string(),
    };
    let key = col(COL_KEY)?;
    let key = key
        .as_string_opt::<i32>()
        .ok_or_else(|| type_err(COL_KEY, "Utf8", key.as_ref()))?;
    let image = col(COL_IMAGE)?;
    let image = image
        .as_binary_opt::<i32>()
        .ok_or_else(|| type_err(COL_IMAGE, "Binary", image.as_ref()))?;
    let caption = col(COL_CAPTION)?;
    let caption = caption
        .as_string_opt::<i32>()
        .ok_or_else(|| type_err(COL_CAPTION, "Utf8", caption.as_ref()))?;
    let width = col(COL_WIDTH)?;
    let width = width
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| type_err(COL_WIDTH, "UInt32", width.as_ref()))?;
    let height = col(COL_HEIGHT)?;
    let height = height
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| type_err(COL_HEIGHT, "UInt32", height.as_ref()))?;
    let label = batch.column_by_name(COL_LABEL);
    let label_names = label.and_then(|c| c.as_string_opt::<i32>());
    let label_ids = label
        .filter(|c| c.data_type().is_integer())
        .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).ok());
    let label_ids = label_ids
        .as_ref()
        .and_then(|c| c.as_primitive_opt::<Int64Type>());
    let image_id = batch
        .column_by_name(COL_IMAGE_ID)
        .and_then(|c| c.as_primitive_opt::<Int64Type>());
    for i in 0..batch.num_rows() {
        out.push(Sample {
            key: key.value(i).to_string(),
            image: Bytes::copy_from_slice(image.value(i)),
            caption: caption.value(i).to_string(),
            width: width.value(i),
            height: height.value(i),
            label: match (label_names, label_ids) {
                (Some(l), _) if l.is_valid(i) => Some(Label::Name(l.value(i).to_string())),
                (_, Some(l)) if l.is_valid(i) => Some(Label::Index(l.value(i))),
                _ => None,
            },
            image_id: image_id.filter(|c| c.is_valid(i)).map(|c| c.value(i)),
        });
    }
    Ok(())
}
