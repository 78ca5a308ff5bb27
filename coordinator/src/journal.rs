//! The coordinator's journal: one JSON snapshot of everything needed to resume, replaced
//! atomically (object stores' put is atomic; the local store writes a temp file and renames).
//! It is written before an assignment or a commit is acknowledged, so after a crash nothing a
//! worker was told is unknown to the next coordinator.

use std::sync::Arc;

use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::ledger::{DataState, StepAssignment};

pub const FORMAT_VERSION: u32 = 1;

/// A checkpoint the coordinator has recorded (rank 0 finished writing it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub url: String,
    /// The data position right after `step`: a whole-job resume restarts the plan here.
    pub data: DataState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format_version: u32,
    pub run_name: String,
    pub generation: u64,
    pub committed_step: u64,
    pub data: DataState,
    pub pending: Vec<StepAssignment>,
    pub checkpoints: Vec<CheckpointRecord>,
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("journal {url} is not a valid snapshot: {source}")]
    Corrupt {
        url: String,
        source: serde_json::Error,
    },
    #[error("journal {url} has format version {found}, this coordinator reads {FORMAT_VERSION}")]
    Version { url: String, found: u32 },
}

pub struct Journal {
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: String,
}

impl Journal {
    /// `dir` is the journal directory on `store`; the snapshot is `dir/state.json`.
    pub fn new(store: Arc<dyn ObjectStore>, dir: &Path, url: &str) -> Self {
        Self {
            store,
            path: dir.clone().join("state.json"),
            url: format!("{}/state.json", url.trim_end_matches('/')),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn load(&self) -> Result<Option<Snapshot>, JournalError> {
        let bytes = match self.store.get(&self.path).await {
            Ok(r) => r.bytes().await.map_err(|source| self.err(source))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(self.err(source)),
        };
        let snap: Snapshot =
            serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt {
                url: self.url.clone(),
                source,
            })?;
        if snap.format_version != FORMAT_VERSION {
            return Err(JournalError::Version {
                url: self.url.clone(),
                found: snap.format_version,
            });
        }
        Ok(Some(snap))
    }

    pub async fn save(&self, snap: &Snapshot) -> Result<(), JournalError> {
        // Serialising plain data cannot fail.
        let bytes = serde_json::to_vec(snap).unwrap_or_default();
        self.store
            .put(&self.path, PutPayload::from(bytes))
            .await
            .map_err(|source| self.err(source))?;
        Ok(())
    }

    fn err(&self, source: object_store::Error) -> JournalError {
        JournalError::Store {
            url: self.url.clone(),
            source,
        }
    }
}
