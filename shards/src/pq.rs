//! Parquet over object_store: an `AsyncFileReader` for whole objects, one that serves a single
//! prefetched byte range (a block), and a writer that hashes what it uploads.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData, ParquetMetaDataReader};

fn to_parquet_err(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

/// Reads a Parquet object with ranged GETs.
#[derive(Clone, Debug)]
pub struct ObjectReader {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    pub size: u64,
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(to_parquet_err)
        }
        .boxed()
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Vec<Bytes>>> {
        async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(to_parquet_err)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                // One GET usually covers the footer of our shards.
                .with_prefetch_hint(Some(64 * 1024))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// Loads the footer of an object of known size.
pub async fn load_metadata(reader: &mut ObjectReader) -> Result<ArrowReaderMetadata> {
    guard(async {
        let meta = reader.get_metadata(None).await?;
        ArrowReaderMetadata::try_new(meta, ArrowReaderOptions::new())
    })
    .await
}

/// Runs a Parquet decode, turning a panic inside the parquet crate into an error: it has some
/// on corrupt files (parquet 60.1 divides by zero in `ByteArrayDecoderPlain::read` when a
/// dictionary page declares zero values; found by `fuzz_shard_reader`).
pub(crate) async fn guard<T>(decode: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match std::panic::AssertUnwindSafe(decode).catch_unwind().await {
        Ok(r) => r,
        Err(p) => Err(corrupt(&*p)),
    }
}

/// The error of a decode that panicked: the file is corrupt.
pub(crate) fn corrupt(panic: &(dyn std::any::Any + Send)) -> ParquetError {
    let why = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    ParquetError::General(format!("the decoder failed on corrupt data ({why})"))
}

/// Serves one byte range fetched in advance (a row group) plus cached metadata: decoding a block
/// then needs no further I/O.
pub struct RangeReader {
    pub base: u64,
    pub data: Bytes,
    pub metadata: Arc<ParquetMetaData>,
}

impl AsyncFileReader for RangeReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes>> {
        let out = if range.start < self.base || range.end > self.base + self.data.len() as u64 {
            Err(ParquetError::General(format!(
                "range {range:?} outside the prefetched block {}..{}",
                self.base,
                self.base + self.data.len() as u64
            )))
        } else {
            Ok(self
                .data
                .slice((range.start - self.base) as usize..(range.end - self.base) as usize))
        };
        futures::future::ready(out).boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>>> {
        futures::future::ready(Ok(self.metadata.clone())).boxed()
    }
}

/// The byte range covering every column chunk of a row group. A footer with a negative or
/// overflowing offset or size (a corrupt file) is an error, not a panic.
pub fn row_group_range(
    meta: &ParquetMetaData,
    rg: usize,
) -> std::result::Result<Range<u64>, String> {
    let mut start = u64::MAX;
    let mut end = 0;
    for (c, col) in meta.row_group(rg).columns().iter().enumerate() {
        let r = chunk_range(col).map_err(|m| format!("row group {rg}, column {c}: {m}"))?;
        start = start.min(r.start);
        end = end.max(r.end);
    }
    Ok(if start > end { 0..0 } else { start..end })
}

/// A column chunk's bytes in the file: from its first page (the dictionary's, if any) for its
/// compressed size. `ColumnChunkMetaData::byte_range` asserts these are non-negative; a corrupt
/// footer's negative or overflowing values are an error here.
pub fn chunk_range(col: &ColumnChunkMetaData) -> std::result::Result<Range<u64>, String> {
    let offset = col
        .dictionary_page_offset()
        .unwrap_or_else(|| col.data_page_offset());
    u64::try_from(offset)
        .ok()
        .zip(u64::try_from(col.compressed_size()).ok())
        .and_then(|(s, len)| Some(s..s.checked_add(len)?))
        .ok_or_else(|| {
            format!(
                "invalid byte range (offset {offset}, size {}) in the footer",
                col.compressed_size()
            )
        })
}

#[cfg(feature = "build")]
pub use hashing::HashingWriter;

#[cfg(feature = "build")]
mod hashing {
    use std::sync::{Arc, Mutex};

    use futures::future::BoxFuture;
    use futures::FutureExt;
    use object_store::buffered::BufWriter;
    use object_store::path::Path;
    use object_store::ObjectStore;
    use parquet::arrow::async_writer::AsyncFileWriter;
    use parquet::errors::{ParquetError, Result};
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncWriteExt;

    use bytes::Bytes;

    /// Uploads through object_store's `BufWriter` (multipart for big files, atomic on completion)
    /// while hashing, so a shard's sha256 is known without reading it back.
    pub struct HashingWriter {
        inner: BufWriter,
        digest: Arc<Mutex<(Sha256, u64)>>,
    }

    impl HashingWriter {
        pub fn new(store: Arc<dyn ObjectStore>, path: Path) -> (Self, Arc<Mutex<(Sha256, u64)>>) {
            let digest = Arc::new(Mutex::new((Sha256::new(), 0)));
            let w = HashingWriter {
                inner: BufWriter::with_capacity(store, path, 8 * 1024 * 1024),
                digest: digest.clone(),
            };
            (w, digest)
        }
    }

    impl AsyncFileWriter for HashingWriter {
        fn write(&mut self, bs: Bytes) -> BoxFuture<'_, Result<()>> {
            async move {
                {
                    let mut d = self.digest.lock().unwrap_or_else(|p| p.into_inner());
                    d.0.update(&bs);
                    d.1 += bs.len() as u64;
                }
                self.inner.write_all(&bs).await.map_err(ParquetError::from)
            }
            .boxed()
        }

        fn complete(&mut self) -> BoxFuture<'_, Result<()>> {
            async move { self.inner.shutdown().await.map_err(ParquetError::from) }.boxed()
        }
    }
}
