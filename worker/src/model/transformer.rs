//! OpenCLIP's pre-LN residual attention block and the stack of them (`<scope>.resblocks.N.*`).

use super::params::{LayerNorm, Linear, Params, Scope};
use tch::Tensor;

/// How tokens may attend to each other.
#[derive(Debug, Clone, Copy)]
pub enum Attend<'a> {
    /// Every token sees every token (vision tower, MAE decoder).
    All,
    /// Token i sees tokens 0..=i (the text tower's contrastive pass).
    Causal,
    /// Boolean mask broadcastable to [B, heads, N, N], true = may attend (MLM: no padding).
    Mask(&'a Tensor),
}

#[derive(Debug)]
pub struct Block {
    ln_1: LayerNorm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: i64,
    /// OpenAI's x·σ(1.702x) instead of GELU (OpenCLIP's `quick_gelu`).
    quick_gelu: bool,
}

impl Block {
    /// `layers` is the depth of the whole stack: OpenCLIP scales output projections by it.
    pub fn new(p: &mut Params, s: &Scope, width: i64, heads: i64, layers: i64) -> Self {
        let w = width as f64;
        let attn_std = w.powf(-0.5);
        let proj_std = w.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
        let fc_std = (2.0 * w).powf(-0.5);
        let attn = s.sub("attn");
        let mlp = s.sub("mlp");
        Self {
            ln_1: LayerNorm::new(p, &s.sub("ln_1"), width),
            in_proj_weight: p.normal(
                attn.name("in_proj_weight"),
                &[3 * width, width],
                attn_std,
                s.kind,
            ),
            in_proj_bias: p.constant(attn.name("in_proj_bias"), &[3 * width], 0.0, s.kind),
            out_proj: Linear::new(p, &attn.sub("out_proj"), width, width, proj_std),
            ln_2: LayerNorm::new(p, &s.sub("ln_2"), width),
            c_fc: Linear::new(p, &mlp.sub("c_fc"), width, 4 * width, fc_std),
            c_proj: Linear::new(p, &mlp.sub("c_proj"), 4 * width, width, proj_std),
            heads,
            quick_gelu: false,
        }
    }

    /// A second handle on the same parameters (what a checkpointed block's backward keeps).
    pub(super) fn shallow_clone(&self) -> Self {
        Self {
            ln_1: self.ln_1.shallow_clone(),
            in_proj_weight: self.in_proj_weight.shallow_clone(),
            in_proj_bias: self.in_proj_bias.shallow_clone(),
            out_proj: self.out_proj.shallow_clone(),
            ln_2: self.ln_2.shallow_clone(),
            c_fc: self.c_fc.shallow_clone(),
            c_proj: self.c_proj.shallow_clone(),
            heads: self.heads,
            quick_gelu: self.quick_gelu,
        }
    }

    /// The block's parameter tensors.
    pub(super) fn params(&self) -> Vec<&Tensor> {
        let mut v = vec![
            &self.ln_1.weight,
            &self.ln_1.bias,
            &self.in_proj_weight,
            &self.in_proj_bias,
            &self.out_proj.weight,
            &self.ln_2.weight,
            &self.ln_2.bias,
            &self.c_fc.weight,
            &self.c_proj.weight,
        ];
        v.extend(
            [&self.out_proj.bias, &self.c_fc.bias, &self.c_proj.bias]
                .into_iter()
                .flatten(),
        );
        v
    }

    /// x: [B, N, W] → [B, N, W].
    pub fn forward(&self, x: &Tensor, attend: Attend) -> Tensor {
        let (b, n, w) = x.size3().unwrap_or((0, 0, 0));
        let hd = w / self.heads;
        let qkv = self
            .ln_1
            .forward(x)
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .view([b, n, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        // unbind, not three selects: its backward stacks the three grads in one copy, where each
        // select's backward zero-fills a qkv-sized buffer and copies its slice in.
        let parts = qkv.unbind(0); // dim 0 is the 3 of the view above
        let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
        let (mask, causal) = match attend {
            Attend::All => (None, false),
            Attend::Causal => (None, true),
            Attend::Mask(m) => (Some(m), false),
        };
        let a = Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None, false)
            .transpose(1, 2)
            .reshape([b, n, w]);
        let x = x + self.out_proj.forward(&a);
        let fc = self.c_fc.forward(&self.ln_2.forward(&x));
        let act = if self.quick_gelu {
            &fc * (&fc * 1.702).sigmoid()
        } else {
            fc.gelu("none")
        };
        let h = self.c_proj.forward(&act);
        x + h
    }
}

/// `<scope>.resblocks.{0..layers}`.
#[derive(Debug)]
pub struct Transformer {
    blocks: Vec<Block>,
    /// Recompute each block's activations in backward (`model.grad_checkpointing`).
    checkpoint: bool,
}

impl Transformer {
    pub fn new(p: &mut Params, s: &Scope, width: i64, layers: i64, heads: i64) -> Self {
        let rb = s.sub("resblocks");
        let blocks = (0..layers)
            .map(|i| Block::new(p, &rb.sub(i), width, heads, layers))
            .collect();
        Self {
            blocks,
            checkpoint: false,
        }
    }

    /// QuickGELU in every block (OpenAI's weights were trained with it).
    pub fn set_quick_gelu(&mut self, on: bool) {
        for b in &mut self.blocks {
            b.quick_gelu = on;
        }
    }

    /// Keep only each block's input for backward and recompute the rest there.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpoint = on;
    }

    pub fn forward(&self, x: &Tensor, attend: Attend) -> Tensor {
        let mut x = x.shallow_clone();
        for b in &self.blocks {
            x = if self.checkpoint {
                super::recompute::checkpointed(b, &x, attend)
            } else {
                b.forward(&x, attend)
            };
        }
        x
    }
}
