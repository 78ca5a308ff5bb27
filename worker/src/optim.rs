//! AdamW as PyTorch computes it (decoupled decay, bias correction), OpenCLIP's cosine schedule
//! with linear warmup, and clipping by global norm. The state is plain tensors so checkpoints
//! and the distributed join can move it.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// OpenCLIP excludes gains, biases and the logit scale from weight decay; the issue adds
/// embeddings (token, positional, class) and the MAE/MLM learned vectors.
pub fn decays(name: &str, shape: &[i64]) -> bool {
    !(shape.len() < 2
        || name.contains("embedding")
        || name.contains("pos_embed")
        || name == "logit_scale")
}

#[derive(Debug)]
struct Slot {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Updates applied so far (bias correction uses it).
    pub steps: u64,
}

impl AdamW {
    /// `params`: (name, leaf tensor) in a fixed order.
    pub fn new(params: &[(String, Tensor)], cfg: AdamWConfig) -> Self {
        let slots = params
            .iter()
            .map(|(name, p)| Slot {
                param: p.shallow_clone(),
                exp_avg: p.detach().zeros_like(),
                exp_avg_sq: p.detach().zeros_like(),
                decay: decays(name, &p.size()),
            })
            .collect();
        Self {
            cfg,
            slots,
            steps: 0,
        }
    }

    /// One update with learning rate `lr` from the gradients currently in the parameters.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let c = self.cfg;
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        tch::no_grad(|| {
            for s in &mut self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = s.param.detach();
                if s.decay && c.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = s.exp_avg.lerp_(&g, 1.0 - c.beta1);
                // b2·v + (1-b2)·g² as one in-place op.
                let _ = s.exp_avg_sq.lerp_(&g.square(), 1.0 - c.beta2);
                if lr <= 0.0 {
                    continue;
                }
                // p -= lr/bc1 · m / (√v/√bc2 + eps), with the step size folded into the
                // denominator so the whole update allocates one temporary.
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bc2_sqrt);
                let _ = denom.g_add_scalar_(c.eps);
                let _ = denom.g_mul_scalar_(-bc1 / lr);
                let _ = p.addcdiv_(&s.exp_avg, &denom);
            }
        });
    }

    /// exp_avg then exp_avg_sq of every parameter, in parameter order (sharing storage).
    pub fn state_tensors(&self) -> Vec<Tensor> {
        let mut v: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.exp_avg.shallow_clone())
            .collect();
        v.extend(self.slots.iter().map(|s| s.exp_avg_sq.shallow_clone()));
        v
    }
}

/// OpenCLIP's `cosine_lr`: linear warmup over `warmup` steps, then half a cosine down to 0 at
/// `total`. `step` counts from 0.
pub fn cosine_lr(base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let e = (step - warmup) as f64;
    let es = total.saturating_sub(warmup).max(1) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * (e / es).min(1.0)).cos()) * base
}

/// Scales gradients so their global L2 norm is at most `max_norm` (as torch's
/// clip_grad_norm_, eps 1e-6). Returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let sq: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
            .collect();
        let total = Tensor::stack(&sq, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
        total
    })
}
