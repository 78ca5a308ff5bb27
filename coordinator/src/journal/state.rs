//! What the journal holds: the run's identity, full snapshots (compactions), the records
//! that change them, and the entries (numbered objects) carrying both.

use std::time::{SystemTime, UNIX_EPOCH};

use ferroclip_plan::{DataState, PendingStep};
use serde::{Deserialize, Serialize};

/// A checkpoint the coordinator has recorded (rank 0 finished writing it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub url: String,
    /// The data position right after `step`: a whole-job resume restarts the plan here.
    pub data: DataState,
}

/// A generation that rolled the run back to a checkpoint: steps after `step` applied before
/// `generation` belong to a history the run abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub generation: u64,
    pub step: u64,
}

/// What a journal belongs to: a coordinator refuses to resume another run's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub run_name: String,
    pub seed: u64,
    pub data_root: String,
    pub train_split: String,
    /// Blocks and rows of the training split, and a hash of every block's row count: the
    /// epoch plans are a function of these.
    pub blocks: u32,
    pub rows: u64,
    pub layout_hash: u64,
    /// `data.shuffle_window_blocks` (the chunks) and `data.lanes` (who feeds what): the ledger's
    /// positions mean something only under the settings that made them. A journal from before
    /// they were kept has no window (not compared) and lanes 0 (the only lanes there were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    #[serde(default)]
    pub lanes: u32,
}

impl Identity {
    pub fn new(
        run_name: &str,
        seed: u64,
        data_root: &str,
        train_split: &str,
        block_rows: &[u32],
    ) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for r in block_rows {
            for b in r.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self {
            run_name: run_name.to_string(),
            seed,
            data_root: data_root.trim_end_matches('/').to_string(),
            train_split: train_split.to_string(),
            blocks: block_rows.len() as u32,
            rows: block_rows.iter().map(|&r| r as u64).sum(),
            layout_hash: h,
            window: None,
            lanes: 0,
        }
    }

    /// This identity with the sample order's settings (`window`, `lanes`).
    pub fn with_order(self, window: u32, lanes: u32) -> Self {
        Self {
            window: Some(window),
            lanes,
            ..self
        }
    }

    /// The identity of a run over `sources` (root, weight) whose splits have these blocks. One
    /// source is `new`'s identity (journals from before mixing resume); several name every root
    /// and weight, and the hash also covers where each source's blocks end.
    pub fn of_sources(
        run_name: &str,
        seed: u64,
        sources: &[(String, f64)],
        train_split: &str,
        plan: &[ferroclip_plan::Source],
    ) -> Self {
        let rows: Vec<u32> = plan
            .iter()
            .flat_map(|s| s.block_rows.iter().copied())
            .collect();
        if let [(root, _)] = sources {
            return Self::new(run_name, seed, root, train_split, &rows);
        }
        let data_root = sources
            .iter()
            .map(|(root, w)| format!("{} (weight {w})", root.trim_end_matches('/')))
            .collect::<Vec<_>>()
            .join(" + ");
        let mut id = Self::new(run_name, seed, &data_root, train_split, &rows);
        for s in plan {
            for b in (s.block_rows.len() as u64).to_le_bytes() {
                id.layout_hash ^= u64::from(b);
                id.layout_hash = id.layout_hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        id
    }

    /// Why `other` (a journal's) is not this run's, if it is not.
    pub fn mismatch(&self, other: &Identity) -> Option<String> {
        if self.run_name != other.run_name {
            return Some(format!(
                "it belongs to run {:?}, this config is run {:?} (run.name)",
                other.run_name, self.run_name
            ));
        }
        if self.seed != other.seed {
            return Some(format!(
                "it was started with run.seed = {}, this config has {}",
                other.seed, self.seed
            ));
        }
        if (&self.data_root, &self.train_split) != (&other.data_root, &other.train_split)
            || (self.blocks, self.rows, self.layout_hash)
                != (other.blocks, other.rows, other.layout_hash)
        {
            return Some(format!(
                "it trains on {} split {:?} ({} blocks, {} rows), this config on {} split {:?} ({} blocks, {} rows)",
                other.data_root, other.train_split, other.blocks, other.rows,
                self.data_root, self.train_split, self.blocks, self.rows
            ));
        }
        if let (Some(ours), Some(theirs)) = (self.window, other.window) {
            if ours != theirs {
                return Some(format!(
                    "it was started with data.shuffle_window_blocks = {theirs}, this config has {ours} (the epoch plan's chunks differ)"
                ));
            }
        }
        if self.lanes != other.lanes {
            return Some(format!(
                "it was started with data.lanes = {}, this config has {} (steps would feed other samples)",
                other.lanes, self.lanes
            ));
        }
        None
    }
}

/// Who wrote a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// Random per process: two coordinators never share one.
    pub nonce: u64,
}

impl Owner {
    pub fn this_process() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            host,
            pid: std::process::id(),
            nonce: nanos ^ (u64::from(std::process::id()) << 32),
        }
    }
}

/// The whole state needed to resume (a journal compaction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub identity: Identity,
    pub generation: u64,
    pub committed_step: u64,
    pub data: DataState,
    /// Assigned, uncommitted steps as keys: restoring assigns them again from `data`.
    pub pending: Vec<PendingStep>,
    pub checkpoints: Vec<CheckpointRecord>,
    pub finished: bool,
    /// The run's rollbacks (absent in journals written before they were kept).
    #[serde(default)]
    pub rollbacks: Vec<Rollback>,
}

/// How a new generation's data starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settle {
    /// Steps up to `applied` commit, later pending ones return to the pool.
    Regroup { applied: u64 },
    /// Back to the recorded checkpoint of `step` (0: the start of the data).
    Rollback { step: u64 },
}

/// One change of the journaled state. Replaying records in order over the snapshot before
/// them gives the state after them: assignments are re-computed (they are a pure function of
/// the state before, the world size and the batch), so no record grows with the world size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    Formed {
        generation: u64,
        settle: Settle,
    },
    Assigned(PendingStep),
    Committed {
        step: u64,
    },
    /// Recorded with the data position of the committed step at that point.
    Checkpoint {
        step: u64,
        url: String,
    },
    /// The oldest `count` checkpoint records were forgotten.
    Pruned {
        count: u32,
    },
    Finished,
}

/// What the state looks like after an entry (every entry carries it: the lease check and
/// people reading the journal need no replay).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub generation: u64,
    pub committed_step: u64,
    pub pending: Vec<PendingStep>,
}

/// One numbered journal object: a compaction (`snapshot`) and/or records, or neither (a lease
/// refresh).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub format_version: u32,
    pub owner: Owner,
    pub written_unix_s: f64,
    /// Written by a coordinator that stopped cleanly: the next one need not wait for a lease.
    pub released: bool,
    #[serde(flatten)]
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Snapshot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Record>,
}
