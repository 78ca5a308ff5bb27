//! The fusion encoder of image-text matching (ALBEF/BLIP): pre-LN blocks over the text tower's
//! token outputs, each with self-attention over the caption's tokens (SOT..=EOT, padding never
//! attended), cross-attention from the text tokens to the image tower's tokens, and an MLP;
//! then `ln_final`, and the ITM head (two logits: no match, match) on the fused end-of-text
//! token, the position the text tower pools at.
//!
//! Names: `fusion.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
//! ln_cross, cross_attn.{q,k,v}_proj_weight, cross_attn.in_proj_bias, cross_attn.out_proj,
//! ln_2, mlp.c_fc, mlp.c_proj}`, `fusion.ln_final`, `itm_head` (PyTorch's
//! `nn.MultiheadAttention` names, with separate projections where keys and values have the
//! image width).

use super::params::{LayerNorm, Linear, Params, Scope};
use tch::{Kind, Tensor};

#[derive(Debug)]
struct FusionBlock {
    ln_1: LayerNorm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ln_cross: LayerNorm,
    q_proj_weight: Tensor,
    k_proj_weight: Tensor,
    v_proj_weight: Tensor,
    cross_in_proj_bias: Tensor,
    cross_out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: i64,
}

/// Scaled dot-product attention of q [B, Nq, W] over k, v [B, Nk, W] in `heads` heads.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, mask: Option<&Tensor>) -> Tensor {
    let (b, nq, w) = q.size3().unwrap_or((0, 0, 0));
    let nk = k.size()[1];
    let hd = w / heads;
    let split = |t: &Tensor, n: i64| t.view([b, n, heads, hd]).transpose(1, 2);
    Tensor::scaled_dot_product_attention(
        &split(q, nq),
        &split(k, nk),
        &split(v, nk),
        mask,
        0.0,
        false,
        None,
        false,
    )
    .transpose(1, 2)
    .reshape([b, nq, w])
}

impl FusionBlock {
    /// `image_width`: the width of the image tokens (keys and values); `layers`: the stack's
    /// depth (output projections scaled by it, as OpenCLIP's blocks).
    fn new(
        p: &mut Params,
        s: &Scope,
        width: i64,
        image_width: i64,
        heads: i64,
        layers: i64,
    ) -> Self {
        let w = width as f64;
        let attn_std = w.powf(-0.5);
        let proj_std = w.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
        let fc_std = (2.0 * w).powf(-0.5);
        let (attn, cross, mlp) = (s.sub("attn"), s.sub("cross_attn"), s.sub("mlp"));
        let k = s.kind;
        let kv_std = (image_width as f64).powf(-0.5);
        Self {
            ln_1: LayerNorm::new(p, &s.sub("ln_1"), width),
            in_proj_weight: p.normal(
                attn.name("in_proj_weight"),
                &[3 * width, width],
                attn_std,
                k,
            ),
            in_proj_bias: p.constant(attn.name("in_proj_bias"), &[3 * width], 0.0, k),
            out_proj: Linear::new(p, &attn.sub("out_proj"), width, width, proj_std),
            ln_cross: LayerNorm::new(p, &s.sub("ln_cross"), width),
            q_proj_weight: p.normal(cross.name("q_proj_weight"), &[width, width], attn_std, k),
            k_proj_weight: p.normal(
                cross.name("k_proj_weight"),
                &[width, image_width],
                kv_std,
                k,
            ),
            v_proj_weight: p.normal(
                cross.name("v_proj_weight"),
                &[width, image_width],
                kv_std,
                k,
            ),
            cross_in_proj_bias: p.constant(cross.name("in_proj_bias"), &[3 * width], 0.0, k),
            cross_out_proj: Linear::new(p, &cross.sub("out_proj"), width, width, proj_std),
            ln_2: LayerNorm::new(p, &s.sub("ln_2"), width),
            c_fc: Linear::new(p, &mlp.sub("c_fc"), width, 4 * width, fc_std),
            c_proj: Linear::new(p, &mlp.sub("c_proj"), 4 * width, width, proj_std),
            heads,
        }
    }

    /// x: [B, N, W] text tokens; `keys`: [B, 1, 1, N] true where a text token may be attended;
    /// image: [U, M, Wv], row `image_of[b]` for text b (None: U = B, in order). Keys and values
    /// are projected once per image, then picked per text.
    fn forward(
        &self,
        x: &Tensor,
        keys: &Tensor,
        image: &Tensor,
        image_of: Option<&Tensor>,
    ) -> Tensor {
        let w = x.size()[2];
        let qkv = self
            .ln_1
            .forward(x)
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias));
        let parts = qkv.split(w, -1);
        let a = attend(&parts[0], &parts[1], &parts[2], self.heads, Some(keys));
        let x = x + self.out_proj.forward(&a);
        let b = self.cross_in_proj_bias.split(w, 0);
        let q = self
            .ln_cross
            .forward(&x)
            .linear(&self.q_proj_weight, Some(&b[0]));
        let pick = |t: Tensor| match image_of {
            Some(i) => t.index_select(0, i),
            None => t,
        };
        let k = pick(image.linear(&self.k_proj_weight, Some(&b[1])));
        let v = pick(image.linear(&self.v_proj_weight, Some(&b[2])));
        let x = x + self
            .cross_out_proj
            .forward(&attend(&q, &k, &v, self.heads, None));
        let h = self
            .c_proj
            .forward(&self.c_fc.forward(&self.ln_2.forward(&x)).gelu("none"));
        x + h
    }
}

/// `fusion.*` and `itm_head.*`.
#[derive(Debug)]
pub struct FusionEncoder {
    blocks: Vec<FusionBlock>,
    ln_final: LayerNorm,
    head: Linear,
}

impl FusionEncoder {
    /// `fusion` and `itm_head` are the scopes of the encoder and of the head.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Params,
        fusion: &Scope,
        itm_head: &Scope,
        width: i64,
        image_width: i64,
        layers: i64,
        heads: i64,
    ) -> Self {
        let rb = fusion.sub("resblocks");
        let blocks = (0..layers)
            .map(|i| FusionBlock::new(p, &rb.sub(i), width, image_width, heads, layers))
            .collect();
        let ln_final = LayerNorm::new(p, &fusion.sub("ln_final"), width);
        // BERT's initialisation of a classifier head.
        let head = Linear::new(p, itm_head, width, 2, 0.02);
        Self {
            blocks,
            ln_final,
            head,
        }
    }

    /// ITM logits [B, 2] (no match, match) of text tokens `text` [B, N, W] (the text tower's
    /// output, positions after each row's `eot` [B] ignored) against image tokens (the vision
    /// tower's output after ln_post): `image` [B, M, Wv] in the texts' order, or with
    /// `image_of` [B] the row of `image` [U, M, Wv] each text is paired with (an image in
    /// several pairs is projected once).
    pub fn logits(
        &self,
        text: &Tensor,
        eot: &Tensor,
        image: &Tensor,
        image_of: Option<&Tensor>,
    ) -> Tensor {
        let (b, n) = (text.size()[0], text.size()[1]);
        let dev = text.device();
        let keys = Tensor::arange(n, (Kind::Int64, dev))
            .unsqueeze(0)
            .le_tensor(&eot.unsqueeze(1))
            .view([b, 1, 1, n]);
        let image = image.to_kind(text.kind());
        let mut x = text.shallow_clone();
        for blk in &self.blocks {
            x = blk.forward(&x, &keys, &image, image_of);
        }
        let rows = Tensor::arange(b, (Kind::Int64, dev));
        let pooled = self
            .ln_final
            .forward(&x.index(&[Some(rows), Some(eot.shallow_clone())]));
        self.head.forward(&pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padding after a row's end-of-text changes nothing: the same caption padded to 5 or to 9
    /// columns (with garbage in the padding) gives the same logits. In f64, where the two
    /// attention widths' different summation orders are ~1e-16.
    #[test]
    fn padding_after_the_end_of_text_is_ignored() {
        tch::manual_seed(5);
        let mut p = Params::default();
        let root = Scope::root(Kind::Double);
        let f = FusionEncoder::new(
            &mut p,
            &root.sub("fusion"),
            &root.sub("itm_head"),
            16,
            24,
            2,
            2,
        );
        let text = Tensor::randn([3, 5, 16], (Kind::Double, tch::Device::Cpu));
        let eot = Tensor::from_slice(&[2i64, 4, 0]);
        let image = Tensor::randn([3, 7, 24], (Kind::Double, tch::Device::Cpu));
        let short = f.logits(&text, &eot, &image, None);
        let pad = Tensor::randn([3, 4, 16], (Kind::Double, tch::Device::Cpu)) * 100.0;
        let long = f.logits(&Tensor::cat(&[&text, &pad], 1), &eot, &image, None);
        let d = (&short - &long).abs().max().double_value(&[]);
        assert!(d < 1e-12, "padding changed the logits by {d}");
        assert_eq!(short.size(), [3, 2]);
        // Images given once and picked per text: the same logits as images in the texts' order.
        let (distinct, of) = (image.narrow(0, 0, 2), Tensor::from_slice(&[1i64, 0, 1]));
        let picked = f.logits(&text, &eot, &distinct, Some(&of));
        let direct = f.logits(&text, &eot, &distinct.index_select(0, &of), None);
        let d = (&picked - &direct).abs().max().double_value(&[]);
        assert!(
            d < 1e-12,
            "picking images per text changed the logits by {d}"
        );
        // The image does matter.
        let other = f.logits(&text, &eot, &(image * 2.0), None);
        assert!((&short - &other).abs().max().double_value(&[]) > 1e-6);
    }
}
