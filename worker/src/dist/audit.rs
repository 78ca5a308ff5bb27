//! Audit log: each worker appends, durably, the sample keys it feeds into a step before the
//! step's all-reduce, and marks the step applied after its optimizer update. Tests read these
//! files to prove exactly-once from what really happened, not from the coordinator's books.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

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

pub struct Audit {
    file: File,
}

impl Audit {
    /// Opens `<dir>/<worker_id>.jsonl` for appending.
    pub fn open(dir: &Path, worker_id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{worker_id}.jsonl")))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()
    }
}

/// Reads every record of an audit directory, per worker file.
pub fn read_dir(dir: &Path) -> std::io::Result<Vec<(String, Vec<Record>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let worker = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        // A worker killed mid-write may leave a torn last line: it was never fsynced whole.
        let records = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        out.push((worker, records));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
