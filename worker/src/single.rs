//! `ferroclip-worker train --config FILE`: one process, no coordinator. The same pieces as the
//! distributed loop (epoch plan, Loader, Trainer, checkpoints, eval) with the `Single`
//! collective. Batches are the next `global_batch` samples of the epoch plan (the last batch of
//! an epoch may be smaller); a background thread prepares the next batches while a step runs.
//! Checkpoints go to `<run.dir>/checkpoints` (any object-store URL) and carry the data position,
//! so `--resume` continues with exactly the samples and losses an uninterrupted run would see.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferroclip_coordinator::plan::EpochPlan;
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::StoreOptions;

use crate::checkpoint::{self, TrainerState};
use crate::collective::Single;
use crate::data::{Batch, ImageTransform, Loader, LoaderOptions, SampleRef, Tokenizer};
use crate::model::ModelConfig;
use crate::train::Trainer;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The run config (run.toml).
    #[arg(long)]
    pub config: String,
    /// Continue from the newest committed checkpoint in <run.dir>/checkpoints (fresh if none).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this step; the schedule still spans the whole run (time-limited jobs).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// S3-compatible endpoint for the dataset and run directory.
    #[arg(long, env = "FERROCLIP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Allow plain-HTTP object-store endpoints.
    #[arg(long)]
    pub allow_http: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// What a `train` call did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// (step, total loss) of every step this call ran.
    pub losses: Vec<(u64, f64)>,
    /// Mean seconds per step spent waiting for the batch, and per whole step.
    pub data_wait_s: f64,
    pub step_s: f64,
    pub checkpoints: Vec<String>,
    pub evals: Vec<(u64, crate::eval::EvalReport)>,
}

pub fn run_cli(args: TrainArgs) -> Result<Summary> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(n) = args.threads {
        tch::set_num_threads(n.max(1));
    }
    let cfg = RunConfig::load(&args.config)?;
    train(&cfg, &args)
}

/// `dir` + `/` + `rel` for paths and URLs alike.
pub fn join_url(dir: &str, rel: &str) -> String {
    format!("{}/{rel}", dir.trim_end_matches('/'))
}

fn tokenizer(cfg: &RunConfig, ctx: i64) -> Result<Arc<Tokenizer>> {
    let ctx = ctx as usize;
    Ok(Arc::new(if cfg.data.tokenizer == "clip" {
        Tokenizer::clip(ctx)?
    } else {
        Tokenizer::from_hf_json(cfg.data.tokenizer.as_ref(), ctx)?
    }))
}

/// Where the next sample comes from: (epoch, offset into the epoch plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    epoch: u32,
    cursor: u64,
}

/// Walks the epoch plans (a pure function of seed, epoch and the manifest) batch by batch.
struct Feed {
    seed: u64,
    window: u32,
    block_rows: Vec<u32>,
    plan: EpochPlan,
    pos: Position,
    /// The chunk holding `pos.cursor`, its first sample's offset, and its sample order.
    chunk: usize,
    chunk_start: u64,
    samples: Vec<SampleRef>,
}

impl Feed {
    fn new(seed: u64, window: u32, block_rows: Vec<u32>, pos: Position) -> Self {
        let plan = EpochPlan::new(seed, pos.epoch, &block_rows, window);
        let mut f = Self {
            seed,
            window,
            block_rows,
            plan,
            pos: Position {
                epoch: pos.epoch,
                cursor: 0,
            },
            chunk: 0,
            chunk_start: 0,
            samples: Vec::new(),
        };
        f.load_chunk(0, 0);
        f.skip(pos.cursor);
        f
    }

    fn load_chunk(&mut self, index: usize, start: u64) {
        self.chunk = index;
        self.chunk_start = start;
        self.samples = self
            .plan
            .chunk_samples(index)
            .into_iter()
            .map(|s| SampleRef {
                block: s.block,
                row: s.row,
            })
            .collect();
    }

    /// Moves the cursor forward by `n` samples within the epoch.
    fn skip(&mut self, n: u64) {
        let target = (self.pos.cursor + n).min(self.plan.len());
        while self.chunk < self.plan.chunks().len()
            && target >= self.chunk_start + self.samples.len() as u64
            && target < self.plan.len()
        {
            let next = self.chunk_start + self.samples.len() as u64;
            self.load_chunk(self.chunk + 1, next);
        }
        self.pos.cursor = target;
    }

    /// The next batch of at most `n` samples, never crossing an epoch's end; the position
    /// after it.
    fn next_batch(&mut self, n: u64) -> (Vec<SampleRef>, Position) {
        if self.pos.cursor >= self.plan.len() {
            let epoch = self.pos.epoch + 1;
            *self = Self::new(
                self.seed,
                self.window,
                std::mem::take(&mut self.block_rows),
                Position { epoch, cursor: 0 },
            );
        }
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n && self.pos.cursor < self.plan.len() {
            let i = (self.pos.cursor - self.chunk_start) as usize;
            let take = (self.samples.len() - i).min(n as usize - out.len());
            out.extend_from_slice(&self.samples[i..i + take]);
            self.skip(take as u64);
        }
        (out, self.pos)
    }

    /// Blocks of the current and the next chunk: what the loader should fetch ahead.
    fn upcoming_blocks(&self) -> Vec<u32> {
        let chunks = self.plan.chunks();
        let mut out: Vec<u32> = Vec::new();
        for c in chunks.iter().skip(self.chunk).take(2) {
            out.extend(&c.blocks);
        }
        out
    }
}

/// Steps in the run: `run.steps`, else whole epochs of batches (the last one of each may be short).
fn total_steps(cfg: &RunConfig, samples_per_epoch: u64) -> u64 {
    if cfg.run.steps > 0 {
        cfg.run.steps
    } else {
        samples_per_epoch.div_ceil(cfg.optim.global_batch.max(1) as u64) * cfg.run.epochs as u64
    }
}

type Prepared = Result<(Batch, Position)>;

/// The background thread making batches in plan order, `depth` ahead of the step loop.
fn spawn_batches(
    loader: Loader,
    mut feed: Feed,
    batch: u64,
    count: u64,
    depth: usize,
) -> Result<(mpsc::Receiver<Prepared>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel::<Prepared>(depth.max(1));
    let handle = std::thread::Builder::new()
        .name("ferroclip-batches".into())
        .spawn(move || {
            for _ in 0..count {
                let (refs, pos) = feed.next_batch(batch);
                loader.set_epoch(pos.epoch as u64);
                loader.prefetch(&feed.upcoming_blocks());
                let item = loader
                    .load(&refs)
                    .map(|b| (b, pos))
                    .map_err(anyhow::Error::from);
                let failed = item.is_err();
                // A closed receiver means the step loop is done.
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        })
        .context("starting the batch thread")?;
    Ok((rx, handle))
}

/// Trains per `cfg` in this process; see the module docs.
pub fn train(cfg: &RunConfig, args: &TrainArgs) -> Result<Summary> {
    let store = StoreOptions {
        s3_endpoint: args.s3_endpoint.clone(),
        allow_http: args.allow_http,
    };
    let mc = ModelConfig::from_section(&cfg.model)?;
    let tok = tokenizer(cfg, mc.context_length)?;
    let mut transform = ImageTransform::train(mc.image_size, cfg.run.seed);
    transform.scale = (cfg.data.crop_scale[0], cfg.data.crop_scale[1]);
    let loader = Loader::open(
        &cfg.data.root,
        &store,
        &cfg.data.train_split,
        transform,
        tok.clone(),
        &LoaderOptions {
            threads: cfg.data.decode_threads as usize,
            prefetch_blocks: cfg.data.prefetch_blocks.max(1) as usize,
            ..LoaderOptions::default()
        },
    )
    .with_context(|| format!("opening the training data {}", cfg.data.root))?;
    let block_rows = loader.block_rows().to_vec();
    let per_epoch: u64 = block_rows.iter().map(|&r| r as u64).sum();
    if per_epoch == 0 {
        bail!(
            "{}: split {:?} has no samples",
            cfg.data.root,
            cfg.data.train_split
        );
    }
    let total = total_steps(cfg, per_epoch);
    let mut trainer = Trainer::new(cfg, total)?;
    let ckpt_root = join_url(&cfg.run.dir, "checkpoints");
    let latest = checkpoint::latest_url(&ckpt_root, &store)?;
    let mut pos = Position {
        epoch: 0,
        cursor: 0,
    };
    match (args.resume, latest) {
        (true, Some(url)) => {
            let st = checkpoint::load_url(&url, &store, &mut trainer)
                .with_context(|| format!("resuming from {url}"))?;
            if st.seed != cfg.run.seed {
                bail!(
                    "{url} was trained with seed {}, the config says {}",
                    st.seed,
                    cfg.run.seed
                );
            }
            pos = Position {
                epoch: st.epoch,
                cursor: st.cursor,
            };
            tracing::info!(step = st.step, epoch = st.epoch, cursor = st.cursor, "resumed from {url}");
        }
        (true, None) => tracing::info!("no checkpoint under {ckpt_root}: starting fresh"),
        (false, Some(url)) => bail!(
            "{ckpt_root} already holds checkpoints (newest {url}): pass --resume, or set another run.dir"
        ),
        (false, None) => {}
    }
    let first = trainer.step() + 1;
    let last = args.stop_after.map_or(total, |s| s.min(total));
    let mut summary = Summary::default();
    if first > last {
        tracing::info!("nothing to do: step {} of {total} reached", first - 1);
        return Ok(summary);
    }
    let gb = cfg.optim.global_batch.max(1) as u64;
    let feed = Feed::new(
        cfg.run.seed,
        cfg.data.shuffle_window_blocks,
        block_rows,
        pos,
    );
    let (batches, producer) = spawn_batches(loader, feed, gb, last + 1 - first, 2)?;
    let val = ValSet::check(cfg, &store);

    let pb = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    pb.set_position(first - 1);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] step {pos}/{len} ({per_sec}, eta {eta}) {msg}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    let (mut wait_sum, mut step_sum) = (0.0, 0.0);
    for step in first..=last {
        let t0 = Instant::now();
        let (batch, after) = batches
            .recv()
            .context("the batch thread stopped")?
            .with_context(|| format!("loading the batch of step {step}"))?;
        let wait = t0.elapsed().as_secs_f64();
        let n = batch.keys.len();
        let losses = trainer.compute_grads(&batch, n, &mut Single)?;
        let update = trainer.apply_update()?;
        let took = t0.elapsed().as_secs_f64();
        wait_sum += wait;
        step_sum += took;
        summary.losses.push((step, losses.total));
        let o = &cfg.objectives;
        let mut parts = String::new();
        for (name, w, v) in [
            ("contrastive", o.contrastive, losses.contrastive),
            ("mlm", o.mlm, losses.mlm),
            ("mae", o.mae, losses.mae),
        ] {
            if w > 0.0 {
                parts.push_str(&format!(" {name} {v:.6}"));
            }
        }
        pb.suspend(|| {
            println!(
                "step {step} loss {:.8}{parts} lr {:.3e} grad_norm {:.4} batch {n} data_wait_ms {:.1} step_ms {:.1}",
                losses.total,
                update.lr,
                update.grad_norm,
                wait * 1e3,
                took * 1e3
            )
        });
        pb.set_message(format!("loss {:.4}", losses.total));
        pb.inc(1);

        let every = cfg.checkpoint.every_steps;
        if (every > 0 && step.is_multiple_of(every)) || step == last {
            let state = TrainerState {
                step,
                epoch: after.epoch,
                cursor: after.cursor,
                seed: cfg.run.seed,
                model: trainer.model.config.clone(),
                config: cfg.to_toml(),
            };
            let url = checkpoint::save_url(
                &ckpt_root,
                &store,
                &trainer,
                &state,
                cfg.checkpoint.keep as usize,
            )
            .with_context(|| format!("writing the checkpoint of step {step}"))?;
            pb.suspend(|| println!("checkpoint step {step} {url}"));
            summary.checkpoints.push(url);
        }
        let every = cfg.eval.every_steps;
        if (every > 0 && step.is_multiple_of(every)) || step == total {
            if let Some(val) = &val {
                let r = crate::eval::evaluate(
                    &trainer.model,
                    tok.clone(),
                    &cfg.data.root,
                    &store,
                    &val.split,
                    cfg.eval.max_samples as usize,
                )
                .with_context(|| format!("evaluating at step {step}"))?;
                pb.suspend(|| {
                    println!(
                        "eval step {step} samples {} zeroshot_top1 {:.4} zeroshot_top5 {:.4} i2t_r1 {:.4} t2i_r1 {:.4}",
                        r.samples,
                        r.zeroshot_top1,
                        r.zeroshot_top5,
                        r.image_to_text[0],
                        r.text_to_image[0]
                    )
                });
                summary.evals.push((step, r));
            }
        }
    }
    pb.finish_and_clear();
    drop(batches);
    let _ = producer.join();
    let steps = summary.losses.len().max(1) as f64;
    summary.data_wait_s = wait_sum / steps;
    summary.step_s = step_sum / steps;
    println!(
        "trained steps {first}..={last} of {total}: {:.1} ms/step, of which waiting for data {:.1} ms ({:.1}%)",
        1e3 * summary.step_s,
        1e3 * summary.data_wait_s,
        100.0 * summary.data_wait_s / summary.step_s.max(1e-12)
    );
    Ok(summary)
}

/// The val split, when the dataset has one with samples (eval is skipped otherwise).
struct ValSet {
    split: String,
}

impl ValSet {
    fn check(cfg: &RunConfig, store: &StoreOptions) -> Option<ValSet> {
        let split = cfg.data.val_split.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let ds = rt
            .block_on(ferroclip_shards::Dataset::open(&cfg.data.root, store))
            .ok()?;
        let rows: u64 = ds.blocks(&split).ok()?.iter().map(|b| b.rows as u64).sum();
        if rows == 0 {
            tracing::info!("no {split:?} samples in {}: eval skipped", cfg.data.root);
            return None;
        }
        Some(ValSet { split })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(mut f: Feed, batch: u64, steps: usize) -> Vec<(Vec<SampleRef>, Position)> {
        (0..steps).map(|_| f.next_batch(batch)).collect()
    }

    #[test]
    fn a_feed_resumed_at_any_position_continues_the_same_sequence() {
        let rows = vec![5, 3, 7, 4, 6];
        let start = Position {
            epoch: 0,
            cursor: 0,
        };
        let full = all(Feed::new(7, 2, rows.clone(), start), 4, 14);
        // 25 samples per epoch in batches of 4: 6 full batches then a short one.
        let lens: Vec<usize> = full.iter().take(7).map(|b| b.0.len()).collect();
        assert_eq!(lens, vec![4, 4, 4, 4, 4, 4, 1]);
        assert_eq!(
            full[6].1,
            Position {
                epoch: 0,
                cursor: 25
            }
        );
        assert_eq!(
            full[7].1,
            Position {
                epoch: 1,
                cursor: 4
            }
        );
        let mut seen: Vec<SampleRef> = full.iter().take(7).flat_map(|b| b.0.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 25, "every sample once per epoch");
        for k in 0..13 {
            let resumed = all(Feed::new(7, 2, rows.clone(), full[k].1), 4, 14 - k - 1);
            assert_eq!(&resumed[..], &full[k + 1..], "resumed after batch {k}");
        }
    }
}
