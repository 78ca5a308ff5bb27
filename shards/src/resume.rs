//! Resuming an interrupted build. Shards are uploaded atomically, so a shard that exists is
//! complete; its footer records the build id, the input rows it holds and its statistics. A re-run
//! keeps the leading run of such shards per split (after checking them) and replays the input,
//! skipping the decode of rows those shards already hold; the output is then byte-identical to an
//! uninterrupted build.

use std::collections::HashSet;

use object_store::ObjectStoreExt;
use parquet::file::metadata::ParquetMetaDataReader;
use sha2::{Digest, Sha256};

use crate::error::ShardsError;
use crate::manifest::{ShardInfo, Stats};
use crate::reader::get_all;
use crate::store::Location;
use crate::writer::{decode_rows, shard_path, FinishedShard, KV_BUILD_ID, KV_INPUT_ROWS, KV_STATS};

/// What the kept shards of one split cover.
#[derive(Debug, Default)]
pub struct SplitResume {
    pub kept: Vec<FinishedShard>,
    /// The last input row held by a kept shard: rows up to here are done for this split.
    pub done_through: Option<u64>,
    pub rows: HashSet<u64>,
}

impl SplitResume {
    pub fn is_done(&self, index: u64) -> bool {
        self.done_through.is_some_and(|d| index <= d)
    }
}

/// Finds the complete shards of `split` written by a build with `build_id`.
pub async fn scan(
    root: &Location,
    split: &str,
    build_id: &str,
) -> Result<SplitResume, ShardsError> {
    let mut out = SplitResume::default();
    for n in 0.. {
        let loc = root.join(&shard_path(split, n));
        match loc.store.head(&loc.path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => break,
            Err(e) => return Err(ShardsError::store(loc.url(), e)),
        }
        let bytes = get_all(&loc).await?;
        match check_shard(&bytes, &shard_path(split, n), build_id) {
            Some(shard) => {
                out.done_through = shard.input_rows.last().copied().or(out.done_through);
                out.rows.extend(shard.input_rows.iter().copied());
                out.kept.push(shard);
            }
            None => {
                tracing::info!(shard = %loc.url(), "not from this build or damaged: rewriting it");
                break;
            }
        }
    }
    if !out.kept.is_empty() {
        tracing::info!(
            split,
            shards = out.kept.len(),
            "resuming: kept finished shards"
        );
    }
    Ok(out)
}

/// A shard is kept if its footer parses, it was written by this build, and its row counts agree.
fn check_shard(bytes: &bytes::Bytes, path: &str, build_id: &str) -> Option<FinishedShard> {
    let meta = ParquetMetaDataReader::new().parse_and_finish(bytes).ok()?;
    let kv = meta.file_metadata().key_value_metadata()?;
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
    if get(KV_BUILD_ID)? != build_id {
        return None;
    }
    let input_rows = decode_rows(&get(KV_INPUT_ROWS)?)?;
    let stats: Stats = serde_json::from_str(&get(KV_STATS)?).ok()?;
    let row_groups: Vec<u64> = meta
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows() as u64)
        .collect();
    let rows: u64 = row_groups.iter().sum();
    if rows != input_rows.len() as u64 || rows == 0 {
        return None;
    }
    Some(FinishedShard {
        info: ShardInfo {
            path: path.to_string(),
            rows,
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            row_groups,
        },
        stats,
        input_rows,
    })
}
