//! The trainer's state as the distributed loop moves it: by broadcast to joiners and lagging
//! ranks, to and from checkpoints under `<run.dir>/checkpoints` (any store), and as the small
//! figures the audit log and metrics report.

use anyhow::Result;
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::StoreOptions;

use crate::collective::{Collective, CollectiveError};
use crate::train::Trainer;

/// Every rank takes `root`'s parameters, optimizer state and step counter.
pub(super) fn broadcast(
    trainer: &mut Trainer,
    coll: &mut dyn Collective,
    root: usize,
) -> std::result::Result<(), CollectiveError> {
    let _guard = tch::no_grad_guard();
    for mut t in trainer.state_tensors() {
        coll.broadcast(&mut t, root)?;
    }
    let device = trainer.model.logit_scale.device();
    let mut step = tch::Tensor::from_slice(&[trainer.step() as f64]).to_device(device);
    coll.broadcast(&mut step, root)?;
    trainer.set_step(step.double_value(&[0]) as u64);
    Ok(())
}

/// Writes step `step`'s checkpoint under `<run.dir>/checkpoints`; returns its URL. The data
/// position is not in it: the coordinator journals it with the checkpoint record, and it prunes
/// (`keep` = 0 here) because only it knows which checkpoints are recorded.
pub(super) fn save_checkpoint(
    trainer: &Trainer,
    cfg: &RunConfig,
    store: &StoreOptions,
    step: u64,
) -> Result<String> {
    let root = ferroclip_shards::checkpoints::root_url(&cfg.run.dir);
    let state = crate::checkpoint::TrainerState {
        step,
        epoch: 0,
        seed: cfg.run.seed,
        model: trainer.model.config.clone(),
        config: cfg.to_toml(),
        data: None,
    };
    Ok(crate::checkpoint::save(&root, store, trainer, &state, 0)?)
}

pub(super) fn load_checkpoint(
    trainer: &mut Trainer,
    url: &str,
    store: &StoreOptions,
) -> Result<()> {
    let state = crate::checkpoint::load(url, store, trainer)?;
    trainer.set_step(state.step);
    Ok(())
}

/// A cheap fingerprint of the parameters: equal on ranks that applied the same updates.
pub(super) fn checksum(trainer: &Trainer) -> f64 {
    trainer
        .model
        .params
        .iter()
        .map(|(_, p)| {
            p.to_kind(tch::Kind::Double)
                .sum(tch::Kind::Double)
                .double_value(&[])
        })
        .sum()
}

/// Bytes of gradient each all-reduce moves (the parameters that train, at their element size).
pub(super) fn grad_bytes(trainer: &Trainer) -> u64 {
    trainer
        .model
        .params
        .iter()
        .filter(|(_, p)| p.requires_grad())
        .map(|(_, p)| (p.numel() * p.kind().elt_size_in_bytes()) as u64)
        .sum()
}

pub(super) fn logit_scale(trainer: &Trainer) -> f64 {
    trainer.model.logit_scale.double_value(&[]).exp()
}
