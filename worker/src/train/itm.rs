//! Image-text matching (ALBEF/BLIP) exact over the global batch.
//!
//! Every pair (image i, text i) of the global batch is a positive; for each, one hard negative
//! text and one hard negative image are drawn with probability ∝ softmax of the contrastive
//! similarities (logit scale × cosine) of row i against the **global** batch, its own pair
//! weighing 0, from the row's RNG (`row_rng(seed, step, calls, 4, i)`): the picks depend on
//! neither the world size nor the rank. The image and text token sequences are all-gathered
//! (detached) into leaves, this rank scores its positives and their negatives with the fusion
//! encoder, the leaves' gradients are summed over the ranks and this rank's slices weigh its own
//! token sequences in the surrogate (the contrastive objective's gather-with-grad, on sequences
//! instead of pooled features). The loss is the cross-entropy over all 3 × global pairs (label 1
//! for positives, 0 for negatives), a mean over the global batch like the other objectives.
//!
//! Collectives: five all-gathers (both features, end-of-text positions, both sequences) and two
//! all-reduces, on every rank in the same order, rows or not.

use rand::Rng;
use tch::{Device, Kind, Reduction, Tensor};

use super::objectives::{Rows, Term};
use super::{Result, Trainer};
use crate::collective::Collective;

/// The RNG stream of the hard-negative draws (`row_rng`).
pub const STREAM: u64 = 4;

/// What the fusion encoder reads, from this rank's tower passes.
pub(super) struct ItmInputs {
    /// Image tokens after ln_post [n, 1+K, Wv].
    pub image: Tensor,
    /// Text hidden states after ln_final [n, used, W].
    pub text: Tensor,
    /// End-of-text positions [n] (i64).
    pub eot: Tensor,
}

/// One hard negative for the row whose own column is `own`: a column j ≠ own drawn with
/// probability exp(sims[j]) / Σ_{k≠own} exp(sims[k]); None when there is no other column (or no
/// finite score). One uniform draw from `rng`, compared against the cumulative weights in f64.
pub fn sample_hard_negative(sims: &[f64], own: usize, rng: &mut impl Rng) -> Option<usize> {
    let max = sims
        .iter()
        .enumerate()
        .filter(|&(j, s)| j != own && s.is_finite())
        .map(|(_, &s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let weight = |j: usize, s: f64| {
        if j == own || !s.is_finite() {
            0.0
        } else {
            (s - max).exp()
        }
    };
    let total: f64 = sims.iter().enumerate().map(|(j, &s)| weight(j, s)).sum();
    let u = rng.gen::<f64>() * total;
    let mut acc = 0.0;
    let mut last = None;
    for (j, &s) in sims.iter().enumerate() {
        let w = weight(j, s);
        if w > 0.0 {
            acc += w;
            last = Some(j);
            if u < acc {
                return Some(j);
            }
        }
    }
    // u within rounding of the total: the last column with weight.
    last
}

/// A row's hard negatives, global indices: (text, image); None without another column.
pub type Negatives = (Option<i64>, Option<i64>);

/// Hard negatives of this rank's rows: `i2t` [n, G] the similarities of its images to every
/// text of the global batch, `t2i` [n, G] of its texts to every image; its rows start at
/// `offset` of the global batch and `rngs` holds one RNG per row. Returns per row (negative
/// text, negative image), global indices; text first, then image, from each row's RNG.
pub fn hard_negatives(
    i2t: &Tensor,
    t2i: &Tensor,
    offset: i64,
    rngs: &mut [rand::rngs::StdRng],
) -> std::result::Result<Vec<Negatives>, tch::TchError> {
    let rows =
        |t: &Tensor| Vec::<Vec<f64>>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double));
    let (i2t, t2i) = (rows(i2t)?, rows(t2i)?);
    Ok(i2t
        .iter()
        .zip(&t2i)
        .zip(rngs.iter_mut())
        .enumerate()
        .map(|(r, ((it, ti), rng))| {
            let own = (offset as usize) + r;
            let text = sample_hard_negative(it, own, rng).map(|j| j as i64);
            let image = sample_hard_negative(ti, own, rng).map(|j| j as i64);
            (text, image)
        })
        .collect())
}

impl Trainer {
    /// This rank's features and the token sequences ITM needs, from one pass of each tower.
    pub(super) fn features_and_tokens(
        &self,
        images: &Tensor,
        tokens: &Tensor,
        rows: &Rows,
    ) -> (Tensor, Tensor, ItmInputs) {
        let m = &self.model;
        let c = &m.config;
        let (n, dev, kind) = (rows.n, rows.device, m.kind());
        if n == 0 {
            let (img, txt) = self.features(images, tokens, rows);
            let k = self.kept_patches();
            let x = ItmInputs {
                image: Tensor::zeros([0, 1 + k, c.vision_width], (kind, dev)),
                text: Tensor::zeros([0, 1, c.text_width], (kind, dev)),
                eot: Tensor::zeros([0], (Kind::Int64, dev)),
            };
            return (img, txt, x);
        }
        let keep = self.patch_keep(rows);
        let (img, image) = m.image_features_and_tokens(images, keep.as_ref());
        let (txt, text, eot) = m.text_features_and_tokens(tokens);
        (img, txt, ItmInputs { image, text, eot })
    }

    /// ITM over the global batch (module comment).
    pub(super) fn itm(
        &self,
        img_f: &Tensor,
        txt_f: &Tensor,
        x: &ItmInputs,
        rows: &Rows,
        coll: &mut dyn Collective,
    ) -> Result<Term> {
        let m = &self.model;
        let (offset, n, dev) = (rows.offset, rows.n, rows.device);
        let kind = m.kind();
        // 1. The hard negatives, from this rank's rows against the global batch (values only).
        let all_img_f = coll.all_gather(&img_f.detach())?;
        let all_txt_f = coll.all_gather(&txt_f.detach())?;
        let g = all_img_f.size()[0];
        let negatives = if n > 0 {
            let _ng = tch::no_grad_guard();
            let scale = m.logit_scale.detach().exp().to_kind(kind);
            let i2t = img_f.detach().matmul(&all_txt_f.tr()) * &scale;
            let t2i = txt_f.detach().matmul(&all_img_f.tr()) * &scale;
            let mut rngs = self.row_rngs(STREAM, offset, n);
            hard_negatives(&i2t, &t2i, offset, &mut rngs)?
        } else {
            Vec::new()
        };
        // 2. The token sequences of the global batch, texts padded to its longest caption.
        let all_eot = coll.all_gather(&x.eot)?;
        let used = if g > 0 {
            all_eot.max().int64_value(&[]) + 1
        } else {
            1
        };
        let local_used = x.text.size()[1];
        let text = if local_used < used {
            x.text
                .detach()
                .constant_pad_nd([0, 0, 0, used - local_used])
        } else {
            x.text.detach()
        };
        let all_text = coll
            .all_gather(&text.contiguous())?
            .detach()
            .set_requires_grad(true);
        let all_image = coll
            .all_gather(&x.image.detach().contiguous())?
            .detach()
            .set_requires_grad(true);
        // 3. This rank's pairs: positives, then (image, negative text), then (negative image,
        // text). With a global batch of one there are no negatives.
        let per_row = if g > 1 { 3.0 } else { 1.0 };
        let own: Vec<i64> = (offset..offset + n).collect();
        let (mut img_idx, mut txt_idx, mut labels) =
            (own.clone(), own.clone(), vec![1i64; own.len()]);
        for (&i, &(neg_text, _)) in own.iter().zip(&negatives) {
            if let Some(t) = neg_text {
                img_idx.push(i);
                txt_idx.push(t);
                labels.push(0);
            }
        }
        for (&i, &(_, neg_image)) in own.iter().zip(&negatives) {
            if let Some(j) = neg_image {
                img_idx.push(j);
                txt_idx.push(i);
                labels.push(0);
            }
        }
        let (loss, l) = if n > 0 {
            let idx = |v: &[i64]| Tensor::from_slice(v).to_device(dev);
            // Each distinct image once (a positive's image is in two pairs).
            let mut distinct = img_idx.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let image_of: Vec<i64> = img_idx
                .iter()
                .map(|i| distinct.partition_point(|d| d < i) as i64)
                .collect();
            let ti = idx(&txt_idx);
            let logits = m.itm_logits(
                &all_text.index_select(0, &ti),
                &all_eot.index_select(0, &ti),
                &all_image.index_select(0, &idx(&distinct)),
                Some(&idx(&image_of)),
            )?;
            let sum = logits.to_kind(kind).cross_entropy_loss::<Tensor>(
                &idx(&labels),
                None,
                Reduction::Sum,
                -100,
                0.0,
            );
            let loss = sum.double_value(&[]) / labels.len() as f64;
            // The global mean over every rank's pairs.
            (loss, sum / (rows.global as f64 * per_row))
        } else {
            // Zero, but with defined (zero) gradients for the all-reduces below.
            (0.0, (all_text.sum(kind) + all_image.sum(kind)) * 0.0)
        };
        let tb = std::time::Instant::now();
        (l * self.objectives.itm).backward();
        let backward_s = tb.elapsed().as_secs_f64();
        let mut g_text = all_text.grad();
        let mut g_image = all_image.grad();
        coll.all_reduce_sum(&mut g_text)?;
        coll.all_reduce_sum(&mut g_image)?;
        let mut surrogate = Vec::new();
        if n > 0 {
            let gt = g_text.narrow(0, offset, n).narrow(1, 0, local_used);
            surrogate.push((&x.text * gt).sum(kind));
            surrogate.push((&x.image * g_image.narrow(0, offset, n)).sum(kind));
        }
        Ok(Term {
            loss,
            surrogate,
            backward_s,
        })
    }
}
