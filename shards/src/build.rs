//! `shards build` (and `synth`, which feeds the same pipeline):
//!
//! ```text
//! source (async, in order) → check on rayon (decode, validate, resize) → dedup + split → SplitWriter
//! ```
//!
//! Bounded memory: at most 4 raw batches queued plus 3 in checking (128 rows each), one row group
//! per split being filled plus its encoded pages and an 8 MiB upload buffer, and the dedup set
//! (16 bytes + table overhead per accepted row: about 30 MB per million rows). Rejected-row records
//! are kept until the end for `--rejects`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use object_store::{ObjectStoreExt, PutPayload};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::error::ShardsError;
use crate::manifest::*;
use crate::reader::get_all;
use crate::resume::{scan, SplitResume};
use crate::source::{InputPlan, RawBatch, RawRow};
use crate::store::{Location, StoreOptions};
use crate::validate::{check_caption, pair_hash, validate, Accepted, Rejection, ValidateOptions};
use crate::writer::{output_schema, OutRow, Sizing, SplitWriter};

pub const SPLITS: [&str; 2] = ["train", "val"];

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub out: String,
    pub val_fraction: f64,
    pub sizing: Sizing,
    pub validate: ValidateOptions,
    pub rejects: Option<String>,
    /// Threads for decode/validate/re-encode; None: all cores.
    pub threads: Option<usize>,
    /// The command line recorded in the manifest.
    pub command: Vec<String>,
    pub progress: bool,
    pub store: StoreOptions,
}

impl BuildOptions {
    pub fn new(out: &str) -> Self {
        BuildOptions {
            out: out.to_string(),
            val_fraction: 0.0,
            sizing: Sizing::default(),
            validate: ValidateOptions::default(),
            rejects: None,
            threads: None,
            command: vec![],
            progress: false,
            store: StoreOptions::default(),
        }
    }
}

pub struct BuildReport {
    pub manifest: Manifest,
    pub elapsed: Duration,
    pub input_bytes: u64,
    pub kept_shards: usize,
    pub already_built: bool,
}

/// One rejected row, as written to `--rejects` (JSON lines).
#[derive(Serialize, Debug, Clone)]
pub struct RejectRecord {
    pub key: String,
    pub source: String,
    pub row: u64,
    pub reason: &'static str,
    pub detail: String,
}

/// Deterministic train/val assignment from the key alone.
pub fn is_val(key: &str, val_fraction: f64) -> bool {
    if val_fraction <= 0.0 {
        return false;
    }
    let d = Sha256::digest(key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) as f64) / (u64::MAX as f64 + 1.0) < val_fraction
}

fn to_strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

enum Verdict {
    New(Accepted),
    /// Held by a kept shard (resume): only its (image, caption) hash is needed.
    Known(u128),
    Rejected(Rejection),
}

struct Checked {
    row: RawRow,
    split: usize,
    verdict: Verdict,
}

struct CheckCtx {
    validate: ValidateOptions,
    val_fraction: f64,
    resume: Vec<SplitResume>,
    pool: Option<rayon::ThreadPool>,
}

impl CheckCtx {
    fn check_batch(&self, batch: RawBatch) -> (Vec<Checked>, u64) {
        let bytes = batch.bytes;
        let run = || {
            batch
                .rows
                .into_par_iter()
                .map(|row| self.check(row))
                .collect::<Vec<_>>()
        };
        let out = match &self.pool {
            Some(p) => p.install(run),
            None => run(),
        };
        (out, bytes)
    }

    fn check(&self, row: RawRow) -> Checked {
        let split = match row.split {
            Some(s) => usize::from(s),
            None => usize::from(is_val(&row.key, self.val_fraction)),
        };
        let r = &self.resume[split];
        let verdict = match &row.image {
            Some(img) if r.is_done(row.index) && r.rows.contains(&row.index) => {
                match check_caption(&row.caption, &self.validate) {
                    Ok(caption) => Verdict::Known(pair_hash(img, &caption)),
                    Err(rej) => Verdict::Rejected(rej),
                }
            }
            _ => match validate(row.image.as_ref(), &row.caption, &self.validate) {
                Ok(a) => Verdict::New(a),
                Err(rej) => Verdict::Rejected(rej),
            },
        };
        Checked {
            row,
            split,
            verdict,
        }
    }
}

/// Everything the sequential stage accumulates.
struct Tally {
    input_rows: u64,
    input_bytes: u64,
    seen: HashSet<u128>,
    rejected: BTreeMap<String, u64>,
    rejects: Vec<RejectRecord>,
}

impl Tally {
    fn reject(&mut self, row: &RawRow, reason: &'static str, detail: String) {
        *self.rejected.entry(reason.to_string()).or_default() += 1;
        self.rejects.push(RejectRecord {
            key: row.key.clone(),
            source: row.source.to_string(),
            row: row.source_row,
            reason,
            detail,
        });
    }
}

fn build_id(plan: &InputPlan, opts: &BuildOptions) -> String {
    let id = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "inputs": plan.describe(),
        "val_fraction": opts.val_fraction,
        "sizing": opts.sizing,
        "validate": opts.validate,
    });
    hex::encode(&Sha256::digest(id.to_string().as_bytes())[..12])
}

/// Builds (or resumes building) a dataset at `opts.out` from `plan`. `extra_files` (name, bytes)
/// are written at the root before the manifest (e.g. `classes.json`).
pub async fn build(
    plan: InputPlan,
    opts: &BuildOptions,
    extra_files: Vec<(String, Vec<u8>)>,
) -> Result<BuildReport, ShardsError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(ShardsError::Config(format!(
            "--val-fraction {} must be in [0, 1)",
            opts.val_fraction
        )));
    }
    if opts.sizing.rows_per_shard == Some(0) || opts.sizing.rows_per_row_group == Some(0) {
        return Err(ShardsError::Config(
            "row counts per shard/row group must be positive".into(),
        ));
    }
    let started = Instant::now();
    let root = Location::open(&opts.out, &opts.store)?;
    let id = build_id(&plan, opts);
    let mloc = root.join(MANIFEST_FILE);
    match get_all(&mloc).await {
        Ok(bytes) => match Manifest::parse(&mloc.url(), &bytes) {
            Ok(m) if m.build_id == id => {
                tracing::info!(out = %root.url(), "already built by the same command; nothing to do");
                return Ok(BuildReport {
                    kept_shards: m.splits.values().map(|s| s.shards.len()).sum(),
                    manifest: m,
                    elapsed: started.elapsed(),
                    input_bytes: 0,
                    already_built: true,
                });
            }
            // A different dataset lives here: its manifest goes first, so nothing half-replaced looks valid.
            _ => mloc
                .store
                .delete(&mloc.path)
                .await
                .map_err(|e| ShardsError::store(mloc.url(), e))?,
        },
        Err(ShardsError::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => {}
        Err(e) => return Err(e),
    }

    // A writer per possible split (index = the row's split); `used` are the ones the build fills.
    let (names, used): (Vec<String>, Vec<String>) = match &plan.splits {
        Some(own) => {
            if opts.val_fraction > 0.0 {
                return Err(ShardsError::Config(
                    "--val-fraction with an annotation file: its splits are the splits".into(),
                ));
            }
            (own.clone(), own.clone())
        }
        None if opts.val_fraction > 0.0 => (to_strings(&SPLITS), to_strings(&SPLITS)),
        None => (to_strings(&SPLITS), to_strings(&SPLITS[..1])),
    };
    let mut resume = Vec::new();
    for split in &names {
        resume.push(if used.contains(split) {
            scan(&root, split, &id).await?
        } else {
            SplitResume::default()
        });
    }
    let kept_shards = resume.iter().map(|r| r.kept.len()).sum();
    let schema = output_schema(&plan.passthrough);
    let mut writers: Vec<SplitWriter> = names
        .iter()
        .zip(resume.iter_mut())
        .map(|(split, r)| {
            SplitWriter::new(
                split,
                root.clone(),
                schema.clone(),
                opts.sizing.clone(),
                id.clone(),
                std::mem::take(&mut r.kept),
            )
        })
        .collect();
    let pool = match opts.threads {
        Some(n) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .build()
                .map_err(|e| ShardsError::Config(format!("thread pool: {e}")))?,
        ),
        None => None,
    };
    let ctx = Arc::new(CheckCtx {
        validate: opts.validate.clone(),
        val_fraction: opts.val_fraction,
        resume,
        pool,
    });

    let bar = progress_bar(plan.total_rows, opts.progress);
    let plan = Arc::new(plan);
    let (tx, rx) = mpsc::channel(4);
    let producer = tokio::spawn(plan.clone().produce(tx));
    let checked =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .map(|item: Result<RawBatch, ShardsError>| {
                let ctx = ctx.clone();
                async move {
                    let batch = item?;
                    tokio::task::spawn_blocking(move || ctx.check_batch(batch))
                        .await
                        .map_err(|e| ShardsError::Join(e.to_string()))
                }
            })
            .buffered(3);
    futures::pin_mut!(checked);
    let mut tally = Tally {
        input_rows: 0,
        input_bytes: 0,
        seen: HashSet::new(),
        rejected: BTreeMap::new(),
        rejects: Vec::new(),
    };
    while let Some(batch) = checked.next().await {
        let (rows, bytes) = batch?;
        tally.input_bytes += bytes;
        let n = rows.len() as u64;
        for c in rows {
            tally.input_rows += 1;
            accept(c, &ctx.resume, &mut writers, &mut tally).await?;
        }
        bar.inc(n);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!("{:.1} MB/s", tally.input_bytes as f64 / 1e6 / secs));
    }
    producer
        .await
        .map_err(|e| ShardsError::Join(e.to_string()))?;
    for w in &mut writers {
        w.finish().await?;
    }
    bar.finish_and_clear();

    for (w, split) in writers.iter().zip(&names) {
        remove_stale_shards(&root, split, w.finished.len()).await?;
    }
    if let Some(url) = &opts.rejects {
        let loc = Location::open(url, &opts.store)?;
        let mut body = Vec::new();
        for r in &tally.rejects {
            serde_json::to_writer(&mut body, r).map_err(|e| ShardsError::Config(e.to_string()))?;
            body.push(b'\n');
        }
        put(&loc, body).await?;
    }
    for (name, bytes) in extra_files {
        put(&root.join(&name), bytes).await?;
    }

    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        splits: BTreeMap::new(),
        schema: schema
            .fields()
            .iter()
            .map(|f| ColumnInfo {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
            })
            .collect(),
        rejected: tally.rejected,
        stats: Stats::default(),
        command: opts.command.clone(),
        build_id: id,
        input_rows: tally.input_rows,
    };
    for (w, split) in writers.iter().zip(&names) {
        if !used.contains(split) {
            continue;
        }
        let mut s = Split::default();
        for f in &w.finished {
            manifest.stats.merge(&f.stats);
            s.rows += f.info.rows;
            s.bytes += f.info.bytes;
            s.shards.push(f.info.clone());
        }
        manifest.splits.insert(split.to_string(), s);
    }
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ShardsError::Config(e.to_string()))?;
    // Last, and atomic (a single PUT): a manifest only ever describes complete shards.
    put(&mloc, json).await?;
    Ok(BuildReport {
        manifest,
        elapsed: started.elapsed(),
        input_bytes: tally.input_bytes,
        kept_shards,
        already_built: false,
    })
}

async fn accept(
    c: Checked,
    resume: &[SplitResume],
    writers: &mut [SplitWriter],
    tally: &mut Tally,
) -> Result<(), ShardsError> {
    let inconsistent = |row: &RawRow| {
        ShardsError::bad_input(
            &*row.source,
            format!(
                "row {} ({}) disagrees with the shards of the interrupted build; the input changed: delete the output and rebuild",
                row.source_row, row.key
            ),
        )
    };
    match c.verdict {
        // A row a kept shard holds cannot be rejected now unless the input changed.
        Verdict::Rejected(_) if resume[c.split].rows.contains(&c.row.index) => {
            return Err(inconsistent(&c.row))
        }
        Verdict::Rejected(r) => tally.reject(&c.row, r.reason, r.detail),
        Verdict::Known(hash) => {
            if !tally.seen.insert(hash) {
                return Err(inconsistent(&c.row));
            }
        }
        Verdict::New(a) => {
            if !tally.seen.insert(a.hash) {
                tally.reject(
                    &c.row,
                    "duplicate",
                    "same image bytes and caption as an earlier row".into(),
                );
            } else if resume[c.split].is_done(c.row.index) {
                return Err(inconsistent(&c.row));
            } else {
                writers[c.split]
                    .push(OutRow {
                        index: c.row.index,
                        key: c.row.key,
                        image: a.image,
                        caption: a.caption,
                        width: a.width,
                        height: a.height,
                        passthrough: c.row.passthrough,
                    })
                    .await?;
            }
        }
    }
    Ok(())
}

async fn put(loc: &Location, bytes: Vec<u8>) -> Result<(), ShardsError> {
    loc.store
        .put(&loc.path, PutPayload::from(bytes))
        .await
        .map_err(|e| ShardsError::store(loc.url(), e))?;
    Ok(())
}

/// Shards beyond the new count (from an earlier, bigger build) would confuse anyone listing files.
async fn remove_stale_shards(root: &Location, split: &str, keep: usize) -> Result<(), ShardsError> {
    let dir = root.join(split);
    let listed: Vec<object_store::ObjectMeta> = dir
        .store
        .list(Some(&dir.path))
        .try_collect()
        .await
        .map_err(|e| ShardsError::store(dir.url(), e))?;
    for m in listed {
        let name = m.location.filename().unwrap_or_default();
        let n = name
            .strip_prefix("shard-")
            .and_then(|r| r.strip_suffix(".parquet"))
            .and_then(|d| d.parse::<usize>().ok());
        if n.is_some_and(|n| n >= keep) {
            dir.store
                .delete(&m.location)
                .await
                .map_err(|e| ShardsError::store(dir.display(&m.location), e))?;
        }
    }
    Ok(())
}

fn progress_bar(total: u64, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({per_sec}, {msg}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}
