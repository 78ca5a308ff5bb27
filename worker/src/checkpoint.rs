//! Checkpoints: `model.safetensors` (OpenCLIP state-dict names only, loads in open_clip),
//! `extras.safetensors` (MAE decoder / MLM head), `optim.safetensors` (AdamW moments named
//! `exp_avg.<param>` / `exp_avg_sq.<param>`) and `trainer.json` (step, epoch, data cursor, seed,
//! config). Atomic for readers: everything is written into a hidden temporary directory, renamed
//! to `step-NNNNNNNN`, and only then is the `COMMIT` marker written; readers ignore checkpoints
//! without it. `store` writes the same layout to any object-store URL (COMMIT put last).

pub mod store;

pub use store::{committed_url, latest_url, load_url, read_url, resolve_url, save_url, Checkpoint};

use crate::model::ModelConfig;
use crate::train::Trainer;
use std::path::{Path, PathBuf};
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

/// Where the run is, besides the tensors. The masks' RNG is a function of (seed, step, rank), so
/// no generator state needs saving.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub epoch: u32,
    /// Offset into the epoch plan of the next sample to train on.
    pub cursor: u64,
    pub seed: u64,
    pub model: ModelConfig,
    /// The run config (TOML) the checkpoint was trained with.
    pub config: String,
}

pub const COMMIT: &str = "COMMIT";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let owned: Vec<(String, Tensor)> = tensors
        .iter()
        // A GPU trainer's tensors are copied to host memory first (no-op on CPU).
        .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&owned, path).map_err(|e| invalid(path, e.to_string()))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| invalid(path, e.to_string()))
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

/// Writes a checkpoint for `state.step` under `dir` and deletes committed ones beyond the
/// newest `keep` (0 = keep all). Returns the checkpoint's directory.
pub fn save(dir: &Path, trainer: &Trainer, state: &TrainerState, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let done = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_tensors(
        &tmp.join("model.safetensors"),
        &trainer.model.state_dict(false),
    )?;
    let extras: Vec<_> = trainer
        .model
        .state_dict(true)
        .into_iter()
        .filter(|(n, _)| crate::model::is_extra_key(n))
        .collect();
    write_tensors(&tmp.join("extras.safetensors"), &extras)?;
    write_tensors(&tmp.join("optim.safetensors"), &optimizer_tensors(trainer))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| invalid(&tmp, e.to_string()))?;
    std::fs::write(tmp.join("trainer.json"), json).map_err(io(&tmp))?;
    if done.exists() {
        // A checkpoint of the same step without COMMIT is a leftover of a crash: replace it.
        std::fs::remove_dir_all(&done).map_err(io(&done))?;
    }
    std::fs::rename(&tmp, &done).map_err(io(&done))?;
    let marker = done.join(COMMIT);
    std::fs::write(&marker, name.as_bytes()).map_err(io(&marker))?;
    std::fs::File::open(&marker)
        .and_then(|f| f.sync_all())
        .map_err(io(&marker))?;
    if keep > 0 {
        for old in committed(dir)?.into_iter().rev().skip(keep) {
            std::fs::remove_dir_all(&old.1).map_err(io(&old.1))?;
        }
    }
    Ok(done)
}

/// Committed checkpoints under `dir`, oldest first, as (step, path).
pub fn committed(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if e.path().join(COMMIT).is_file() {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest committed checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(committed(dir)?.pop().map(|(_, p)| p))
}

/// Loads a committed checkpoint into `trainer` (model, optimizer, step) and returns its state.
pub fn load(path: &Path, trainer: &mut Trainer) -> Result<TrainerState> {
    if !path.join(COMMIT).is_file() {
        return Err(invalid(
            path,
            "no COMMIT marker: the checkpoint is incomplete",
        ));
    }
    let json_path = path.join("trainer.json");
    let json = std::fs::read(&json_path).map_err(io(&json_path))?;
    let state: TrainerState =
        serde_json::from_slice(&json).map_err(|e| invalid(&json_path, e.to_string()))?;
    if state.model != trainer.model.config {
        return Err(invalid(
            path,
            format!(
                "model shape {:?} differs from the run's {:?}",
                state.model, trainer.model.config
            ),
        ));
    }
    let mut tensors = read_tensors(&path.join("model.safetensors"))?;
    tensors.extend(read_tensors(&path.join("extras.safetensors"))?);
    let optim_path = path.join("optim.safetensors");
    let optim = read_tensors(&optim_path)?;
    restore(
        trainer,
        &state,
        &tensors,
        optim,
        &path.display().to_string(),
    )?;
    Ok(state)
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
