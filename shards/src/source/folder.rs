//! A folder of images (any store) with a captions file: CSV or JSONL rows naming an image by its
//! path relative to the folder (`path`/`file`/`image`/`filename`), its caption
//! (`caption`/`text`/`txt`) and optionally a `key`. Without `--captions` the folder's own
//! `captions.jsonl` or `captions.csv` is used. Or a captioning dataset's annotation file
//! (`--format coco|karpathy`): its pairs carry an `image_id` column and their own splits.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use super::annotations::{Annotations, Format};
use super::{Input, InputFile, InputPlan, RawBatch, RawRow, Sink, BATCH_ROWS};
use crate::error::ShardsError;
use crate::manifest::COL_IMAGE_ID;
use crate::reader::get_all;
use crate::store::{Location, StoreOptions};
use crate::validate::RawCaption;

/// The folder, its captions file and the rows read from it.
pub(super) struct FolderInput {
    root: Location,
    captions: InputFile,
    entries: Vec<CaptionEntry>,
}

impl CaptionEntry {
    /// A captions file's row: no image id, no split of its own.
    fn plain(path: String, key: Option<String>, caption: RawCaption) -> Self {
        CaptionEntry {
            path,
            key,
            caption,
            image_id: None,
            split: None,
        }
    }
}

/// One row of a captions file.
#[derive(Clone, Debug)]
struct CaptionEntry {
    path: String,
    key: Option<String>,
    caption: RawCaption,
    /// From an annotation file: the image's id (the `image_id` column) and split.
    image_id: Option<i64>,
    split: Option<u16>,
}

impl InputPlan {
    /// A folder of images plus a captions file (CSV or JSONL with `path`/`file`/`image` and
    /// `caption`/`text`/`txt`; optional `key`). Paths are relative to the folder.
    pub async fn folder(
        src: &str,
        captions: Option<&str>,
        opts: &StoreOptions,
    ) -> Result<InputPlan, ShardsError> {
        let root = Location::open(src, opts)?;
        let cap_loc = match captions {
            Some(c) => Location::open(c, opts)?,
            None => find_captions(&root).await?,
        };
        let url = cap_loc.url();
        let bytes = get_all(&cap_loc).await?;
        let entries = if url.ends_with(".csv") {
            parse_csv(&url, &bytes)?
        } else {
            parse_jsonl(&url, &bytes)?
        };
        if entries.is_empty() {
            return Err(ShardsError::EmptySource(url));
        }
        let total_rows = entries.len() as u64;
        let captions = InputFile {
            url,
            size: bytes.len() as u64,
            rows: total_rows,
        };
        Ok(InputPlan {
            input: Input::Folder(FolderInput {
                root,
                captions,
                entries,
            }),
            passthrough: Arc::new(Schema::empty()),
            total_rows,
            splits: None,
        })
    }

    /// The images under `images` named by an annotation file of a captioning dataset: one row
    /// per (image, caption) pair, an `image_id` column, and the file's splits.
    pub async fn annotated(
        format: Format,
        annotations: &str,
        image_data: Option<&str>,
        images: &str,
        opts: &StoreOptions,
    ) -> Result<InputPlan, ShardsError> {
        let root = Location::open(images, opts)?;
        let loc = Location::open(annotations, opts)?;
        let url = loc.url();
        let bytes = get_all(&loc).await?;
        let data = match image_data {
            Some(d) => {
                let dloc = Location::open(d, opts)?;
                Some((dloc.url(), get_all(&dloc).await?))
            }
            None => None,
        };
        let data_ref = data.as_ref().map(|(u, b)| (u.as_str(), b.as_ref()));
        let parsed = Annotations::parse(format, &url, &bytes, data_ref)?;
        if parsed.pairs.is_empty() {
            return Err(ShardsError::EmptySource(url));
        }
        let entries: Vec<CaptionEntry> = parsed
            .pairs
            .into_iter()
            .map(|p| CaptionEntry {
                path: p.path,
                key: Some(p.key),
                caption: p.caption,
                image_id: Some(p.image_id),
                split: Some(p.split),
            })
            .collect();
        let total_rows = entries.len() as u64;
        Ok(InputPlan {
            input: Input::Folder(FolderInput {
                root,
                captions: InputFile {
                    url,
                    size: bytes.len() as u64,
                    rows: total_rows,
                },
                entries,
            }),
            passthrough: image_id_schema(),
            total_rows,
            splits: Some(parsed.splits),
        })
    }
}

fn image_id_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new(
        COL_IMAGE_ID,
        DataType::Int64,
        false,
    )]))
}

/// The folder's `captions.jsonl`, else its `captions.csv`.
async fn find_captions(root: &Location) -> Result<Location, ShardsError> {
    for name in ["captions.jsonl", "captions.csv"] {
        let l = root.join(name);
        match l.store.head(&l.path).await {
            Ok(_) => return Ok(l),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(ShardsError::store(l.url(), e)),
        }
    }
    Err(ShardsError::bad_input(
        root.url(),
        "no captions file: pass --captions or add captions.jsonl / captions.csv",
    ))
}

impl FolderInput {
    pub(super) fn captions_file(&self) -> InputFile {
        self.captions.clone()
    }

    pub(super) fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "folder": self.root.url(), "entries": self.entries.len() })
    }

    /// Streams the captions file's rows in order, fetching each batch's images concurrently.
    pub(super) async fn produce(&self, tx: &Sink) -> Result<(), ShardsError> {
        let mut index = 0u64;
        for chunk in self.entries.chunks(BATCH_ROWS) {
            // Fetch a batch of images concurrently: object stores reward parallel GETs.
            let fetches: Vec<_> = chunk
                .iter()
                .map(|e| fetch_image(self.root.clone(), e.path.clone()))
                .collect();
            let fetched: Vec<FetchedImage> =
                futures::stream::iter(fetches).buffered(16).collect().await;
            let ids = image_ids(chunk)?;
            let mut rows = Vec::with_capacity(chunk.len());
            let mut bytes = 0;
            for (e, f) in chunk.iter().zip(fetched) {
                let (source, image) = f?;
                bytes += image.as_ref().map_or(0, |b| b.len() as u64);
                let key = e.key.clone().unwrap_or_else(|| {
                    let p = e.path.as_str();
                    p.rsplit_once('.').map_or(p, |(stem, _)| stem).to_string()
                });
                rows.push(RawRow {
                    index,
                    source,
                    source_row: index,
                    key,
                    image,
                    caption: e.caption.clone(),
                    passthrough: ids.clone().map(|b| (b, rows.len())),
                    split: e.split,
                });
                index += 1;
            }
            if tx.send(Ok(RawBatch { rows, bytes })).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The `image_id` column of a batch of annotated rows (None for a plain captions file).
fn image_ids(chunk: &[CaptionEntry]) -> Result<Option<Arc<RecordBatch>>, ShardsError> {
    let ids: Option<Vec<i64>> = chunk.iter().map(|e| e.image_id).collect();
    let Some(ids) = ids else { return Ok(None) };
    let batch = RecordBatch::try_new(image_id_schema(), vec![Arc::new(Int64Array::from(ids))])
        .map_err(|e| ShardsError::Config(format!("image_id column: {e}")))?;
    Ok(Some(Arc::new(batch)))
}

/// An image fetched for a row: its source name and bytes (None = missing).
type FetchedImage = Result<(Arc<str>, Option<Bytes>), ShardsError>;

/// One image of a folder source; a listed image that is not there is a bad row, not a broken build.
async fn fetch_image(root: Location, path: String) -> FetchedImage {
    let loc = root.join(path.trim_start_matches('/'));
    let url: Arc<str> = Arc::from(loc.url().as_str());
    match loc.store.get(&loc.path).await {
        Ok(r) => {
            let b = r
                .bytes()
                .await
                .map_err(|err| ShardsError::store(&*url, err))?;
            Ok((url, Some(b)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok((url, None)),
        Err(err) => Err(ShardsError::store(&*url, err)),
    }
}

/// Column names accepted for each field of a captions file, in order of preference.
const PATH_NAMES: [&str; 4] = ["path", "file", "image", "filename"];
const CAPTION_NAMES: [&str; 3] = ["caption", "text", "txt"];

fn pick<'a>(names: &'a [&'a str], candidates: &[&str]) -> Option<usize> {
    candidates
        .iter()
        .find_map(|c| names.iter().position(|n| n == c))
}

fn parse_csv(url: &str, bytes: &[u8]) -> Result<Vec<CaptionEntry>, ShardsError> {
    let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let headers = rdr
        .byte_headers()
        .map_err(|e| ShardsError::bad_input(url, format!("cannot read the CSV header: {e}")))?
        .clone();
    let names: Vec<String> = headers
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let missing = |col: &str| ShardsError::MissingColumn {
        file: url.to_string(),
        column: col.to_string(),
        available: names.join(", "),
    };
    let path_i = pick(&refs, &PATH_NAMES).ok_or_else(|| missing("path"))?;
    let cap_i = pick(&refs, &CAPTION_NAMES).ok_or_else(|| missing("caption"))?;
    let key_i = pick(&refs, &["key"]);
    let mut out = Vec::new();
    for (line, rec) in rdr.byte_records().enumerate() {
        let rec =
            rec.map_err(|e| ShardsError::bad_input(url, format!("CSV row {}: {e}", line + 1)))?;
        let path = rec
            .get(path_i)
            .map(|p| String::from_utf8_lossy(p).trim().to_string())
            .unwrap_or_default();
        let caption = match rec.get(cap_i) {
            Some(c) => match std::str::from_utf8(c) {
                Ok(s) => RawCaption::Text(s.to_string()),
                Err(_) => RawCaption::Bytes(c.to_vec()),
            },
            None => RawCaption::Missing,
        };
        let key = key_i
            .and_then(|k| rec.get(k))
            .map(|k| String::from_utf8_lossy(k).to_string());
        out.push(CaptionEntry::plain(path, key, caption));
    }
    Ok(out)
}

fn parse_jsonl(url: &str, bytes: &[u8]) -> Result<Vec<CaptionEntry>, ShardsError> {
    let mut out = Vec::new();
    for (line_no, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let bad = |m: String| ShardsError::bad_input(url, format!("line {}: {m}", line_no + 1));
        let v: serde_json::Value = match std::str::from_utf8(line) {
            Ok(s) => serde_json::from_str(s).map_err(|e| bad(e.to_string()))?,
            Err(e) => return Err(bad(format!("not UTF-8: {e}"))),
        };
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| v.get(*n).and_then(|x| x.as_str()).map(str::to_string))
        };
        let path = field(&PATH_NAMES).ok_or_else(|| bad("no \"path\" field".into()))?;
        let caption = match field(&CAPTION_NAMES) {
            Some(c) => RawCaption::Text(c),
            None => RawCaption::Missing,
        };
        let key = v.get("key").map(|k| match k.as_str() {
            Some(s) => s.to_string(),
            None => k.to_string(),
        });
        out.push(CaptionEntry::plain(path, key, caption));
    }
    Ok(out)
}
