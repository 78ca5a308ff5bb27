//! One optimizer step, split the way the distributed loop needs it: `compute_grads` (forward,
//! losses over the global batch, backward, gradient all-reduce; parameters untouched) and
//! `apply_update` (clip, AdamW, schedule). With `Single` this is plain single-process training.
//!
//! Contrastive loss over the global batch with exact gradients: features are all-gathered
//! (detached) into leaves, each rank takes its rows against all columns, the leaves' gradients
//! are summed across ranks and this rank's slice is pushed back through its towers in one
//! backward together with MLM and MAE. Each objective is one function in `objectives` that
//! returns its loss and its surrogate terms for that backward (`backward` here).

mod accumulate;
pub mod itm;
mod objectives;
pub mod siglip;

use crate::collective::buckets::{GradBuckets, DEFAULT_BUCKET_BYTES};
use crate::collective::{Collective, CollectiveError};
use crate::data::Batch;
use crate::model::lock::Lock;
use crate::model::{Clip, Heads, ModelConfig, ModelError};
use crate::optim;
use crate::overlap::OverlappedReducer;
use ferroclip_proto::config::{Objectives, OptimSection, RunConfig, Switch};
use objectives::Rows;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("collective failed, step abandoned: {0}")]
    Collective(#[from] CollectiveError),
    #[error("bad batch: {0}")]
    Batch(String),
    #[error("non-finite loss {loss} at step {step}; step abandoned")]
    NonFinite { loss: f64, step: u64 },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("model.init: {0}")]
    Init(#[from] crate::checkpoint::CheckpointError),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// This rank's losses for one `compute_grads` call: local means, before weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLosses {
    /// Weighted sum of the enabled objectives.
    pub total: f64,
    pub contrastive: f64,
    #[serde(default)]
    pub siglip: f64,
    pub mlm: f64,
    pub mae: f64,
    #[serde(default)]
    pub itm: f64,
}

impl StepLosses {
    /// The objectives' weighted sum: the loss the step minimises (a non-finite one is an error).
    fn weighted(&self, o: &Objectives, step: u64) -> Result<f64> {
        let total = o.contrastive * self.contrastive
            + o.siglip * self.siglip
            + o.mlm * self.mlm
            + o.mae * self.mae
            + o.itm * self.itm;
        if !total.is_finite() {
            return Err(TrainError::NonFinite { loss: total, step });
        }
        Ok(total)
    }
}

/// The RNG of one row of the global batch for one random draw of a step: a function of (run
/// seed, step, compute_grads call since the update, stream, the row's index in the global
/// batch), so every world size draws the same.
pub fn row_rng(seed: u64, step: u64, calls: u64, stream: u64, row: i64) -> StdRng {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(calls.wrapping_mul(0x94D0_49BB_1331_11EB))
        .wrapping_add(stream.wrapping_mul(0xD6E8_FEB8_6659_FD93))
        .wrapping_add(row as u64);
    StdRng::seed_from_u64(mix)
}

/// Wall time of the phases of the last `compute_grads` (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    pub forward_s: f64,
    pub backward_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    pub lr: f64,
    pub grad_norm: f64,
}

pub struct Trainer {
    pub model: Clip,
    opt: optim::AdamW,
    objectives: Objectives,
    optim: OptimSection,
    seed: u64,
    total_steps: u64,
    bucket_bytes: usize,
    buckets: Option<GradBuckets>,
    /// All-reduce buckets during the model backward (`cluster.overlap_allreduce`; None = auto:
    /// on when the batch is on a GPU).
    overlap: Option<bool>,
    reducer: Option<OverlappedReducer>,
    /// Run forward and backward under CUDA bf16 autocast (`set_autocast`).
    autocast: bool,
    /// Optimizer updates applied so far.
    step: u64,
    /// compute_grads calls since the last update (gradient accumulation).
    calls: u64,
    /// Phase times of the last compute_grads.
    pub last_times: PhaseTimes,
}

impl Trainer {
    /// A freshly initialised model (seed `run.seed`) for a run of `total_steps` updates.
    pub fn new(cfg: &RunConfig, total_steps: u64) -> Result<Self> {
        Self::with_kind(cfg, total_steps, Kind::Float)
    }

    /// As `new`, with parameters in `kind` (Double for gradient checks).
    pub fn with_kind(cfg: &RunConfig, total_steps: u64, kind: Kind) -> Result<Self> {
        let init = if cfg.model.init.is_empty() {
            None
        } else {
            let opts = ferroclip_shards::StoreOptions {
                retry_budget: std::time::Duration::from_secs_f64(cfg.store.retry_budget_s),
                ..Default::default()
            };
            Some(crate::checkpoint::read_pretrained(&cfg.model.init, &opts)?)
        };
        // A checkpoint or hub directory brings its own architecture.
        let mut mc = match init.as_ref().and_then(|p| p.config.clone()) {
            Some(c) => c,
            None => ModelConfig::from_section(&cfg.model)?,
        };
        // ALBEF/BLIP start ITM from trained towers: weights without a fusion encoder get the one
        // `[model]` asks for (a `-fusion` preset or `fusion_layers`), freshly initialised.
        if init.is_some() && mc.fusion_layers == 0 {
            let asked = ModelConfig::from_section(&cfg.model).map_or(0, |c| c.fusion_layers);
            if asked > 0 {
                tracing::info!("model.init has no fusion encoder: adding {asked} fresh layers");
                mc.fusion_layers = asked;
            }
        }
        let heads = Heads {
            siglip: cfg.objectives.siglip > 0.0,
            mlm: cfg.objectives.mlm > 0.0,
            mae: cfg.objectives.mae > 0.0,
        };
        if cfg.objectives.itm > 0.0 && mc.fusion_layers == 0 {
            return Err(ModelError::Invalid {
                field: "fusion_layers",
                message: "objectives.itm needs a fusion encoder (fusion_layers > 0)".into(),
            }
            .into());
        }
        if cfg.objectives.itm > 0.0 && cfg.optim.micro_batch > 0 {
            return Err(TrainError::Batch(
                "optim.micro_batch cannot be combined with objectives.itm".into(),
            ));
        }
        let mut model = Clip::new(&mc, heads, cfg.run.seed as i64, kind)?;
        model.set_grad_checkpointing(cfg.model.grad_checkpointing);
        if let Some(p) = &init {
            crate::checkpoint::load_into(&model, p)?;
        }
        let m = &cfg.model;
        let locked = model.apply_lock(Lock {
            image: m.lock_image.then_some(m.lock_image_unlocked_groups),
            text: m.lock_text.then_some(m.lock_text_unlocked_groups),
        });
        if !locked.is_empty() {
            tracing::info!("{} parameter tensors locked (model.lock_*)", locked.len());
        }
        let named: Vec<(String, Tensor)> = model
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let o = &cfg.optim;
        let opt = optim::AdamW::new(
            &named,
            optim::AdamWConfig {
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
                decay_rule: o.weight_decay_rule,
            },
        );
        let bucket_bytes = if cfg.cluster.bucket_mb > 0.0 {
            (cfg.cluster.bucket_mb * 1024.0 * 1024.0) as usize
        } else {
            DEFAULT_BUCKET_BYTES
        };
        Ok(Self {
            model,
            opt,
            objectives: cfg.objectives.clone(),
            optim: cfg.optim.clone(),
            seed: cfg.run.seed,
            total_steps: total_steps.max(1),
            bucket_bytes,
            buckets: None,
            overlap: match cfg.cluster.overlap_allreduce {
                Switch::On => Some(true),
                Switch::Off => Some(false),
                Switch::Auto => None,
            },
            reducer: None,
            autocast: false,
            step: 0,
            calls: 0,
            last_times: PhaseTimes::default(),
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// The parameters, in model order, as handles sharing their storage and grads.
    fn param_handles(&self) -> Vec<Tensor> {
        self.model
            .params
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect()
    }

    /// Moves every parameter and optimizer state tensor to `device` in place (`set_data` keeps
    /// the tensors' identity, so the model, the optimizer and clones see the move). Call before
    /// the first step: gradient buckets are laid out on the device of the first all-reduce.
    pub fn to_device(&mut self, device: Device) {
        let _g = tch::no_grad_guard();
        let mut all = self.param_handles();
        let n = all.len();
        all.extend(self.state_tensors().into_iter().skip(n));
        for t in &mut all {
            let moved = t.to_device(device);
            t.set_data(&moved);
        }
        self.buckets = None;
        self.reducer = None;
    }

    /// Forward and backward under CUDA autocast (bf16 once `device::set_autocast_bf16` ran;
    /// parameters, gradients and the optimizer stay fp32).
    pub fn set_autocast(&mut self, on: bool) {
        self.autocast = on;
    }

    /// Sets the update counter (resume, or a joiner taking rank 0's state).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
        self.opt.steps = step;
    }

    /// Parameters (detached, sharing storage, so writing into them updates the model), then
    /// AdamW's exp_avg and exp_avg_sq, in a fixed order. The update counter is `step()`.
    pub fn state_tensors(&self) -> Vec<Tensor> {
        let mut v: Vec<Tensor> = self.model.params.iter().map(|(_, t)| t.detach()).collect();
        v.extend(self.opt.state_tensors());
        v
    }

    /// Forward, losses over the global batch, backward and gradient all-reduce for this rank's
    /// batch; no parameter changes.
    pub fn compute_grads(
        &mut self,
        batch: &Batch,
        global_batch: usize,
        coll: &mut dyn Collective,
    ) -> Result<StepLosses> {
        self.compute_grads_tensors(&batch.images, &batch.tokens, global_batch, coll)
    }

    /// `compute_grads` on raw tensors: images [B,3,S,S], tokens [B,ctx]. Gradients accumulate
    /// into the parameters until `apply_update`; on any error they are zeroed.
    pub fn compute_grads_tensors(
        &mut self,
        images: &Tensor,
        tokens: &Tensor,
        global_batch: usize,
        coll: &mut dyn Collective,
    ) -> Result<StepLosses> {
        let r = tch::autocast(self.autocast, || {
            self.forward_backward(images, tokens, global_batch, coll)
        });
        self.calls += 1;
        if r.is_err() {
            self.zero_grad();
        }
        r
    }

    /// The three objectives in a fixed order (every rank issues the same collectives in the same
    /// order, rows or not), then the one model backward and the gradient all-reduce.
    fn forward_backward(
        &mut self,
        images: &Tensor,
        tokens: &Tensor,
        global_batch: usize,
        coll: &mut dyn Collective,
    ) -> Result<StepLosses> {
        let n = self.check_batch(images, tokens, global_batch)?;
        let t0 = std::time::Instant::now();
        let rows = Rows::locate(n, global_batch, images.device(), coll)?;
        if self.optim.micro_batch > 0 {
            let micro = i64::from(self.optim.micro_batch);
            return self.forward_backward_micro(images, tokens, &rows, micro, coll);
        }
        let o = self.objectives.clone();
        let mut out = StepLosses::default();
        // What goes back through the towers in the one model backward.
        let mut surrogate: Vec<Tensor> = Vec::new();
        let mut backward_s = 0.0;
        // Both contrastive objectives (when both are on) and ITM's sampling score the same
        // features; ITM's token sequences come from the same tower passes.
        let itm = o.itm > 0.0 && self.model.fusion.is_some();
        let mut itm_inputs = None;
        let features = (o.contrastive > 0.0 || o.siglip > 0.0 || itm).then(|| {
            if itm {
                let (i, t, x) = self.features_and_tokens(images, tokens, &rows);
                itm_inputs = Some(x);
                (i, t)
            } else {
                self.features(images, tokens, &rows)
            }
        });
        if let (true, Some((img_f, txt_f))) = (o.contrastive > 0.0, &features) {
            let t = self.contrastive(img_f, txt_f, &rows, coll)?;
            out.contrastive = t.loss;
            backward_s += t.backward_s;
            surrogate.extend(t.surrogate);
        }
        if let (true, Some((img_f, txt_f))) = (o.siglip > 0.0, &features) {
            let t = self.siglip(img_f, txt_f, &rows, coll)?;
            out.siglip = t.loss;
            backward_s += t.backward_s;
            surrogate.extend(t.surrogate);
        }
        if let (Some(x), Some((img_f, txt_f))) = (&itm_inputs, &features) {
            let t = self.itm(img_f, txt_f, x, &rows, coll)?;
            out.itm = t.loss;
            backward_s += t.backward_s;
            surrogate.extend(t.surrogate);
        }
        if o.mlm > 0.0 && self.model.mlm.is_some() {
            let t = self.mlm(tokens, &rows, coll)?;
            out.mlm = t.loss;
            surrogate.extend(t.surrogate);
        }
        if o.mae > 0.0 && rows.n > 0 && self.model.mae.is_some() {
            let t = self.mae(images, &rows)?;
            out.mae = t.loss;
            surrogate.extend(t.surrogate);
        }
        out.total = out.weighted(&o, self.step)?;
        let tb = std::time::Instant::now();
        let forward_s = tb.duration_since(t0).as_secs_f64() - backward_s;
        backward_s += self.backward(&surrogate, rows.device, tb, coll)?;
        self.last_times = PhaseTimes {
            forward_s,
            backward_s,
        };
        Ok(out)
    }

    /// This rank's row count, once the batch's shapes fit the model and `global_batch`.
    fn check_batch(&self, images: &Tensor, tokens: &Tensor, global_batch: usize) -> Result<i64> {
        let c = &self.model.config;
        let n = images.size().first().copied().unwrap_or(0);
        if images.size() != [n, 3, c.image_size, c.image_size] {
            return Err(TrainError::Batch(format!(
                "images have shape {:?}, the model needs [B, 3, {s}, {s}]",
                images.size(),
                s = c.image_size
            )));
        }
        if tokens.dim() != 2 || tokens.size()[0] != n || tokens.size()[1] > c.context_length {
            return Err(TrainError::Batch(format!(
                "tokens have shape {:?}, need [{n}, <= {}]",
                tokens.size(),
                c.context_length
            )));
        }
        // A rank may get no samples in the last, partial step of a run: it still takes part in
        // every collective (with empty or zero tensors) so its peers do not wait for it.
        if global_batch == 0 || global_batch < n as usize {
            return Err(TrainError::Batch(format!(
                "local batch {n} must be in 0..=global batch {global_batch} (and that above 0)"
            )));
        }
        Ok(n)
    }

    /// The shared tail: one backward of the objectives' surrogate terms through the model, and
    /// the gradient all-reduce (overlapped with that backward, or after it). `tb`: when the
    /// backward phase started. Returns its seconds.
    fn backward(
        &mut self,
        surrogate: &[Tensor],
        dev: Device,
        tb: std::time::Instant,
        coll: &mut dyn Collective,
    ) -> Result<f64> {
        // Nothing to back-propagate when every parameter the surrogates reach is locked.
        let model_loss = (!surrogate.is_empty())
            .then(|| Tensor::stack(surrogate, 0).sum(self.model.kind()))
            .filter(|l| l.requires_grad());
        // Overlapped: buckets are all-reduced while this backward runs, in the same order and
        // layout as the plain path's, so a rank taking the plain path (no rows) still matches.
        let overlap = self.overlap.unwrap_or(dev.is_cuda());
        if let (true, true, Some(l)) = (overlap, coll.world_size() > 1, &model_loss) {
            let mut reducer = match self.reducer.take() {
                Some(r) => r,
                None => OverlappedReducer::new(&self.param_handles(), self.bucket_bytes)?,
            };
            let stats = reducer.backward(l, coll);
            self.reducer = Some(reducer);
            Ok(stats?.backward_s)
        } else {
            if let Some(l) = &model_loss {
                l.backward();
            }
            let backward_s = tb.elapsed().as_secs_f64();
            if coll.world_size() > 1 {
                self.all_reduce_grads(coll)?;
            }
            Ok(backward_s)
        }
    }

    /// Elements of each gradient bucket the plain all-reduce sends (None before its first
    /// all-reduce): the trainable parameters only.
    pub fn bucket_sizes(&self) -> Option<Vec<usize>> {
        self.buckets.as_ref().map(GradBuckets::bucket_sizes)
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn Collective) -> Result<()> {
        if self.buckets.is_none() {
            self.buckets = Some(GradBuckets::new(&self.param_handles(), self.bucket_bytes)?);
        }
        if let Some(b) = self.buckets.as_mut() {
            b.all_reduce_grads(coll)?;
        }
        Ok(())
    }

    /// Clip by global norm, AdamW with the scheduled learning rate, clamp the logit scale,
    /// zero the gradients, advance the step.
    pub fn apply_update(&mut self) -> Result<UpdateStats> {
        let lr = optim::cosine_lr(
            self.optim.lr,
            self.step,
            self.optim.warmup_steps,
            self.total_steps,
        );
        let params = self.param_handles();
        // The all-reduce gives every trainable parameter a grad (zeros where no objective reached
        // it); so does a single process, so that AdamW's decay treats them alike. Locked ones
        // have none, so AdamW leaves them as they are.
        for p in params
            .iter()
            .filter(|p| p.requires_grad() && !p.grad().defined())
        {
            let _zeros = crate::collective::buckets::materialize_grad(p)?;
        }
        let grad_norm = optim::clip_grad_norm(&params, self.optim.grad_clip);
        self.opt.step(lr);
        self.model.clamp_logit_scale();
        self.zero_grad();
        self.step += 1;
        self.calls = 0;
        Ok(UpdateStats { lr, grad_norm })
    }

    /// Drops every gradient (set to none, as PyTorch's default `zero_grad`): the next backward
    /// hands each parameter its gradient instead of zero-filling 4 bytes per parameter and
    /// adding into them.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.model.params.iter() {
            if !crate::optim::fused::clear_grad(p) {
                let mut p = p.shallow_clone();
                p.zero_grad();
            }
        }
    }
}
