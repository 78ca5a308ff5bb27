//! `ferroclip-worker train --config FILE`: one process, no coordinator. The same pieces as the
//! distributed loop (the plan crate's ledger, Loader, Trainer, checkpoints, eval) with the
//! `Single` collective: every step feeds `global_batch` samples, steps run across epoch
//! boundaries and only the run's very last step may be short, exactly as under a coordinator.
//! A background thread prepares the next batches while a step runs. Checkpoints go to
//! `<run.dir>/checkpoints` (any object-store URL) and carry the ledger's data position, so
//! `--resume` continues with exactly the samples and losses an uninterrupted run would see.

use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferroclip_plan::{Bound, DataState, EpochPlan, Ledger};
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::{StoreArgs, StoreOptions};

use crate::checkpoint::{self, TrainerState};
use crate::collective::Single;
use crate::data::{pipeline, Batch, Loader, SampleRef};
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
    #[command(flatten)]
    pub store: StoreArgs,
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
    pub evals: Vec<(u64, super::eval::EvalReport)>,
}

pub fn run_cli(args: TrainArgs) -> Result<Summary> {
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

type Prepared = Result<(Batch, DataState)>;

/// The background thread making batches in plan order, `depth` ahead of the step loop. It
/// walks the very ledger the coordinator runs, with one rank: the same steps, epoch boundaries
/// and step count as `ferroclip train --workers N` for the same run.toml.
fn spawn_batches(
    loader: Loader,
    mut ledger: Ledger,
    batch: u32,
    count: u64,
    depth: usize,
) -> Result<(mpsc::Receiver<Prepared>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel::<Prepared>(depth.max(1));
    let handle = std::thread::Builder::new()
        .name("ferroclip-batches".into())
        .spawn(move || {
            for _ in 0..count {
                let Some(a) = ledger.assign_next(1, batch).cloned() else {
                    return; // the run's data is used up: the step loop sees the channel close
                };
                let refs: Vec<SampleRef> = a.ranks[0]
                    .iter()
                    .flat_map(|span| ledger.span_samples(span))
                    .collect();
                let upcoming: Vec<u32> = a
                    .after
                    .leases
                    .values()
                    .flatten()
                    .flat_map(|c| ledger.chunk_blocks(*c))
                    .collect();
                loader.prefetch(&upcoming);
                ledger.commit(a.step);
                let item = loader
                    .load(&refs)
                    .map(|b| (b, a.after))
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
    let store = pipeline::run_store(cfg, &args.store.options());
    let (loader, tok) = pipeline::train_loader(cfg, &store)?;
    let sources = pipeline::plan_sources(cfg, &loader);
    let per_epoch: u64 = sources.iter().map(|s| s.rows()).sum();
    if per_epoch == 0 {
        bail!(
            "{}: split {:?} has no samples",
            cfg.data.describe(),
            cfg.data.train_split
        );
    }
    pipeline::log_mix(
        cfg,
        &EpochPlan::mixed(cfg.run.seed, 0, &sources, cfg.data.shuffle_window_blocks),
    );
    let mut ledger = Ledger::mixed(
        cfg.run.seed,
        cfg.data.shuffle_window_blocks,
        sources,
        Bound::of(cfg.run.steps, cfg.run.epochs),
    )
    .with_lanes(cfg.data.lanes);
    let gb = cfg.optim.global_batch.max(1);
    let total = ledger.total_steps(gb);
    let mut trainer = Trainer::new(cfg, total)?;
    let ckpt_root = join_url(&cfg.run.dir, "checkpoints");
    let latest = checkpoint::latest(&ckpt_root, &store)?;
    match (args.resume, latest) {
        (true, Some(url)) => {
            let st = checkpoint::load(&url, &store, &mut trainer)
                .with_context(|| format!("resuming from {url}"))?;
            if st.seed != cfg.run.seed {
                bail!(
                    "{url} was trained with seed {}, the config says {}",
                    st.seed,
                    cfg.run.seed
                );
            }
            let Some(data) = st.data.clone() else {
                bail!("{url} holds no data position (a checkpoint of a coordinated run: its position is in the coordinator's journal)");
            };
            tracing::info!(step = st.step, epoch = data.epoch, samples = data.consumed, "resumed from {url}");
            ledger
                .restore(st.step, data, Vec::new())
                .map_err(|e| anyhow::anyhow!("{url} does not fit this dataset: {e}"))?;
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
    let (batches, producer) = spawn_batches(loader, ledger, gb, last + 1 - first, 2)?;
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
            .context("the batch thread stopped before the run's last step")?
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
            ("siglip", o.siglip, losses.siglip),
            ("mlm", o.mlm, losses.mlm),
            ("mae", o.mae, losses.mae),
            ("itm", o.itm, losses.itm),
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
                seed: cfg.run.seed,
                model: trainer.model.config.clone(),
                config: cfg.to_toml(),
                data: Some(after.clone()),
            };
            let url = checkpoint::save(
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
                let r = super::eval::evaluate(
                    &trainer.model,
                    tok.clone(),
                    &val.root,
                    &store,
                    &val.split,
                    cfg.eval.max_samples as usize,
                    (!cfg.eval.classes.is_empty()).then_some(cfg.eval.classes.as_str()),
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

/// The val split, when the dataset has one with samples (eval is skipped otherwise). With
/// several sources, the first one's.
struct ValSet {
    root: String,
    split: String,
}

impl ValSet {
    fn check(cfg: &RunConfig, store: &StoreOptions) -> Option<ValSet> {
        let split = cfg.data.val_split.clone();
        let root = cfg.data.sources().into_iter().next()?.root;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let ds = rt
            .block_on(ferroclip_shards::Dataset::open(&root, store))
            .ok()?;
        let rows: u64 = ds.blocks(&split).ok()?.iter().map(|b| b.rows as u64).sum();
        if rows == 0 {
            tracing::info!("no {split:?} samples in {root}: eval skipped");
            return None;
        }
        Some(ValSet { root, split })
    }
}
