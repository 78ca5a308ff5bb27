//! Webdataset tar shards: listed (and sized) up front, then streamed one after another, sample
//! by sample, as they download.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use super::json::json_schema;
use super::tar::TarReader;
use super::{expand_braces, rows, Grouper, Sample, WdsFields};
use crate::error::ShardsError;
use crate::source::{Input, InputFile, InputPlan, Sink, BATCH_ROWS};
use crate::store::{Location, StoreOptions};

/// Tar shards, listed (and sized) up front, read one after another.
pub(crate) struct TarInput {
    tars: Vec<(Location, u64)>,
    fields: WdsFields,
}

impl InputPlan {
    /// Webdataset tar shards: `.tar` URLs, brace patterns of them, or prefixes holding them.
    pub async fn webdataset(
        srcs: &[String],
        fields: WdsFields,
        opts: &StoreOptions,
    ) -> Result<InputPlan, ShardsError> {
        let mut tars = Vec::new();
        for src in srcs {
            let urls = expand_braces(src).map_err(|m| ShardsError::bad_input(src, m))?;
            for url in urls {
                let loc = Location::open(&url, opts)?;
                if url.ends_with(".tar") {
                    let meta = loc
                        .store
                        .head(&loc.path)
                        .await
                        .map_err(|e| ShardsError::store(&url, e))?;
                    tars.push((loc, meta.size));
                } else {
                    let mut found: Vec<_> = loc
                        .store
                        .list(Some(&loc.path))
                        .try_collect::<Vec<_>>()
                        .await
                        .map_err(|e| ShardsError::store(&url, e))?;
                    found.retain(|m| m.location.as_ref().ends_with(".tar"));
                    found.sort_by(|a, b| a.location.cmp(&b.location));
                    if found.is_empty() {
                        return Err(ShardsError::EmptySource(format!("{url} (no .tar files)")));
                    }
                    tars.extend(
                        found
                            .into_iter()
                            .map(|m| (loc.with_path(m.location), m.size)),
                    );
                }
            }
        }
        // The first sample's .json fields are the passthrough columns.
        let (first, _) = &tars[0];
        let mut reader = TarReader::new(
            &first.url(),
            first
                .store
                .get(&first.path)
                .await
                .map_err(|e| ShardsError::store(first.url(), e))?
                .into_stream(),
        );
        // The first `.json` (of the first tar)'s fields are the passthrough columns.
        let mut grouper = Grouper::default();
        let mut first_json = None;
        let mut any = false;
        while first_json.is_none() {
            let member = reader.next_member().await?;
            let end = member.is_none();
            let done = match member {
                Some(m) => grouper.push(&m.name, m.data),
                None => grouper.finish(),
            };
            if let Some(sample) = done {
                any = true;
                first_json = sample.members.contains_key("json").then_some(sample);
            }
            if end {
                break;
            }
        }
        if !any {
            return Err(ShardsError::EmptySource(format!(
                "{} (no samples)",
                first.url()
            )));
        }
        let sample = first_json.unwrap_or(Sample {
            key: String::new(),
            members: BTreeMap::new(),
        });
        Ok(InputPlan {
            passthrough: json_schema(&sample),
            input: Input::Tar(TarInput { tars, fields }),
            // Unknown until read: tars are streamed, not listed member by member.
            total_rows: 0,
            splits: None,
        })
    }
}

impl TarInput {
    pub(crate) fn files(&self) -> Vec<InputFile> {
        self.tars
            .iter()
            .map(|(loc, size)| InputFile {
                url: loc.url(),
                size: *size,
                rows: 0,
            })
            .collect()
    }

    pub(crate) fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "webdataset": self.fields })
    }

    /// Streams every tar in order, sample by sample.
    pub(crate) async fn produce(&self, schema: &SchemaRef, tx: &Sink) -> Result<(), ShardsError> {
        let mut index = 0u64;
        for (loc, _) in &self.tars {
            let url = loc.url();
            let source: Arc<str> = Arc::from(url.as_str());
            let got = loc
                .store
                .get(&loc.path)
                .await
                .map_err(|e| ShardsError::store(&url, e))?;
            let mut reader = TarReader::new(&url, got.into_stream());
            let (mut grouper, mut batch, mut row) = (Grouper::default(), Vec::new(), 0u64);
            loop {
                let member = reader.next_member().await?;
                let end = member.is_none();
                let done = match member {
                    Some(m) => grouper.push(&m.name, m.data),
                    None => grouper.finish(),
                };
                batch.extend(done);
                if batch.len() >= BATCH_ROWS || (end && !batch.is_empty()) {
                    let n = batch.len() as u64;
                    let raw = rows(&source, index, row, &batch, &self.fields, schema)?;
                    if tx.send(Ok(raw)).await.is_err() {
                        return Ok(());
                    }
                    (index, row) = (index + n, row + n);
                    batch.clear();
                }
                if end {
                    break;
                }
            }
        }
        Ok(())
    }
}
