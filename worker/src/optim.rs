//! AdamW as PyTorch computes it (decoupled decay, bias correction), OpenCLIP's cosine schedule
//! with linear warmup, and clipping by global norm. The state is plain tensors so checkpoints
//! and the distributed join can move it.

pub mod decay;
pub mod fused;

pub use decay::decays;
use ferroclip_proto::config::WeightDecayRule;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Which parameters `weight_decay` applies to (`decay::decays`).
    pub decay_rule: WeightDecayRule,
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
    /// libtorch's fused kernel; off after it refused once (then the tensor-op path runs).
    fused: bool,
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
                decay: decays(cfg.decay_rule, name, &p.size()),
            })
            .collect();
        Self {
            cfg,
            slots,
            steps: 0,
            fused: true,
        }
    }

    /// One update with learning rate `lr` from the gradients currently in the parameters.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let c = self.cfg;
        for decay in [true, false] {
            let picked: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].decay == decay && self.slots[i].param.grad().defined())
                .collect();
            if self.fused {
                let group = fused::Group {
                    params: picked.iter().map(|&i| &self.slots[i].param).collect(),
                    grads: picked.iter().map(|&i| self.slots[i].param.grad()).collect(),
                    exp_avgs: picked.iter().map(|&i| &self.slots[i].exp_avg).collect(),
                    exp_avg_sqs: picked.iter().map(|&i| &self.slots[i].exp_avg_sq).collect(),
                };
                let hyper = fused::Hyper {
                    step: self.steps,
                    lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    weight_decay: if decay { c.weight_decay } else { 0.0 },
                    eps: c.eps,
                };
                match fused::adamw(&group, &hyper) {
                    Ok(()) => continue,
                    Err(e) => {
                        // The kernel checks dtypes and devices before it writes anything.
                        tracing::info!("fused AdamW unavailable, using tensor ops: {e}");
                        self.fused = false;
                    }
                }
            }
            for &i in &picked {
                self.step_one(i, lr);
            }
        }
    }

    /// AdamW on one parameter with tensor ops (the fused kernel's fallback).
    fn step_one(&mut self, i: usize, lr: f64) {
        let c = self.cfg;
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let s = &mut self.slots[i];
        tch::no_grad(|| {
            let g = s.param.grad();
            let mut p = s.param.detach();
            if s.decay && c.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = s.exp_avg.lerp_(&g, 1.0 - c.beta1);
            // b2·v + (1-b2)·g² as one in-place op.
            let _ = s.exp_avg_sq.lerp_(&g.square(), 1.0 - c.beta2);
            if lr <= 0.0 {
                return;
            }
            // p -= lr/bc1 · m / (√v/√bc2 + eps), with the step size folded into the
            // denominator so the whole update allocates one temporary.
            let mut denom = s.exp_avg_sq.sqrt();
            let _ = denom.g_div_scalar_(bc2_sqrt);
            let _ = denom.g_add_scalar_(c.eps);
            let _ = denom.g_mul_scalar_(-bc1 / lr);
            let _ = p.addcdiv_(&s.exp_avg, &denom);
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
        // Per-tensor norms, then the norm of those, as torch does (no f64 copy of every grad).
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0)
            .to_kind(Kind::Double)
            .square()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Named leaves with grads: two that decay (matrices), two that do not (a bias, a gain).
    fn params(seed: i64) -> Vec<(String, Tensor)> {
        tch::manual_seed(seed);
        [
            ("w1", vec![64, 32]),
            ("b1", vec![64]),
            ("w2", vec![16, 64]),
            ("ln.weight", vec![16]),
        ]
        .into_iter()
        .map(|(n, shape)| {
            let p = Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
                .set_requires_grad(true);
            (n.to_string(), p)
        })
        .collect()
    }

    fn run(fused: bool, steps: i64) -> (Vec<Tensor>, bool) {
        let ps = params(3);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
            decay_rule: WeightDecayRule::Openclip,
        };
        let mut opt = AdamW::new(&ps, cfg);
        opt.fused = fused;
        for s in 0..steps {
            tch::manual_seed(100 + s);
            for (_, p) in &ps {
                let g = Tensor::randn(p.size().as_slice(), (Kind::Float, tch::Device::Cpu));
                let mut grad = p.grad();
                if grad.defined() {
                    tch::no_grad(|| grad.copy_(&g));
                } else {
                    (p * &g).sum(Kind::Float).backward();
                }
            }
            opt.step(1e-2);
        }
        (
            ps.iter().map(|(_, p)| p.detach().copy()).collect(),
            opt.fused,
        )
    }

    #[test]
    fn the_fused_kernel_runs_and_matches_the_tensor_op_update() {
        let (fused, still_fused) = run(true, 5);
        assert!(
            still_fused,
            "libtorch's fused AdamW refused f32 CPU tensors"
        );
        let (plain, _) = run(false, 5);
        let init = params(3);
        for ((a, b), (_, p0)) in fused.iter().zip(&plain).zip(&init) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "fused vs tensor ops differ by {diff}");
            let moved = (a - p0).abs().max().double_value(&[]);
            assert!(moved > 1e-3, "a parameter did not move");
        }
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        let ps = params(4);
        for (_, p) in &ps {
            (p * 3.0).sum(Kind::Float).backward();
        }
        let grads: Vec<Tensor> = ps.iter().map(|(_, p)| p.shallow_clone()).collect();
        let n: i64 = ps.iter().map(|(_, p)| p.numel() as i64).sum();
        let want = 3.0 * (n as f64).sqrt();
        let got = clip_grad_norm(&grads, 1.0);
        assert!((got - want).abs() < 1e-3 * want, "{got} vs {want}");
        let after: f64 = ps
            .iter()
            .map(|(_, p)| p.grad().square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        assert!((after - 1.0).abs() < 1e-4, "norm after clipping {after}");
    }
}
