//! img2dataset-style Parquet inputs: files or prefixes of `.parquet` objects with an image column
//! (binary, or Hugging Face's `{bytes, path}` struct), a caption column and an optional key column.
//! Every other column is passed through to the output, typed as in the first file.

use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use serde::Serialize;

use super::{Input, InputFile, InputPlan, RawBatch, RawRow, Sink, BATCH_ROWS};
use crate::error::ShardsError;
use crate::manifest::*;
use crate::pq::{load_metadata, ObjectReader};
use crate::store::{Location, StoreOptions};
use crate::validate::RawCaption;

/// Column names in Parquet sources.
#[derive(Clone, Debug, Serialize)]
pub struct ColumnNames {
    pub image: String,
    /// None: `caption`, falling back to `txt`.
    pub text: Option<String>,
    pub key: Option<String>,
}

/// Parquet files, listed and with their footers read and checked.
pub(super) struct ParquetInput {
    cols: ColumnNames,
    files: Vec<ParquetFile>,
}

/// One `.parquet` object found by listing.
struct Listed {
    loc: Location,
    size: u64,
}

/// One planned Parquet file: its footer and the caption column chosen for it.
struct ParquetFile {
    url: String,
    loc: Location,
    size: u64,
    rows: u64,
    meta: ArrowReaderMetadata,
    text_col: String,
}

impl InputPlan {
    pub async fn parquet(
        srcs: &[String],
        cols: ColumnNames,
        opts: &StoreOptions,
    ) -> Result<InputPlan, ShardsError> {
        let mut listed = Vec::new();
        for src in srcs {
            let loc = Location::open(src, opts)?;
            let found = list_parquet(&loc).await?;
            if found.is_empty() {
                return Err(ShardsError::EmptySource(format!(
                    "{src} (no Parquet files)"
                )));
            }
            listed.extend(found);
        }
        let mut passthrough: Option<SchemaRef> = None;
        let mut files = Vec::with_capacity(listed.len());
        for Listed { loc, size } in listed {
            let file = plan_file(loc, size, &cols).await?;
            if passthrough.is_none() {
                passthrough = Some(passthrough_schema(&file, &cols));
            }
            files.push(file);
        }
        let total_rows = files.iter().map(|f| f.rows).sum();
        if total_rows == 0 {
            return Err(ShardsError::EmptySource(format!(
                "{} (0 rows)",
                srcs.join(", ")
            )));
        }
        Ok(InputPlan {
            input: Input::Parquet(ParquetInput { cols, files }),
            passthrough: passthrough.unwrap_or_else(|| Arc::new(Schema::empty())),
            total_rows,
            splits: None,
        })
    }
}

/// Reads one file's footer and checks it has the columns asked for.
async fn plan_file(
    loc: Location,
    size: u64,
    cols: &ColumnNames,
) -> Result<ParquetFile, ShardsError> {
    let url = loc.url();
    let mut reader = ObjectReader {
        store: loc.store.clone(),
        path: loc.path.clone(),
        size,
    };
    let meta = load_metadata(&mut reader)
        .await
        .map_err(|e| ShardsError::parquet(&url, e))?;
    let schema = meta.schema().clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let missing = |column: &str| ShardsError::MissingColumn {
        file: url.clone(),
        column: column.to_string(),
        available: names.join(", "),
    };
    if !names.contains(&cols.image.as_str()) {
        return Err(missing(&cols.image));
    }
    let text_col = match &cols.text {
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
    let rows = meta.metadata().file_metadata().num_rows().max(0) as u64;
    Ok(ParquetFile {
        url,
        loc,
        size,
        rows,
        meta,
        text_col,
    })
}

/// The columns passed through to the output: all of `file`'s but the image, caption and key
/// columns and those the output writes itself, all nullable.
fn passthrough_schema(file: &ParquetFile, cols: &ColumnNames) -> SchemaRef {
    let key_col = cols.key.clone().unwrap_or_else(|| "key".into());
    let skip = [
        cols.image.as_str(),
        file.text_col.as_str(),
        key_col.as_str(),
        COL_KEY,
        COL_IMAGE,
        COL_CAPTION,
        COL_WIDTH,
        COL_HEIGHT,
    ];
    let fields: Vec<Field> = file
        .meta
        .schema()
        .fields()
        .iter()
        .filter(|fl| !skip.contains(&fl.name().as_str()))
        .map(|fl| Field::new(fl.name(), fl.data_type().clone(), true))
        .collect();
    Arc::new(Schema::new(fields))
}

impl ParquetInput {
    pub(super) fn columns(&self) -> &ColumnNames {
        &self.cols
    }

    pub(super) fn files(&self) -> Vec<InputFile> {
        self.files
            .iter()
            .map(|f| InputFile {
                url: f.url.clone(),
                size: f.size,
                rows: f.rows,
            })
            .collect()
    }

    /// Streams every file's rows in order, `BATCH_ROWS` at a time.
    pub(super) async fn produce(
        &self,
        passthrough: &SchemaRef,
        tx: &Sink,
    ) -> Result<(), ShardsError> {
        let mut index = 0u64;
        for f in &self.files {
            let reader = ObjectReader {
                store: f.loc.store.clone(),
                path: f.loc.path.clone(),
                size: f.size,
            };
            let mut stream =
                ParquetRecordBatchStreamBuilder::new_with_metadata(reader, f.meta.clone())
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
                let at = Position {
                    source: &source,
                    stem: &stem,
                    first_index: index,
                    first_row: row,
                };
                let rb = self.convert_batch(f, passthrough, &batch, at)?;
                index += rb.rows.len() as u64;
                row += rb.rows.len() as u64;
                if tx.send(Ok(rb)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn convert_batch(
        &self,
        f: &ParquetFile,
        passthrough: &SchemaRef,
        batch: &RecordBatch,
        at: Position<'_>,
    ) -> Result<RawBatch, ShardsError> {
        let cols = &self.cols;
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
        let passthrough = Arc::new(passthrough_batch(&f.url, passthrough, batch)?);
        let mut rows = Vec::with_capacity(batch.num_rows());
        let mut bytes = 0u64;
        for i in 0..batch.num_rows() {
            let source_row = at.first_row + i as u64;
            let key = match keys {
                Some(k) if k.is_valid(i) => k.value(i).to_string(),
                _ => format!("{}-{source_row:09}", at.stem),
            };
            let image = images[i].clone();
            bytes += image.as_ref().map_or(0, |b| b.len() as u64);
            rows.push(RawRow {
                index: at.first_index + i as u64,
                source: at.source.clone(),
                source_row,
                key,
                image,
                caption: captions[i].clone(),
                passthrough: Some((passthrough.clone(), i)),
                split: None,
            });
        }
        Ok(RawBatch { rows, bytes })
    }
}

/// Where a batch starts: in the whole input and in its file.
#[derive(Clone, Copy)]
struct Position<'a> {
    source: &'a Arc<str>,
    /// The file name without `.parquet`: keys of rows without one are `<stem>-<row>`.
    stem: &'a str,
    first_index: u64,
    first_row: u64,
}

fn file_stem(url: &str) -> String {
    let name = url.rsplit('/').next().unwrap_or(url);
    name.strip_suffix(".parquet").unwrap_or(name).to_string()
}

/// A URL naming a `.parquet` object is that file; otherwise every `.parquet` below the prefix, sorted.
async fn list_parquet(loc: &Location) -> Result<Vec<Listed>, ShardsError> {
    if loc.path.as_ref().ends_with(".parquet") {
        let meta = loc
            .store
            .head(&loc.path)
            .await
            .map_err(|e| ShardsError::store(loc.url(), e))?;
        return Ok(vec![Listed {
            loc: loc.clone(),
            size: meta.size,
        }]);
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
        .map(|m| Listed {
            loc: loc.with_path(m.location.clone()),
            size: m.size,
        })
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
