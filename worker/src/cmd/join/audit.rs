//! Audit log: each worker records, durably, the sample keys it feeds into a step before the
//! step's all-reduce, and marks the step applied after its optimizer update. Tests read these
//! records to prove exactly-once from what really happened, not from the coordinator's books.
//!
//! One object per record under `<run.dir>/audit/<worker_id>/` (object stores cannot append):
//! `g<generation>-s<step>-fed.json` and `…-applied.json`, so the log lives wherever the run
//! directory does (a path or any object-store URL).

use ferroclip_shards::retry::store_retry;
use ferroclip_shards::store::Location;
use ferroclip_shards::StoreOptions;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    Fed {
        generation: u64,
        step: u64,
        rank: u32,
        keys: Vec<String>,
    },
    Applied {
        generation: u64,
        step: u64,
        /// A checksum of the parameters after the update: equal on every rank.
        checksum: f64,
    },
}

impl Record {
    fn object_name(&self) -> String {
        match self {
            Record::Fed {
                generation, step, ..
            } => format!("g{generation:08}-s{step:010}-fed.json"),
            Record::Applied {
                generation, step, ..
            } => format!("g{generation:08}-s{step:010}-applied.json"),
        }
    }
}

pub struct Audit {
    dir: Location,
    opts: StoreOptions,
    rt: tokio::runtime::Handle,
}

impl Audit {
    /// Records of `worker_id` go under `<run_dir>/audit/<worker_id>/`.
    pub fn open(
        run_dir: &str,
        worker_id: &str,
        opts: &StoreOptions,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let url = format!("{}/audit/{worker_id}", run_dir.trim_end_matches('/'));
        Ok(Self {
            dir: Location::open(&url, opts)?,
            opts: opts.clone(),
            rt,
        })
    }

    /// Writes one record durably (fsynced on a local file system); call from outside the runtime.
    pub fn write(&mut self, record: &Record) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(record)?;
        let loc = self.dir.join(&record.object_name());
        let budget = self.opts.retry_budget;
        self.rt.block_on(store_retry(
            &format!("writing {}", loc.url()),
            budget,
            || loc.store.put(&loc.path, PutPayload::from(bytes.clone())),
        ))?;
        loc.sync(&loc.path)?;
        Ok(())
    }
}
