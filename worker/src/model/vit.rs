//! OpenCLIP's `VisionTransformer` (`visual.*`): conv patch embedding without bias, class token,
//! learned positional embedding, ln_pre, pre-LN blocks, ln_post on the class token, projection.

use super::params::{LayerNorm, Params, Scope};
use super::transformer::{Attend, Transformer};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct VisionTower {
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    pub(super) transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
    pub patch: i64,
    pub width: i64,
}

impl VisionTower {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Params,
        s: &Scope,
        image_size: i64,
        patch: i64,
        width: i64,
        layers: i64,
        heads: i64,
        embed_dim: i64,
    ) -> Self {
        let grid = image_size / patch;
        let scale = (width as f64).powf(-0.5);
        let k = s.kind;
        Self {
            conv1: p.normal(
                s.name("conv1.weight"),
                &[width, 3, patch, patch],
                (3.0 * (patch * patch) as f64).powf(-0.5),
                k,
            ),
            class_embedding: p.normal(s.name("class_embedding"), &[width], scale, k),
            positional_embedding: p.normal(
                s.name("positional_embedding"),
                &[grid * grid + 1, width],
                scale,
                k,
            ),
            ln_pre: LayerNorm::new(p, &s.sub("ln_pre"), width),
            transformer: Transformer::new(p, &s.sub("transformer"), width, layers, heads),
            ln_post: LayerNorm::new(p, &s.sub("ln_post"), width),
            proj: p.normal(s.name("proj"), &[width, embed_dim], scale, k),
            patch,
            width,
        }
    }

    /// Patch tokens with their positional embedding: [B, G, W].
    fn patches(&self, images: &Tensor) -> Tensor {
        let x = images
            .to_kind(self.conv1.kind())
            .conv2d(
                &self.conv1,
                None::<Tensor>,
                [self.patch, self.patch],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        x + self
            .positional_embedding
            .narrow(0, 1, self.positional_embedding.size()[0] - 1)
    }

    /// Runs the encoder on the class token plus the patches listed in `keep` ([B, K] indices;
    /// None = all). Returns the final tokens [B, 1+K, W] before ln_post.
    fn tokens(&self, images: &Tensor, keep: Option<&Tensor>) -> Tensor {
        let x = self.patches(images);
        let (b, _, w) = x.size3().unwrap_or((0, 0, 0));
        let x = match keep {
            Some(idx) => {
                let k = idx.size()[1];
                x.gather(1, &idx.unsqueeze(-1).expand([b, k, w], false), false)
            }
            None => x,
        };
        let cls =
            (&self.class_embedding + self.positional_embedding.get(0)).expand([b, 1, w], false);
        let x = Tensor::cat(&[cls, x], 1);
        self.transformer
            .forward(&self.ln_pre.forward(&x), Attend::All)
    }

    /// The class token and the patches listed in `keep` ([B, K] indices) after the encoder and
    /// ln_post: [B, 1+K, W] (what MAE's decoder reads).
    pub fn encode_tokens(&self, images: &Tensor, keep: &Tensor) -> Tensor {
        self.ln_post.forward(&self.tokens(images, Some(keep)))
    }

    /// `encode` and every token after ln_post [B, 1+K, W], from one pass.
    pub fn encode_with_tokens(&self, images: &Tensor, keep: Option<&Tensor>) -> (Tensor, Tensor) {
        let x = self.ln_post.forward(&self.tokens(images, keep));
        (x.select(1, 0).matmul(&self.proj), x)
    }

    /// Image embedding [B, E] (not normalised), from the class token.
    pub fn encode(&self, images: &Tensor, keep: Option<&Tensor>) -> Tensor {
        let x = self.tokens(images, keep);
        self.ln_post.forward(&x.select(1, 0)).matmul(&self.proj)
    }

    /// Number of patches per image.
    pub fn num_patches(&self) -> i64 {
        self.positional_embedding.size()[0] - 1
    }

    pub fn kind(&self) -> Kind {
        self.conv1.kind()
    }
}
