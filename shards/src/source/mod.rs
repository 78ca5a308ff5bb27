//! Build inputs: Parquet files/prefixes, a folder of images with a captions file, or the synthetic
//! generator. Planning lists and checks every input up front (missing columns, unreadable files and
//! bad credentials stop the build before any work); producing streams rows in a fixed order.
//!
//! One file per input kind: [`parquet`] (img2dataset-style Parquet, passthrough columns),
//! [`folder`] (images with captions from CSV or JSONL, or from a captioning dataset's annotation
//! file read by [`annotations`]) and [`synth`] (the generator's rows). This file holds what they
//! share: the rows they produce, the plan, and the dispatch over kinds.

pub mod annotations;
mod folder;
mod parquet;
mod synth;
pub mod webdataset;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ShardsError;
use crate::synth::SynthOptions;
use crate::validate::RawCaption;

pub use self::parquet::ColumnNames;

/// Rows per batch handed to the validation stage.
pub const BATCH_ROWS: usize = 128;

/// One input row, in input order.
#[derive(Clone, Debug)]
pub struct RawRow {
    /// Position in the whole input (all sources, in order): the build's resume cursor.
    pub index: u64,
    pub source: Arc<str>,
    pub source_row: u64,
    pub key: String,
    pub image: Option<Bytes>,
    pub caption: RawCaption,
    pub passthrough: Option<(Arc<RecordBatch>, usize)>,
    /// The row's split, an index into [`InputPlan::splits`], when the source names splits.
    pub split: Option<u16>,
}

pub struct RawBatch {
    pub rows: Vec<RawRow>,
    pub bytes: u64,
}

/// Where produced batches go.
type Sink = mpsc::Sender<Result<RawBatch, ShardsError>>;

/// A file the build reads, as it identifies the inputs for resuming: a Parquet file, or a folder's
/// captions file.
#[derive(Clone, Debug, Serialize)]
pub struct InputFile {
    pub url: String,
    pub size: u64,
    pub rows: u64,
}

/// The inputs of one kind, with what only that kind needs.
enum Input {
    Parquet(parquet::ParquetInput),
    Folder(folder::FolderInput),
    Tar(webdataset::TarInput),
    Files(webdataset::FilesInput),
    Synth(SynthOptions),
}

/// Everything a build reads, resolved and checked.
pub struct InputPlan {
    input: Input,
    pub passthrough: SchemaRef,
    pub total_rows: u64,
    /// The splits the source assigns (annotation files); None: the build splits by key hash.
    pub splits: Option<Vec<String>>,
}

impl InputPlan {
    /// Streams every input row in order into `tx`. Stops early if the receiver is gone.
    pub async fn produce(self: Arc<Self>, tx: Sink) {
        let result = match &self.input {
            Input::Parquet(p) => p.produce(&self.passthrough, &tx).await,
            Input::Folder(f) => f.produce(&tx).await,
            Input::Tar(t) => t.produce(&self.passthrough, &tx).await,
            Input::Files(f) => f.produce(&self.passthrough, &tx).await,
            Input::Synth(o) => synth::produce(o.clone(), &tx).await,
        };
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    }

    /// The files read, with sizes and row counts (none for the generator).
    pub fn files(&self) -> Vec<InputFile> {
        match &self.input {
            Input::Parquet(p) => p.files(),
            Input::Folder(f) => vec![f.captions_file()],
            Input::Tar(t) => t.files(),
            Input::Files(_) | Input::Synth(_) => vec![],
        }
    }

    /// What identifies these inputs for resuming: files with sizes and row counts, column
    /// choices or generator settings.
    pub fn describe(&self) -> serde_json::Value {
        let kind = match &self.input {
            Input::Parquet(p) => serde_json::json!({ "parquet": p.columns() }),
            Input::Folder(f) => f.describe(),
            Input::Tar(t) => t.describe(),
            Input::Files(f) => f.describe(),
            Input::Synth(o) => serde_json::json!({ "synth": o }),
        };
        serde_json::json!({
            "kind": kind,
            "files": self.files(),
            "passthrough": self.passthrough.fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect::<Vec<_>>(),
            "rows": self.total_rows,
        })
    }
}
