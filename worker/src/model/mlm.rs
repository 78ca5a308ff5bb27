//! The MLM head (`mlm.*`, stripped from `model.safetensors`): dense + GELU + LayerNorm, then
//! logits against the token embedding matrix (tied weights) plus a bias. `mlm.mask_embedding`
//! stands in for BERT's [MASK]: CLIP's vocabulary has no spare token.

use super::params::{LayerNorm, Linear, Params, Scope};
use tch::Tensor;

#[derive(Debug)]
pub struct MlmHead {
    dense: Linear,
    ln: LayerNorm,
    bias: Tensor,
    mask_embedding: Tensor,
}

impl MlmHead {
    pub fn new(p: &mut Params, s: &Scope, width: i64, vocab: i64) -> Self {
        Self {
            dense: Linear::new(p, &s.sub("dense"), width, width, (width as f64).powf(-0.5)),
            ln: LayerNorm::new(p, &s.sub("ln"), width),
            bias: p.constant(s.name("bias"), &[vocab], 0.0, s.kind),
            mask_embedding: p.normal(s.name("mask_embedding"), &[width], 0.02, s.kind),
        }
    }

    /// The learned vector that stands in for a masked token's embedding.
    pub fn mask_embedding(&self) -> &Tensor {
        &self.mask_embedding
    }

    /// hidden: [M, W] states at the chosen positions → logits [M, vocab].
    pub fn forward(&self, hidden: &Tensor, token_embedding: &Tensor) -> Tensor {
        let h = self.ln.forward(&self.dense.forward(hidden).gelu("none"));
        h.linear(token_embedding, Some(&self.bias))
    }
}
