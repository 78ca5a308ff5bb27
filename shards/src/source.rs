//! Build inputs: Parquet files/prefixes, a folder of images with a captions file, or the synthetic
//! generator. Planning lists and checks every input up front (missing columns, unreadable files and
//! bad credentials stop the build before any work); producing streams rows in a fixed order.

use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ShardsError;
use crate::manifest::*;
use crate::pq::{load_metadata, ObjectReader};
use crate::reader::get_all;
use crate::store::{Location, StoreOptions};
use crate::synth::SynthOptions;
use crate::validate::RawCaption;

/// Rows per batch handed to the validation stage.
pub const BATCH_ROWS: usize = 128;

/// One input row, in input order.
#[derive(Clone, Debug)]
pub struct RawRow {
    /// Position in the whole input (all sources, in order): the build's resume cursor.
    pub index: u64,
    pub source: Arc<str>,
    pub source_row: u64,
    pub key: String,
    pub image: Option<Bytes>,
    pub caption: RawCaption,
    pub passthrough: Option<(Arc<RecordBatch>, usize)>,
}

pub struct RawBatch {
    pub rows: Vec<RawRow>,
    pub bytes: u64,
}

/// Column names in Parquet sources.
#[derive(Clone, Debug, Serialize)]
pub struct ColumnNames {
    pub image: String,
    /// None: `caption`, falling back to `txt`.
    pub text: Option<String>,
    pub key: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InputFile {
    pub url: String,
    pub size: u64,
    pub rows: u64,
    #[serde(skip)]
    loc: Option<Location>,
    #[serde(skip)]
    meta: Option<ArrowReaderMetadata>,
    #[serde(skip)]
    text_col: String,
}

#[derive(Clone, Debug)]
struct CaptionEntry {
    path: String,
    key: Option<String>,
    caption: RawCaption,
}

enum Kind {
    Parquet(ColumnNames),
    Folder {
        root: Location,
        entries: Vec<CaptionEntry>,
    },
    Synth(SynthOptions),
}

/// Everything a build reads, resolved and checked.
pub struct InputPlan {
    kind: Kind,
    pub files: Vec<InputFile>,
    pub passthrough: SchemaRef,
    pub total_rows: u64,
}

impl InputPlan {
    pub async fn parquet(
        srcs: &[String],
        cols: ColumnNames,
        opts: &StoreOptions,
    ) -> Result<InputPlan, ShardsError> {
        let mut files = Vec::new();
        for src in srcs {
            let loc = Location::open(src, opts)?;
            let found = list_parquet(&loc).await?;
            if found.is_empty() {
                return Err(ShardsError::EmptySource(format!(
                    "{src} (no Parquet files)"
                )));
            }
            files.extend(found);
        }
        let mut passthrough: Option<SchemaRef> = None;
        for f in &mut files {
            let loc = f
                .loc
                .clone()
                .ok_or_else(|| ShardsError::Config("unplanned file".into()))?;
            let mut reader = ObjectReader {
                store: loc.store.clone(),
                path: loc.path.clone(),
                size: f.size,
            };
            let meta = load_metadata(&mut reader)
                .await
                .map_err(|e| ShardsError::parquet(&f.url, e))?;
            let schema = meta.schema().clone();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let missing = |column: &str| ShardsError::MissingColumn {
                file: f.url.clone(),
                column: column.to_string(),
                available: names.join(", "),
            };
            if !names.contains(&cols.image.as_str()) {
                return Err(missing(&cols.image));
            }
            f.text_col = match &cols.text {
                Some(t) if names.contains(&t.as_str()) => t.clone(),
                Some(t) => return Err(missing(t)),
                None if names.contains(&"caption") => "caption".into(),
                None if names.contains(&"txt") => "txt".into(),
                None => return Err(missing("caption (or txt)")),
            };
            if let Some(k) = &cols.key {
                if !names.contains(&k.as_str()) {
                    return Err(missing(k));
                }
            }
            if passthrough.is_none() {
                let key_col = cols.key.clone().unwrap_or_else(|| "key".into());
                let skip = [
                    cols.image.as_str(),
                    f.text_col.as_str(),
                    key_col.as_str(),
                    COL_KEY,
                    COL_IMAGE,
                    COL_CAPTION,
                    COL_WIDTH,
                    COL_HEIGHT,
                ];
                let fields: Vec<Field> = schema
                    .fields()
                    .iter()
                    .filter(|fl| !skip.contains(&fl.name().as_str()))
                    .map(|fl| Field::new(fl.name(), fl.data_type().clone(), true))
                    .collect();
                passthrough = Some(Arc::new(Schema::new(fields)));
            }
            f.rows = meta.metadata().file_metadata().num_rows().max(0) as u64;
            f.meta = Some(meta);
        }
        let total_rows = files.iter().map(|f| f.rows).sum();
        if total_rows == 0 {
            return Err(ShardsError::EmptySource(format!(
                "{} (0 rows)",
                srcs.join(", ")
            )));
        }
        Ok(InputPlan {
            kind: Kind::Parquet(cols),
            files,
            passthrough: passthrough.unwrap_or_else(|| Arc::new(Schema::empty())),
            total_rows,
        })
    }

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
            None => {
                let mut found = None;
                for name in ["captions.jsonl", "captions.csv"] {
                    let l = root.join(name);
                    match l.store.head(&l.path).await {
                        Ok(_) => {
                            found = Some(l);
                            break;
                        }
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(ShardsError::store(l.url(), e)),
                    }
                }
                found.ok_or_else(|| {
                    ShardsError::bad_input(
                        root.url(),
                        "no captions file: pass --captions or add captions.jsonl / captions.csv",
                    )
                })?
            }
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
        Ok(InputPlan {
            kind: Kind::Folder { root, entries },
            files: vec![InputFile {
                url,
                size: bytes.len() as u64,
                rows: total_rows,
                loc: None,
                meta: None,
                text_col: String::new(),
            }],
            passthrough: Arc::new(Schema::empty()),
            total_rows,
        })
    }

    pub fn synth(opts: SynthOptions) -> InputPlan {
        let total_rows = opts.rows;
        InputPlan {
            kind: Kind::Synth(opts),
            files: vec![],
            passthrough: Arc::new(Schema::new(vec![Field::new(
                COL_LABEL,
                DataType::Utf8,
                true,
            )])),
            total_rows,
        }
    }

    /// Streams every input row in order into `tx`. Stops early if the receiver is gone.
    pub async fn produce(self: Arc<Self>, tx: mpsc::Sender<Result<RawBatch, ShardsError>>) {
        let result = match &self.kind {
            Kind::Parquet(_) => self.produce_parquet(&tx).await,
            Kind::Folder { root, entries } => produce_folder(root, entries, &tx).await,
            Kind::Synth(o) => crate::synth::produce(o.clone(), &tx).await,
        };
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn produce_parquet(
        &self,
        tx: &mpsc::Sender<Result<RawBatch, ShardsError>>,
    ) -> Result<(), ShardsError> {
        let Kind::Parquet(cols) = &self.kind else {
            return Ok(());
        };
        let mut index = 0u64;
        for f in &self.files {
            let (Some(loc), Some(meta)) = (&f.loc, &f.meta) else {
                continue;
            };
            let reader = ObjectReader {
                store: loc.store.clone(),
                path: loc.path.clone(),
                size: f.size,
            };
            let mut stream =
                ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta.clone())
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(|e| ShardsError::parquet(&f.url, e))?;
            let source: Arc<str> = Arc::from(f.url.as_str());
            let stem = file_stem(&f.url);
            let mut row = 0u64;
            while let Some(batch) = stream
                .try_next()
                .await
                .map_err(|e| ShardsError::parquet(&f.url, e))?
            {
                let rb = self.convert_batch(cols, f, &source, &stem, &batch, index, row)?;
                index += rb.rows.len() as u64;
                row += rb.rows.len() as u64;
                if tx.send(Ok(rb)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn convert_batch(
        &self,
        cols: &ColumnNames,
        f: &InputFile,
        source: &Arc<str>,
        stem: &str,
        batch: &RecordBatch,
        first_index: u64,
        first_row: u64,
    ) -> Result<RawBatch, ShardsError> {
        let get = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| ShardsError::MissingColumn {
                    file: f.url.clone(),
                    column: name.to_string(),
                    available: String::new(),
                })
        };
        let images = image_column(&f.url, &cols.image, get(&cols.image)?)?;
        let captions = caption_column(&f.url, &f.text_col, get(&f.text_col)?)?;
        let key_name = cols.key.clone().unwrap_or_else(|| "key".into());
        let keys = match batch.column_by_name(&key_name) {
            Some(k) => Some(
                cast(k, &DataType::Utf8).map_err(|e| ShardsError::ColumnType {
                    file: f.url.clone(),
                    column: key_name.clone(),
                    found: format!("{} ({e})", k.data_type()),
                    expected: "a string or number".into(),
                })?,
            ),
            None => None,
        };
        let keys = keys.as_ref().map(|k| k.as_string::<i32>());
        let passthrough = Arc::new(passthrough_batch(&f.url, &self.passthrough, batch)?);
        let mut rows = Vec::with_capacity(batch.num_rows());
        let mut bytes = 0u64;
        for i in 0..batch.num_rows() {
            let source_row = first_row + i as u64;
            let key = match keys {
                Some(k) if k.is_valid(i) => k.value(i).to_string(),
                _ => format!("{stem}-{source_row:09}"),
            };
            let image = images[i].clone();
            bytes += image.as_ref().map_or(0, |b| b.len() as u64);
            rows.push(RawRow {
                index: first_index + i as u64,
                source: source.clone(),
                source_row,
                key,
                image,
                caption: captions[i].clone(),
                passthrough: Some((passthrough.clone(), i)),
            });
        }
        Ok(RawBatch { rows, bytes })
    }
}

fn file_stem(url: &str) -> String {
    let name = url.rsplit('/').next().unwrap_or(url);
    name.strip_suffix(".parquet").unwrap_or(name).to_string()
}

/// A URL naming a `.parquet` object is that file; otherwise every `.parquet` below the prefix, sorted.
async fn list_parquet(loc: &Location) -> Result<Vec<InputFile>, ShardsError> {
    let file = |loc: Location, size: u64| InputFile {
        url: loc.url(),
        size,
        rows: 0,
        loc: Some(loc),
        meta: None,
        text_col: String::new(),
    };
    if loc.path.as_ref().ends_with(".parquet") {
        let meta = loc
            .store
            .head(&loc.path)
            .await
            .map_err(|e| ShardsError::store(loc.url(), e))?;
        return Ok(vec![file(loc.clone(), meta.size)]);
    }
    let mut metas: Vec<_> = loc
        .store
        .list(Some(&loc.path))
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| ShardsError::store(loc.url(), e))?;
    metas.retain(|m| m.location.as_ref().ends_with(".parquet"));
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(metas
        .into_iter()
        .map(|m| file(loc.with_path(m.location.clone()), m.size))
        .collect())
}

/// Encoded images from Binary-like columns or Hugging Face's `{bytes, path}` structs.
fn image_column(file: &str, name: &str, col: &ArrayRef) -> Result<Vec<Option<Bytes>>, ShardsError> {
    let col = match col.data_type() {
        DataType::Struct(_) => {
            let s = col.as_struct();
            let inner = s
                .column_by_name("bytes")
                .ok_or_else(|| ShardsError::ColumnType {
                    file: file.to_string(),
                    column: name.to_string(),
                    found: col.data_type().to_string(),
                    expected: "binary, or a struct with a `bytes` field".into(),
                })?;
            inner.clone()
        }
        _ => col.clone(),
    };
    let bin = cast(&col, &DataType::Binary).map_err(|_| ShardsError::ColumnType {
        file: file.to_string(),
        column: name.to_string(),
        found: col.data_type().to_string(),
        expected: "binary (encoded image bytes)".into(),
    })?;
    let bin = bin.as_binary::<i32>();
    Ok((0..bin.len())
        .map(|i| {
            bin.is_valid(i)
                .then(|| Bytes::copy_from_slice(bin.value(i)))
        })
        .collect())
}

/// Captions; binary columns are kept as bytes so that invalid UTF-8 is a per-row reject.
fn caption_column(file: &str, name: &str, col: &ArrayRef) -> Result<Vec<RawCaption>, ShardsError> {
    let type_err = || ShardsError::ColumnType {
        file: file.to_string(),
        column: name.to_string(),
        found: col.data_type().to_string(),
        expected: "string or binary".into(),
    };
    match col.data_type() {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let bin = cast(col, &DataType::Binary).map_err(|_| type_err())?;
            let bin = bin.as_binary::<i32>();
            Ok((0..bin.len())
                .map(|i| {
                    if bin.is_valid(i) {
                        RawCaption::Bytes(bin.value(i).to_vec())
                    } else {
                        RawCaption::Missing
                    }
                })
                .collect())
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let s = cast(col, &DataType::Utf8).map_err(|_| type_err())?;
            let s = s.as_string::<i32>();
            Ok((0..s.len())
                .map(|i| {
                    if s.is_valid(i) {
                        RawCaption::Text(s.value(i).to_string())
                    } else {
                        RawCaption::Missing
                    }
                })
                .collect())
        }
        _ => Err(type_err()),
    }
}

/// The passthrough columns of a source batch in the output's passthrough schema: absent columns
/// become nulls, others are cast (an impossible cast names the file and column).
fn passthrough_batch(
    file: &str,
    schema: &SchemaRef,
    batch: &RecordBatch,
) -> Result<RecordBatch, ShardsError> {
    let mut cols = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let col = match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => c.clone(),
            Some(c) => cast(c, field.data_type()).map_err(|e| ShardsError::ColumnType {
                file: file.to_string(),
                column: field.name().clone(),
                found: format!("{} ({e})", c.data_type()),
                expected: format!("{} (its type in the first source file)", field.data_type()),
            })?,
            None => new_null_array(field.data_type(), batch.num_rows()),
        };
        cols.push(col);
    }
    RecordBatch::try_new_with_options(
        schema.clone(),
        cols,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| ShardsError::Arrow {
        file: file.to_string(),
        source: e,
    })
}

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
    let path_i =
        pick(&refs, &["path", "file", "image", "filename"]).ok_or_else(|| missing("path"))?;
    let cap_i = pick(&refs, &["caption", "text", "txt"]).ok_or_else(|| missing("caption"))?;
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
        out.push(CaptionEntry { path, key, caption });
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
        let path = field(&["path", "file", "image", "filename"])
            .ok_or_else(|| bad("no \"path\" field".into()))?;
        let caption = match field(&["caption", "text", "txt"]) {
            Some(c) => RawCaption::Text(c),
            None => RawCaption::Missing,
        };
        let key = v.get("key").map(|k| match k.as_str() {
            Some(s) => s.to_string(),
            None => k.to_string(),
        });
        out.push(CaptionEntry { path, key, caption });
    }
    Ok(out)
}

/// One image of a folder source; a listed image that is not there is a bad row, not a broken build.
async fn fetch_image(
    root: Location,
    path: String,
) -> Result<(Arc<str>, Option<Bytes>), ShardsError> {
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

async fn produce_folder(
    root: &Location,
    entries: &[CaptionEntry],
    tx: &mpsc::Sender<Result<RawBatch, ShardsError>>,
) -> Result<(), ShardsError> {
    let mut index = 0u64;
    for chunk in entries.chunks(BATCH_ROWS) {
        // Fetch a batch of images concurrently: object stores reward parallel GETs.
        let fetches: Vec<_> = chunk
            .iter()
            .map(|e| fetch_image(root.clone(), e.path.clone()))
            .collect();
        let fetched: Vec<FetchedImage> =
            futures::stream::iter(fetches).buffered(16).collect().await;
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
                passthrough: None,
            });
            index += 1;
        }
        if tx.send(Ok(RawBatch { rows, bytes })).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

impl InputPlan {
    /// What identifies these inputs for resuming: files with sizes and row counts, column
    /// choices or generator settings.
    pub fn describe(&self) -> serde_json::Value {
        let kind = match &self.kind {
            Kind::Parquet(c) => serde_json::json!({ "parquet": c }),
            Kind::Folder { root, entries } => {
                serde_json::json!({ "folder": root.url(), "entries": entries.len() })
            }
            Kind::Synth(o) => serde_json::json!({ "synth": o }),
        };
        serde_json::json!({
            "kind": kind,
            "files": self.files,
            "passthrough": self.passthrough.fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect::<Vec<_>>(),
            "rows": self.total_rows,
        })
    }
}

/// An image fetched for a row: its source name and bytes (None = missing).
type FetchedImage = Result<(Arc<str>, Option<Bytes>), ShardsError>;
