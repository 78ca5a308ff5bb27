//! Writing one split's shards: rows are buffered into a row group (one block), row groups are
//! streamed into the current shard's upload, and a shard is closed when it reaches its size.
//! Memory per split: one row group of rows, its encoded pages, and the upload buffer.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, RecordBatch, StringArray, UInt32Array,
};
use arrow::compute::interleave;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::error::ShardsError;
use crate::manifest::*;
use crate::pq::HashingWriter;
use crate::store::Location;

pub const KV_BUILD_ID: &str = "ferroclip.build_id";
pub const KV_INPUT_ROWS: &str = "ferroclip.input_rows";
pub const KV_STATS: &str = "ferroclip.stats";

/// How big shards and row groups get. A row group closes at whichever limit comes first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sizing {
    pub rows_per_shard: Option<u64>,
    pub target_shard_bytes: u64,
    pub rows_per_row_group: Option<u64>,
    pub row_group_bytes: u64,
}

impl Default for Sizing {
    fn default() -> Self {
        Sizing {
            rows_per_shard: None,
            target_shard_bytes: 256 << 20,
            rows_per_row_group: None,
            row_group_bytes: 4 << 20,
        }
    }
}

pub fn shard_path(split: &str, n: usize) -> String {
    format!("{split}/shard-{n:05}.parquet")
}

/// Whether `name` is one of the fixed columns (a source column of that name cannot pass through).
pub fn is_fixed_column(name: &str) -> bool {
    [COL_KEY, COL_IMAGE, COL_CAPTION, COL_WIDTH, COL_HEIGHT].contains(&name)
}

/// The output schema: fixed columns, then the sources' passthrough columns.
pub fn output_schema(passthrough: &Schema) -> SchemaRef {
    let mut fields = vec![
        Field::new(COL_KEY, DataType::Utf8, false),
        Field::new(COL_IMAGE, DataType::Binary, false),
        Field::new(COL_CAPTION, DataType::Utf8, false),
        Field::new(COL_WIDTH, DataType::UInt32, false),
        Field::new(COL_HEIGHT, DataType::UInt32, false),
    ];
    fields.extend(passthrough.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

fn writer_properties() -> WriterProperties {
    let image = ColumnPath::from(COL_IMAGE);
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        // JPEG bytes do not compress; statistics and dictionaries of images only waste footer space.
        .set_column_compression(image.clone(), Compression::UNCOMPRESSED)
        .set_column_dictionary_enabled(image.clone(), false)
        .set_column_statistics_enabled(image, EnabledStatistics::None)
        // Row groups are cut by this writer (flush), never by parquet's own limits.
        .set_max_row_group_row_count(None)
        .set_max_row_group_bytes(None)
        .build()
}

/// An accepted row on its way into a shard.
pub struct OutRow {
    pub index: u64,
    pub key: String,
    pub image: Bytes,
    pub caption: String,
    pub width: u32,
    pub height: u32,
    pub passthrough: Option<(Arc<RecordBatch>, usize)>,
}

impl OutRow {
    fn payload(&self) -> u64 {
        (self.image.len() + self.caption.len() + self.key.len()) as u64
    }
}

/// What a shard's footer records so a resumed build can keep it without re-reading the input.
#[derive(Clone, Debug)]
pub struct FinishedShard {
    pub info: ShardInfo,
    pub stats: Stats,
    pub input_rows: Vec<u64>,
}

struct OpenShard {
    writer: AsyncArrowWriter<HashingWriter>,
    digest: Arc<std::sync::Mutex<(sha2::Sha256, u64)>>,
    path: String,
    url: String,
    rows: u64,
    payload: u64,
    row_groups: Vec<u64>,
    input_rows: Vec<u64>,
    stats: Stats,
}

pub struct SplitWriter {
    split: String,
    root: Location,
    schema: SchemaRef,
    sizing: Sizing,
    build_id: String,
    pub finished: Vec<FinishedShard>,
    open: Option<OpenShard>,
    buffer: Vec<OutRow>,
    buffer_payload: u64,
}

impl SplitWriter {
    pub fn new(
        split: &str,
        root: Location,
        schema: SchemaRef,
        sizing: Sizing,
        build_id: String,
        kept: Vec<FinishedShard>,
    ) -> Self {
        SplitWriter {
            split: split.to_string(),
            root,
            schema,
            sizing,
            build_id,
            finished: kept,
            open: None,
            buffer: Vec::new(),
            buffer_payload: 0,
        }
    }

    pub async fn push(&mut self, row: OutRow) -> Result<(), ShardsError> {
        self.buffer_payload += row.payload();
        self.buffer.push(row);
        let rows = self.buffer.len() as u64;
        let shard_rows = self.open.as_ref().map_or(0, |s| s.rows) + rows;
        let rg_full = self.sizing.rows_per_row_group.is_some_and(|n| rows >= n)
            || self.buffer_payload >= self.sizing.row_group_bytes
            || self.sizing.rows_per_shard.is_some_and(|n| shard_rows >= n);
        if rg_full {
            self.flush_row_group().await?;
            if self.shard_full() {
                self.close_shard().await?;
            }
        }
        Ok(())
    }

    fn shard_full(&self) -> bool {
        let Some(s) = &self.open else {
            return false;
        };
        match self.sizing.rows_per_shard {
            Some(n) => s.rows >= n,
            None => s.payload >= self.sizing.target_shard_bytes,
        }
    }

    /// Writes what is buffered and closes the last shard.
    pub async fn finish(&mut self) -> Result<(), ShardsError> {
        self.flush_row_group().await?;
        self.close_shard().await
    }

    async fn flush_row_group(&mut self) -> Result<(), ShardsError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            let path = shard_path(&self.split, self.finished.len());
            let loc = self.root.join(&path);
            let (w, digest) = HashingWriter::new(loc.store.clone(), loc.path.clone());
            let writer =
                AsyncArrowWriter::try_new(w, self.schema.clone(), Some(writer_properties()))
                    .map_err(|e| ShardsError::parquet(loc.url(), e))?;
            self.open = Some(OpenShard {
                writer,
                digest,
                url: loc.url(),
                path,
                rows: 0,
                payload: 0,
                row_groups: Vec::new(),
                input_rows: Vec::new(),
                stats: Stats::default(),
            });
        }
        let rows = std::mem::take(&mut self.buffer);
        let payload = std::mem::take(&mut self.buffer_payload);
        let batch = self.to_batch(&rows)?;
        let Some(s) = self.open.as_mut() else {
            return Ok(());
        };
        for r in &rows {
            s.stats.add(
                r.caption.chars().count() as u64,
                r.width,
                r.height,
                r.image.len() as u64,
            );
            s.input_rows.push(r.index);
        }
        s.writer
            .write(&batch)
            .await
            .map_err(|e| ShardsError::parquet(&s.url, e))?;
        s.writer
            .flush()
            .await
            .map_err(|e| ShardsError::parquet(&s.url, e))?;
        s.rows += rows.len() as u64;
        s.payload += payload;
        s.row_groups.push(rows.len() as u64);
        Ok(())
    }

    fn to_batch(&self, rows: &[OutRow]) -> Result<RecordBatch, ShardsError> {
        // The image column sized once: grown by doubling, a row group's megabytes were copied
        // and page-faulted several times over.
        fn images(rows: &[OutRow]) -> BinaryArray {
            let bytes = rows.iter().map(|r| r.image.len()).sum();
            let mut b = BinaryBuilder::with_capacity(rows.len(), bytes);
            for r in rows {
                b.append_value(&r.image);
            }
            b.finish()
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.key.as_str()),
            )),
            Arc::new(images(rows)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.caption.as_str()),
            )),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.width))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.height))),
        ];
        let n_pass = self.schema.fields().len() - cols.len();
        if n_pass > 0 {
            // Gather passthrough values from the source batches the rows came from.
            let mut sources: Vec<Arc<RecordBatch>> = Vec::new();
            let mut indices = Vec::with_capacity(rows.len());
            for r in rows {
                let Some((b, i)) = &r.passthrough else {
                    return Err(ShardsError::Config("row without passthrough values".into()));
                };
                let pos = match sources.iter().position(|s| Arc::ptr_eq(s, b)) {
                    Some(p) => p,
                    None => {
                        sources.push(b.clone());
                        sources.len() - 1
                    }
                };
                indices.push((pos, *i));
            }
            for j in 0..n_pass {
                let values: Vec<&dyn Array> =
                    sources.iter().map(|s| s.column(j).as_ref()).collect();
                cols.push(
                    interleave(&values, &indices).map_err(|e| ShardsError::Arrow {
                        file: self.split.clone(),
                        source: e,
                    })?,
                );
            }
        }
        RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| ShardsError::Arrow {
            file: self.split.clone(),
            source: e,
        })
    }

    async fn close_shard(&mut self) -> Result<(), ShardsError> {
        let Some(mut s) = self.open.take() else {
            return Ok(());
        };
        s.writer.append_key_value_metadata(KeyValue::new(
            KV_BUILD_ID.to_string(),
            self.build_id.clone(),
        ));
        s.writer.append_key_value_metadata(KeyValue::new(
            KV_INPUT_ROWS.to_string(),
            encode_rows(&s.input_rows),
        ));
        s.writer.append_key_value_metadata(KeyValue::new(
            KV_STATS.to_string(),
            serde_json::to_string(&s.stats).unwrap_or_default(),
        ));
        s.writer
            .close()
            .await
            .map_err(|e| ShardsError::parquet(&s.url, e))?;
        let (sha, bytes) = {
            let d = s.digest.lock().unwrap_or_else(|p| p.into_inner());
            (hex::encode(sha2::Digest::finalize(d.0.clone())), d.1)
        };
        tracing::debug!(shard = %s.url, rows = s.rows, bytes, "shard written");
        self.finished.push(FinishedShard {
            info: ShardInfo {
                path: s.path,
                rows: s.rows,
                bytes,
                sha256: sha,
                row_groups: s.row_groups,
            },
            stats: s.stats,
            input_rows: s.input_rows,
        });
        Ok(())
    }
}

/// Input row indices, delta-encoded (mostly small numbers) as a JSON array.
pub fn encode_rows(rows: &[u64]) -> String {
    let mut prev = 0u64;
    let deltas: Vec<u64> = rows
        .iter()
        .map(|&r| {
            let d = r.wrapping_sub(prev);
            prev = r;
            d
        })
        .collect();
    serde_json::to_string(&deltas).unwrap_or_default()
}

pub fn decode_rows(s: &str) -> Option<Vec<u64>> {
    let deltas: Vec<u64> = serde_json::from_str(s).ok()?;
    let mut prev = 0u64;
    Some(
        deltas
            .into_iter()
            .map(|d| {
                prev = prev.wrapping_add(d);
                prev
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_indices_round_trip() {
        let rows = vec![0, 1, 2, 5, 9, 10, 1000];
        assert_eq!(decode_rows(&encode_rows(&rows)).unwrap(), rows);
        assert_eq!(decode_rows(&encode_rows(&[])).unwrap(), Vec::<u64>::new());
    }
}
