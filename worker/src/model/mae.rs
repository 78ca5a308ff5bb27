//! The MAE decoder (`mae.*`, not an OpenCLIP key: stripped from `model.safetensors`). It takes the
//! encoded visible patches, puts a learned mask token at every hidden position and predicts each
//! patch's pixels.

use super::params::{LayerNorm, Linear, Params, Scope};
use super::transformer::{Attend, Transformer};
use tch::Tensor;

#[derive(Debug)]
pub struct MaeDecoder {
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor,
    pub(super) decoder: Transformer,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
}

impl MaeDecoder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Params,
        s: &Scope,
        enc_width: i64,
        num_patches: i64,
        patch: i64,
        width: i64,
        layers: i64,
        heads: i64,
    ) -> Self {
        let std = (width as f64).powf(-0.5);
        Self {
            decoder_embed: Linear::new(
                p,
                &s.sub("decoder_embed"),
                enc_width,
                width,
                (enc_width as f64).powf(-0.5),
            ),
            mask_token: p.normal(s.name("mask_token"), &[width], 0.02, s.kind),
            decoder_pos_embed: p.normal(
                s.name("decoder_pos_embed"),
                &[num_patches + 1, width],
                std,
                s.kind,
            ),
            decoder: Transformer::new(p, &s.sub("decoder"), width, layers, heads),
            decoder_norm: LayerNorm::new(p, &s.sub("decoder_norm"), width),
            decoder_pred: Linear::new(p, &s.sub("decoder_pred"), width, patch * patch * 3, std),
        }
    }

    /// `encoded`: [B, 1+K, W_enc] (class token first, after ln_post); `restore`: [B, G] indices
    /// that undo the shuffle which put the K visible patches first. Returns [B, G, 3·p·p].
    pub fn forward(&self, encoded: &Tensor, restore: &Tensor) -> Tensor {
        let x = self.decoder_embed.forward(encoded);
        let (b, k1, w) = x.size3().unwrap_or((0, 0, 0));
        let g = restore.size()[1];
        let masked = self.mask_token.expand([b, g - (k1 - 1), w], false);
        let shuffled = Tensor::cat(&[x.narrow(1, 1, k1 - 1), masked], 1);
        let patches = shuffled.gather(1, &restore.unsqueeze(-1).expand([b, g, w], false), false);
        let x = Tensor::cat(&[x.narrow(1, 0, 1), patches], 1) + &self.decoder_pos_embed;
        let x = self
            .decoder_norm
            .forward(&self.decoder.forward(&x, Attend::All));
        self.decoder_pred.forward(&x.narrow(1, 1, g))
    }
}
