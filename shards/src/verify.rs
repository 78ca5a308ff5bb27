//! `shards verify`: every shard's size and sha256 against the manifest, its row groups against the
//! manifest, and every image decodes. One shard is in memory at a time.

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::ShardsError;
use crate::manifest::*;
use crate::reader::{get_all, samples_from_batch, Sample};
use crate::store::{Location, StoreOptions};
use crate::validate::decoded_size;

/// A shard that failed, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct BadShard {
    pub path: String,
    pub problem: String,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub shards: usize,
    pub rows: u64,
    pub bad: Vec<BadShard>,
}

pub async fn verify(url: &str, opts: &StoreOptions) -> Result<VerifyReport, ShardsError> {
    let root = Location::open(url, opts)?;
    let mloc = root.join(MANIFEST_FILE);
    let manifest = Manifest::parse(&mloc.url(), &get_all(&mloc).await?)?;
    let mut report = VerifyReport::default();
    for split in manifest.splits.values() {
        for shard in &split.shards {
            report.shards += 1;
            let loc = root.join(&shard.path);
            match check(&loc, shard).await {
                Ok(rows) => report.rows += rows,
                Err(problem) => {
                    tracing::error!(shard = %loc.url(), %problem, "bad shard");
                    report.bad.push(BadShard {
                        path: shard.path.clone(),
                        problem,
                    });
                }
            }
        }
    }
    Ok(report)
}

async fn check(loc: &Location, shard: &ShardInfo) -> Result<u64, String> {
    let bytes = get_all(loc).await.map_err(|e| e.to_string())?;
    if bytes.len() as u64 != shard.bytes {
        return Err(format!(
            "size {} bytes, manifest says {}",
            bytes.len(),
            shard.bytes
        ));
    }
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != shard.sha256 {
        return Err(format!("sha256 {sha}, manifest says {}", shard.sha256));
    }
    let url = loc.url();
    tokio::task::spawn_blocking(move || {
        // The parquet crate panics on some corrupt files: that is a bad shard, not a crash.
        std::panic::catch_unwind(|| decode_all(&url, bytes))
            .unwrap_or_else(|p| Err(format!("unreadable Parquet: {}", crate::pq::corrupt(&*p))))
    })
    .await
    .map_err(|e| e.to_string())?
    .and_then(|(rows, rgs)| {
        if rgs != shard.row_groups {
            Err(format!(
                "row groups {rgs:?}, manifest says {:?}",
                shard.row_groups
            ))
        } else {
            Ok(rows)
        }
    })
}

fn decode_all(url: &str, bytes: bytes::Bytes) -> Result<(u64, Vec<u64>), String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .map_err(|e| format!("unreadable Parquet: {e}"))?;
    // parquet 60.1 can spin for seconds on a corrupt page header (`page_headers`).
    for rg in 0..builder.metadata().num_row_groups() {
        crate::page_headers::check_row_group(builder.metadata(), rg, &bytes, 0)
            .map_err(|m| format!("unreadable Parquet: {m}"))?;
    }
    let rgs: Vec<u64> = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows() as u64)
        .collect();
    let reader = builder
        .with_batch_size(256)
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| format!("unreadable Parquet: {e}"))?;
        let mut samples: Vec<Sample> = Vec::new();
        samples_from_batch(url, &batch, &mut samples).map_err(|e| e.to_string())?;
        let bad: Option<String> =
            samples
                .par_iter()
                .find_map_first(|s| match decoded_size(&s.image) {
                    Ok(size) if size == (s.width, s.height) => None,
                    Ok((w, h)) => Some(format!(
                        "row {}: image is {w}x{h}, row says {}x{}",
                        s.key, s.width, s.height
                    )),
                    Err(e) => Some(format!("row {}: image does not decode: {e}", s.key)),
                });
        if let Some(b) = bad {
            return Err(b);
        }
        rows += samples.len() as u64;
    }
    Ok((rows, rgs))
}
