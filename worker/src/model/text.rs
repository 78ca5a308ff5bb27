//! OpenCLIP's text tower (top-level keys: `token_embedding`, `positional_embedding`,
//! `transformer.*`, `ln_final`, `text_projection`): causal blocks, pooled at the end-of-text token.

use super::params::{LayerNorm, Params, Scope};
use super::transformer::{Attend, Transformer};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct TextTower {
    pub token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
}

impl TextTower {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Params,
        s: &Scope,
        ctx: i64,
        vocab: i64,
        width: i64,
        layers: i64,
        heads: i64,
        embed_dim: i64,
    ) -> Self {
        let k = s.kind;
        Self {
            token_embedding: p.normal(s.name("token_embedding.weight"), &[vocab, width], 0.02, k),
            positional_embedding: p.normal(s.name("positional_embedding"), &[ctx, width], 0.01, k),
            transformer: Transformer::new(p, &s.sub("transformer"), width, layers, heads),
            ln_final: LayerNorm::new(p, &s.sub("ln_final"), width),
            text_projection: p.normal(
                s.name("text_projection"),
                &[width, embed_dim],
                (width as f64).powf(-0.5),
                k,
            ),
        }
    }

    /// Final hidden states [B, N, W] after ln_final. `replace`: positions ([B, N] bool) whose
    /// token embedding is swapped for a learned vector (MLM's mask token).
    pub fn hidden(
        &self,
        tokens: &Tensor,
        attend: Attend,
        replace: Option<(&Tensor, &Tensor)>,
    ) -> Tensor {
        let n = tokens.size()[1];
        let mut x = Tensor::embedding(&self.token_embedding, tokens, -1, false, false);
        if let Some((where_, vector)) = replace {
            x = x.where_self(&where_.unsqueeze(-1).logical_not(), vector);
        }
        let x = x + self.positional_embedding.narrow(0, 0, n);
        self.ln_final.forward(&self.transformer.forward(&x, attend))
    }

    /// Text embedding [B, E] (not normalised), pooled at the highest token id of each row:
    /// end-of-text is the largest id of CLIP's vocabulary (OpenCLIP's "argmax" pooling).
    pub fn encode(&self, tokens: &Tensor) -> Tensor {
        let x = self.hidden(tokens, Attend::Causal, None);
        let b = tokens.size()[0];
        let eot = tokens.argmax(-1, false);
        let rows = Tensor::arange(b, (Kind::Int64, tokens.device()));
        x.index(&[Some(rows), Some(eot)])
            .matmul(&self.text_projection)
    }

    pub fn context_length(&self) -> i64 {
        self.positional_embedding.size()[0]
    }

    pub fn vocab_size(&self) -> i64 {
        self.token_embedding.size()[0]
    }
}
