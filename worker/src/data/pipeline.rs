//! The training data pipeline of a run, as both entry points build it (`ferroclip-worker train`
//! and `join`): the run's tokenizer, RandomResizedCrop at the model's image size, and a loader
//! over the train split with the run's threads and read-ahead.

use std::sync::Arc;

use anyhow::{Context, Result};
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::StoreOptions;

use super::{ImageTransform, Loader, LoaderOptions, Tokenizer};
use crate::model::ModelConfig;

/// The store options of a run: the command line's, with `store.retry_budget_s`.
pub fn run_store(cfg: &RunConfig, command_line: &StoreOptions) -> StoreOptions {
    StoreOptions {
        retry_budget: std::time::Duration::from_secs_f64(cfg.store.retry_budget_s),
        ..command_line.clone()
    }
}

/// The tokenizer and the train-split loader of `cfg`'s datasets (every source of `data.sources`).
pub fn train_loader(cfg: &RunConfig, store: &StoreOptions) -> Result<(Loader, Arc<Tokenizer>)> {
    let model = ModelConfig::from_section(&cfg.model)?;
    let tokenizer = Arc::new(Tokenizer::from_config(
        &cfg.data.tokenizer,
        model.context_length as usize,
    )?);
    let mut transform = ImageTransform::train(model.image_size, cfg.run.seed);
    transform.scale = (cfg.data.crop_scale[0], cfg.data.crop_scale[1]);
    let roots: Vec<String> = cfg.data.sources().into_iter().map(|s| s.root).collect();
    let loader = Loader::open_all(
        &roots,
        store,
        &cfg.data.train_split,
        transform,
        tokenizer.clone(),
        &LoaderOptions {
            threads: cfg.data.decode_threads as usize,
            prefetch_blocks: cfg.data.prefetch_blocks.max(1) as usize,
            ..LoaderOptions::default()
        },
    )
    .with_context(|| format!("opening the training data {}", cfg.data.describe()))?;
    Ok((loader, tokenizer))
}

/// The epoch plan's sources: each dataset's block sizes (as the loader read them) with its
/// `data.sources` weight.
pub fn plan_sources(cfg: &RunConfig, loader: &Loader) -> Vec<ferroclip_plan::Source> {
    cfg.data
        .sources()
        .iter()
        .zip(loader.source_rows())
        .map(|(s, rows)| ferroclip_plan::Source {
            block_rows: rows.clone(),
            weight: s.weight,
        })
        .collect()
}

/// Logs how a mixed plan's epoch ends: a source that runs out early leaves a tail of the
/// epoch holding only the others (a warning past 1 % of the epoch).
pub fn log_mix(cfg: &RunConfig, plan: &ferroclip_plan::EpochPlan) {
    let sources = cfg.data.sources();
    if sources.len() < 2 {
        return;
    }
    let (unmixed, len) = (plan.unmixed_rows(), plan.len().max(1));
    let share = 100.0 * unmixed as f64 / len as f64;
    if unmixed * 100 > len {
        tracing::warn!(
            unmixed,
            epoch = len,
            "data.sources: the sources' sizes are not in the ratio of their weights; the last {unmixed} of {len} samples of each epoch ({share:.1} %) come from fewer than all sources"
        );
    } else {
        tracing::info!(
            unmixed,
            epoch = len,
            "data.sources: {} sources mixed by weight over the whole epoch",
            sources.len()
        );
    }
}
