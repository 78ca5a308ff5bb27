//! img2dataset's `files` layout: `KEY.jpg` + `KEY.txt` (+ `KEY.json`) objects in numbered
//! folders, listed up front and fetched a batch at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::json::json_schema;
use super::{rows, split_key, Sample, WdsFields};
use crate::error::ShardsError;
use crate::source::{Input, InputPlan, Sink, BATCH_ROWS};
use crate::store::{Location, StoreOptions};

/// The `files` layout: every sample's objects, listed up front.
pub(crate) struct FilesInput {
    root: Location,
    samples: Vec<(String, Vec<(String, object_store::path::Path)>)>,
    fields: WdsFields,
}

impl InputPlan {
    /// img2dataset's `files` layout under `src`: `KEY.jpg` + `KEY.txt` (+ `KEY.json`) objects.
    pub async fn files_layout(
        src: &str,
        fields: WdsFields,
        opts: &StoreOptions,
    ) -> Result<InputPlan, ShardsError> {
        let root = Location::open(src, opts)?;
        let mut listed: Vec<_> = root
            .store
            .list(Some(&root.path))
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| ShardsError::store(root.url(), e))?;
        listed.sort_by(|a, b| a.location.cmp(&b.location));
        let mut samples: Vec<(String, Vec<(String, object_store::path::Path)>)> = Vec::new();
        for m in listed {
            let rel = root.relative(&m.location);
            let Some((key, ext)) = split_key(&rel) else {
                continue;
            };
            match samples.last_mut() {
                Some((k, members)) if *k == key => members.push((ext, m.location)),
                _ => samples.push((key, vec![(ext, m.location)])),
            }
        }
        samples.retain(|(_, members)| {
            members
                .iter()
                .any(|(e, _)| *e == fields.caption_ext || fields.image_exts.contains(e))
        });
        if samples.is_empty() {
            return Err(ShardsError::EmptySource(format!(
                "{src} (no KEY.{} / KEY.{} files)",
                fields.image_exts.join("|"),
                fields.caption_ext
            )));
        }
        // The first `.json`'s fields are the passthrough columns.
        let first_json: Vec<_> = samples
            .iter()
            .flat_map(|(_, members)| members.iter().filter(|(ext, _)| ext == "json"))
            .take(1)
            .cloned()
            .collect();
        let first = Sample {
            key: String::new(),
            members: fetch_members(&root, &first_json).await?,
        };
        let total_rows = samples.len() as u64;
        Ok(InputPlan {
            passthrough: json_schema(&first),
            input: Input::Files(FilesInput {
                root,
                samples,
                fields,
            }),
            total_rows,
            splits: None,
        })
    }
}

async fn fetch_members(
    root: &Location,
    members: &[(String, object_store::path::Path)],
) -> Result<BTreeMap<String, Bytes>, ShardsError> {
    let mut out = BTreeMap::new();
    for (ext, path) in members {
        let loc = root.with_path(path.clone());
        let bytes = crate::reader::get_all(&loc).await?;
        out.insert(ext.clone(), bytes);
    }
    Ok(out)
}

/// One sample of the files layout, fetched (owned arguments: the futures run concurrently).
async fn fetch_sample(
    root: Location,
    key: String,
    members: Vec<(String, object_store::path::Path)>,
) -> Result<Sample, ShardsError> {
    // img2dataset's keys are unique on their own; the numbered folder is not part of them.
    let key = key.rsplit('/').next().unwrap_or(&key).to_string();
    Ok(Sample {
        key,
        members: fetch_members(&root, &members).await?,
    })
}

impl FilesInput {
    pub(crate) fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "files": self.root.url(), "samples": self.samples.len(), "fields": self.fields })
    }

    /// Fetches each batch's objects concurrently and streams its samples in order.
    pub(crate) async fn produce(&self, schema: &SchemaRef, tx: &Sink) -> Result<(), ShardsError> {
        let source: Arc<str> = Arc::from(self.root.url().as_str());
        let mut index = 0u64;
        for chunk in self.samples.chunks(BATCH_ROWS) {
            let fetches: Vec<_> = chunk
                .iter()
                .map(|(key, members)| fetch_sample(self.root.clone(), key.clone(), members.clone()))
                .collect();
            let fetched: Vec<Result<Sample, ShardsError>> =
                futures::stream::iter(fetches).buffered(16).collect().await;
            let samples = fetched.into_iter().collect::<Result<Vec<_>, _>>()?;
            let raw = rows(&source, index, index, &samples, &self.fields, schema)?;
            if tx.send(Ok(raw)).await.is_err() {
                return Ok(());
            }
            index += samples.len() as u64;
        }
        Ok(())
    }
}
