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

/// The tokenizer and the train-split loader of `cfg`'s dataset.
pub fn train_loader(cfg: &RunConfig, store: &StoreOptions) -> Result<(Loader, Arc<Tokenizer>)> {
    let model = ModelConfig::from_section(&cfg.model)?;
    let tokenizer = Arc::new(Tokenizer::from_config(
        &cfg.data.tokenizer,
        model.context_length as usize,
    )?);
    let mut transform = ImageTransform::train(model.image_size, cfg.run.seed);
    transform.scale = (cfg.data.crop_scale[0], cfg.data.crop_scale[1]);
    let loader = Loader::open(
        &cfg.data.root,
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
    .with_context(|| format!("opening the training data {}", cfg.data.root))?;
    Ok((loader, tokenizer))
}
