//! OpenCLIP's text tower (top-level keys: `token_embedding`, `positional_embedding`,
//! `transformer.*`, `ln_final`, `text_projection`): causal blocks, pooled at the end-of-text token.

use super::params::{LayerNorm, Params, Scope};
use super::transformer::{Attend, Transformer};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct TextTower {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    pub(super) transformer: Transformer,
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
    pub(super) fn hidden(
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
    ///
    /// Only the columns up to the batch's last end-of-text run: under causal attention a
    /// position never sees later ones, so the trailing padding cannot change the result and
    /// computing it is waste (captions are far shorter than the context, 77 in CLIP).
    pub fn encode(&self, tokens: &Tensor) -> Tensor {
        self.encode_with_hidden(tokens).0
    }

    /// `encode`, the hidden states it pooled from [B, used, W] (after ln_final, the columns up
    /// to the batch's last end-of-text) and each row's end-of-text position [B].
    pub fn encode_with_hidden(&self, tokens: &Tensor) -> (Tensor, Tensor, Tensor) {
        let b = tokens.size()[0];
        let eot = tokens.argmax(-1, false);
        let n = tokens.size()[1];
        let used = if b == 0 {
            n
        } else {
            i64::try_from(eot.max()).map_or(n, |last| last + 1)
        };
        let x = self.hidden(&tokens.narrow(1, 0, used), Attend::Causal, None);
        let rows = Tensor::arange(b, (Kind::Int64, tokens.device()));
        let f = x
            .index(&[Some(rows), Some(eot.shallow_clone())])
            .matmul(&self.text_projection);
        (f, x, eot)
    }

    /// The token embedding matrix [vocab, W] (MLM's head ties its output weights to it).
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    pub fn context_length(&self) -> i64 {
        self.positional_embedding.size()[0]
    }

    pub fn vocab_size(&self) -> i64 {
        self.token_embedding.size()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encode` skips the columns after the last end-of-text; the features and every gradient
    /// must equal those of running the whole context. In f64: the two sides add in different
    /// orders (7 columns against 16), which in f32 differs by ~1e-7 depending on the CPU's
    /// kernels; in f64 by ~1e-15, so a tight bound still means "the same function".
    #[test]
    fn trimmed_encoding_equals_the_full_context() {
        tch::manual_seed(3);
        let mut p = Params::default();
        let tower = TextTower::new(&mut p, &Scope::root(Kind::Double), 16, 50, 32, 2, 4, 8);
        // End-of-text (49, the largest id) at columns 3 and 6; zero padding after.
        let tokens = Tensor::from_slice2(&[
            [48i64, 5, 7, 49, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [48, 9, 2, 11, 4, 8, 49, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]);
        let full = {
            let x = tower.hidden(&tokens, Attend::Causal, None);
            let eot = tokens.argmax(-1, false);
            x.index(&[
                Some(Tensor::arange(2, (Kind::Int64, tch::Device::Cpu))),
                Some(eot),
            ])
            .matmul(&tower.text_projection)
        };
        let grads = |out: &Tensor| -> Vec<Tensor> {
            p.iter().for_each(|(_, t)| {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            });
            (out * out).sum(Kind::Double).backward();
            p.iter().map(|(_, t)| t.grad().copy()).collect()
        };
        let g_full = grads(&full);
        let trimmed = tower.encode(&tokens);
        assert!(
            trimmed.allclose(&full, 1e-10, 1e-10, false),
            "{trimmed} vs {full}"
        );
        let g_trim = grads(&trimmed);
        // Same sums in a different order: compare against each gradient's scale.
        for ((name, _), (a, b)) in p.iter().zip(g_full.iter().zip(&g_trim)) {
            let d = f64::try_from((a - b).abs().max()).unwrap();
            let m = f64::try_from(a.abs().max()).unwrap();
            assert!(
                d <= 1e-10 * m,
                "gradient of {name} differs by {d} (max {m})"
            );
        }
        // The positions after the last end-of-text got no gradient either way.
        let pos = &g_trim[1];
        assert_eq!(
            f64::try_from(pos.narrow(0, 7, 9).abs().sum(Kind::Double)).unwrap(),
            0.0
        );
        assert!(f64::try_from(pos.narrow(0, 0, 7).abs().sum(Kind::Double)).unwrap() > 0.0);
    }
}
