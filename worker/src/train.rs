//! One optimizer step, split the way the distributed loop needs it: `compute_grads` (forward,
//! losses over the global batch, backward, gradient all-reduce; parameters untouched) and
//! `apply_update` (clip, AdamW, schedule). With `Single` this is plain single-process training.
//!
//! Contrastive loss over the global batch with exact gradients: features are all-gathered
//! (detached) into leaves, each rank takes its rows against all columns, the leaves' gradients
//! are summed across ranks and this rank's slice is pushed back through its towers in one
//! backward together with MLM and MAE.

use crate::collective::buckets::{GradBuckets, DEFAULT_BUCKET_BYTES};
use crate::collective::{Collective, CollectiveError};
use crate::data::Batch;
use crate::model::transformer::Attend;
use crate::model::{masking, Clip, Heads, ModelConfig, ModelError};
use crate::overlap::OverlappedReducer;
use crate::{loss, optim};
use ferroclip_proto::config::{Objectives, OptimSection, RunConfig, Switch};
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
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// This rank's losses for one `compute_grads` call: local means, before weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLosses {
    /// Weighted sum of the enabled objectives.
    pub total: f64,
    pub contrastive: f64,
    pub mlm: f64,
    pub mae: f64,
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
        let mc = ModelConfig::from_section(&cfg.model)?;
        let heads = Heads {
            mlm: cfg.objectives.mlm > 0.0,
            mae: cfg.objectives.mae > 0.0,
        };
        let model = Clip::new(&mc, heads, cfg.run.seed as i64, kind)?;
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

    /// One RNG per row for masks and patch dropout, a function of (seed, step, call, objective,
    /// the row's index in the global batch): the same masks whatever the world size, and a
    /// resumed run draws them again without saving generator state.
    fn row_rngs(&self, stream: u64, first_row: i64, n: i64) -> Vec<StdRng> {
        (first_row..first_row + n)
            .map(|row| {
                let mix = self
                    .seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(self.step.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                    .wrapping_add(self.calls.wrapping_mul(0x94D0_49BB_1331_11EB))
                    .wrapping_add(stream.wrapping_mul(0xD6E8_FEB8_6659_FD93))
                    .wrapping_add(row as u64);
                StdRng::seed_from_u64(mix)
            })
            .collect()
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

    fn forward_backward(
        &mut self,
        images: &Tensor,
        tokens: &Tensor,
        global_batch: usize,
        coll: &mut dyn Collective,
    ) -> Result<StepLosses> {
        let c = self.model.config.clone();
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
        let scale = n as f64 / global_batch as f64;
        let t0 = std::time::Instant::now();
        let mut backward_s = 0.0;
        // Where this rank's rows sit in the global batch (masks and the contrastive labels).
        let lens = coll.all_gather(&Tensor::from_slice(&[n]).to_device(images.device()))?;
        let lens: Vec<i64> = Vec::<i64>::try_from(lens.to_device(tch::Device::Cpu))?;
        let offset: i64 = lens[..coll.rank().min(lens.len())].iter().sum();
        let o = self.objectives.clone();
        let m = &self.model;
        let dev = images.device();
        let g = c.num_patches();
        let mut out = StepLosses::default();
        // What goes back through the towers in the one model backward.
        let mut surrogate: Vec<Tensor> = Vec::new();

        if o.contrastive > 0.0 {
            let keep = (o.patch_dropout > 0.0).then(|| {
                let mut rows = self.row_rngs(1, offset, n);
                masking::patch_keep(&mut rows, g, masking::kept(g, o.patch_dropout)).to_device(dev)
            });
            let (img_f, txt_f) = if n > 0 {
                (
                    m.image_features(images, keep.as_ref()),
                    m.text_features(tokens),
                )
            } else {
                let empty = Tensor::zeros([0, c.embed_dim], (m.kind(), dev));
                (empty.shallow_clone(), empty)
            };
            let all_img = coll
                .all_gather(&img_f.detach())?
                .detach()
                .set_requires_grad(true);
            let all_txt = coll
                .all_gather(&txt_f.detach())?
                .detach()
                .set_requires_grad(true);
            let l = if n > 0 {
                loss::contrastive(&all_img, &all_txt, &m.logit_scale, offset, n)
            } else {
                // Zero, but with defined (zero) gradients for the all-reduces below.
                (all_img.sum(m.kind()) + all_txt.sum(m.kind()) + &m.logit_scale) * 0.0
            };
            out.contrastive = l.double_value(&[]);
            let tb = std::time::Instant::now();
            (l * (o.contrastive * scale)).backward();
            backward_s += tb.elapsed().as_secs_f64();
            let mut g_img = all_img.grad();
            let mut g_txt = all_txt.grad();
            coll.all_reduce_sum(&mut g_img)?;
            coll.all_reduce_sum(&mut g_txt)?;
            if n > 0 {
                surrogate.push((&img_f * g_img.narrow(0, offset, n)).sum(img_f.kind()));
                surrogate.push((&txt_f * g_txt.narrow(0, offset, n)).sum(txt_f.kind()));
            }
        }

        if let (true, Some(head)) = (o.mlm > 0.0, &m.mlm) {
            let local = if n > 0 {
                let len = tokens.size()[1];
                let flat = Vec::<i64>::try_from(
                    tokens
                        .to_device(tch::Device::Cpu)
                        .to_kind(Kind::Int64)
                        .flatten(0, -1),
                )?;
                let mut rows = self.row_rngs(2, offset, n);
                let mk = masking::mlm_mask(&mut rows, &flat, len, o.mlm_ratio, c.vocab_size);
                let attend = mk.attend.to_device(dev);
                let replace = mk.replace.to_device(dev);
                let h = m.text.hidden(
                    &mk.input.to_device(dev),
                    Attend::Mask(&attend),
                    Some((&replace, &head.mask_embedding)),
                );
                let chosen = h.index(&[Some(mk.chosen.to_device(dev))]);
                let logits = head.forward(&chosen, &m.text.token_embedding);
                Some((
                    loss::mlm_sum(&logits, &mk.labels.to_device(dev)),
                    mk.labels.numel(),
                ))
            } else {
                None
            };
            // BERT's token mean over the global batch: divide by every rank's chosen count.
            let chosen = local.as_ref().map_or(0, |(_, k)| *k) as f64;
            let mut count = Tensor::from_slice(&[chosen as f32]).to_device(dev);
            coll.all_reduce_sum(&mut count)?;
            let global = count.double_value(&[0]).max(1.0);
            if let Some((l, _)) = local {
                out.mlm = l.double_value(&[]) / chosen.max(1.0);
                surrogate.push(l * (o.mlm / global));
            }
        }

        if let (true, true, Some(dec)) = (o.mae > 0.0, n > 0, &m.mae) {
            // Every row hides as many patches, so local mean × n/B sums to the global mean.
            let mut rows = self.row_rngs(3, offset, n);
            let mk = masking::mae_mask(&mut rows, g, o.mae_ratio);
            let enc = m
                .visual
                .ln_post
                .forward(&m.visual.tokens(images, Some(&mk.keep.to_device(dev))));
            let pred = dec.forward(&enc, &mk.restore.to_device(dev));
            let l = loss::mae(&pred, images, &mk.hidden.to_device(dev), c.patch_size);
            out.mae = l.double_value(&[]);
            surrogate.push(l * (o.mae * scale));
        }

        out.total = o.contrastive * out.contrastive + o.mlm * out.mlm + o.mae * out.mae;
        if !out.total.is_finite() {
            return Err(TrainError::NonFinite {
                loss: out.total,
                step: self.step,
            });
        }
        let tb = std::time::Instant::now();
        let forward_s = tb.duration_since(t0).as_secs_f64() - backward_s;
        let model_loss =
            (!surrogate.is_empty()).then(|| Tensor::stack(&surrogate, 0).sum(self.model.kind()));
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
            backward_s += stats?.backward_s;
        } else {
            if let Some(l) = &model_loss {
                l.backward();
            }
            backward_s += tb.elapsed().as_secs_f64();
            if coll.world_size() > 1 {
                self.all_reduce_grads(coll)?;
            }
        }
        self.last_times = PhaseTimes {
            forward_s,
            backward_s,
        };
        Ok(out)
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
        // The all-reduce gives every parameter a grad (zeros where no objective reached it);
        // so does a single process, so that AdamW's decay treats them alike.
        for p in params.iter().filter(|p| !p.grad().defined()) {
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
