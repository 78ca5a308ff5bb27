//! Checkpoints, one API over every store (a path, `file://`, `s3://`, `gs://`, `az://`):
//! `model.safetensors` (OpenCLIP state-dict names only, loads in open_clip),
//! `extras.safetensors` (MAE decoder / MLM head), `optim.safetensors` (AdamW moments named
//! `exp_avg.<param>` / `exp_avg_sq.<param>`) and `trainer.json` (step, epoch, data position,
//! seed, config) under `<root>/step-NNNNNNNN/`, with `COMMIT` written last (the layout of
//! `ferroclip_shards::checkpoints`, which the coordinator prunes by). `join`, `train`, `eval`
//! and `embed` all go through `store`.

pub mod pretrained;
pub mod store;

pub use ferroclip_shards::checkpoints::COMMIT;
pub use pretrained::{load_into, read_pretrained, Pretrained};
pub use store::{committed, latest, load, read, resolve, save, Checkpoint};

use crate::model::ModelConfig;
use crate::train::Trainer;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("checkpoint store {url}: {message}")]
    Store { url: String, message: String },
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Where the run is, besides the tensors. The masks' RNGs are a function of (seed, step, call,
/// objective, row of the global batch), so no generator state needs saving.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub step: u64,
    /// The epoch the data position is in (for people; `data` is what resumes).
    pub epoch: u32,
    pub seed: u64,
    pub model: ModelConfig,
    /// The run config (TOML) the checkpoint was trained with.
    pub config: String,
    /// The ledger's data position after `step` (`ferroclip-worker train`). A coordinated run's
    /// checkpoints leave it out: the coordinator journals the position with the checkpoint.
    #[serde(default)]
    pub data: Option<ferroclip_plan::DataState>,
}

/// The optimizer moments, named after their parameters.
pub(crate) fn optimizer_tensors(t: &Trainer) -> Vec<(String, Tensor)> {
    let names: Vec<&String> = t.model.params.iter().map(|(n, _)| n).collect();
    let state = t.state_tensors();
    let p = names.len();
    let mut out = Vec::with_capacity(2 * p);
    for (i, n) in names.iter().enumerate() {
        out.push((format!("exp_avg.{n}"), state[p + i].shallow_clone()));
    }
    for (i, n) in names.iter().enumerate() {
        out.push((format!("exp_avg_sq.{n}"), state[2 * p + i].shallow_clone()));
    }
    out
}

/// Copies a checkpoint's model tensors (model + extras) and optimizer moments into `trainer`
/// and sets its step. `origin` names the checkpoint in errors.
pub(crate) fn restore(
    trainer: &mut Trainer,
    state: &TrainerState,
    tensors: &[(String, Tensor)],
    optim: Vec<(String, Tensor)>,
    origin: &str,
) -> Result<()> {
    let bad = |message: String| CheckpointError::Invalid {
        path: origin.to_string(),
        message,
    };
    if state.model != trainer.model.config {
        return Err(bad(format!(
            "model shape {:?} differs from the run's {:?}",
            state.model, trainer.model.config
        )));
    }
    trainer
        .model
        .load_state_dict(tensors, &format!("{origin}/model.safetensors"), true)
        .map_err(|e| bad(e.to_string()))?;
    let saved: std::collections::HashMap<String, Tensor> = optim.into_iter().collect();
    tch::no_grad(|| {
        for (name, mut dst) in optimizer_tensors(trainer) {
            let src = saved
                .get(&name)
                .ok_or_else(|| bad(format!("optim.safetensors: missing {name}")))?;
            if src.size() != dst.size() {
                return Err(bad(format!(
                    "optim.safetensors: {name}: shape {:?}, expected {:?}",
                    src.size(),
                    dst.size()
                )));
            }
            dst.copy_(src);
        }
        Ok(())
    })?;
    trainer.set_step(state.step);
    Ok(())
}
