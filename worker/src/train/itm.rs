//! Image-text matching (ALBEF/BLIP) exact over the global batch.
//!
//! Every pair (image i, text i) of the global batch is a positive; for each, one hard negative
//! text and one hard negative image are drawn with probability ∝ softmax of the contrastive
//! similarities (logit scale × cosine) of row i against the **global** batch, from the row's RNG
//! (`row_rng(seed, step, calls, 4, i)`): the picks depend on neither the world size nor the
//! rank. Only true negatives weigh: a text whose token ids equal caption i's, or an image whose
//! caption does (its own pair included), is a match, so it weighs 0 (BLIP masks false negatives
//! by image id; captions repeat across images in web data and in the synthetic shapes). A row
//! whose every column holds its caption has no negatives. The image and text token sequences are
//! all-gathered (detached) into leaves, this rank scores its positives and their negatives with
//! the fusion encoder, the leaves' gradients are summed over the ranks and this rank's slices
//! weigh its own token sequences in the surrogate (the contrastive objective's gather-with-grad,
//! on sequences instead of pooled features). The loss is the cross-entropy over the global
//! batch's pairs (label 1 for positives, 0 for negatives: 3 × global when every row has both
//! negatives), a mean over those pairs; the reported loss is this rank's share of it per row
//! (weighted by its rows and summed over the ranks, the global mean), like the other objectives.
//!
//! Collectives: seven all-gathers (both features, end-of-text positions, token ids, both
//! sequences, the pair counts) and two all-reduces, on every rank in the same order, rows or not.

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
    /// The token ids [n, L] (i64): which captions are the same (false negatives).
    pub tokens: Tensor,
}

/// One hard negative for the row whose own column is `own`: a column j ≠ own drawn with
/// probability exp(sims[j]) / Σ_{k≠own} exp(sims[k]); None when there is no other column (or no
/// finite score). One uniform draw from `rng`, compared against the cumulative weights in f64.
pub fn sample_hard_negative(sims: &[f64], own: usize, rng: &mut impl Rng) -> Option<usize> {
    sample_hard_negative_among(sims, |j| j != own, rng)
}

/// One hard negative among the columns `allowed` admits: column j drawn with probability
/// exp(sims[j]) / Σ_{allowed k} exp(sims[k]), every other column weighing 0; None when no allowed
/// column has a finite score (no uniform is drawn then). One uniform draw from `rng`, compared
/// against the cumulative weights in f64.
pub fn sample_hard_negative_among(
    sims: &[f64],
    allowed: impl Fn(usize) -> bool,
    rng: &mut impl Rng,
) -> Option<usize> {
    let ok = |j: usize, s: f64| allowed(j) && s.is_finite();
    let max = sims
        .iter()
        .enumerate()
        .filter(|&(j, &s)| ok(j, s))
        .map(|(_, &s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let weight = |j: usize, s: f64| if ok(j, s) { (s - max).exp() } else { 0.0 };
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

/// A row's hard negatives, global indices: (text, image); None without a true negative.
pub type Negatives = (Option<i64>, Option<i64>);

/// Each caption of the global batch as a key: its token ids up to and including its end-of-text
/// position (`tokens` [G, L] i64, `eot` [G] i64, L > every eot). Two rows hold the same caption
/// when their keys are equal.
pub fn caption_keys(
    tokens: &Tensor,
    eot: &Tensor,
) -> std::result::Result<Vec<Vec<i64>>, tch::TchError> {
    let tokens = Vec::<Vec<i64>>::try_from(tokens.to_device(Device::Cpu).to_kind(Kind::Int64))?;
    let eot = Vec::<i64>::try_from(eot.to_device(Device::Cpu).to_kind(Kind::Int64))?;
    Ok(tokens
        .into_iter()
        .zip(eot)
        .map(|(mut t, e)| {
            t.truncate((e.max(0) as usize) + 1);
            t
        })
        .collect())
}

/// Hard negatives of this rank's rows: `i2t` [n, G] the similarities of its images to every
/// text of the global batch, `t2i` [n, G] of its texts to every image; its rows start at
/// `offset` of the global batch, `captions` holds the global batch's captions (`caption_keys`,
/// G of them) and `rngs` one RNG per row. Only true negatives are drawn: for row i, a text
/// whose caption differs from caption i and an image whose caption differs from caption i (an
/// identical caption, the own pair's included, is a match, not a negative: BLIP's false-negative
/// masking, by caption instead of image id). Returns per row (negative text, negative image),
/// global indices, None where no column qualifies; text first, then image, from each row's RNG.
pub fn hard_negatives(
    i2t: &Tensor,
    t2i: &Tensor,
    offset: i64,
    captions: &[Vec<i64>],
    rngs: &mut [rand::rngs::StdRng],
) -> std::result::Result<Vec<Negatives>, tch::TchError> {
    let rows =
        |t: &Tensor| Vec::<Vec<f64>>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double));
    let (i2t, t2i) = (rows(i2t)?, rows(t2i)?);
    // Each column's caption as the first column holding the same one.
    let mut first = std::collections::HashMap::new();
    let group: Vec<usize> = captions
        .iter()
        .enumerate()
        .map(|(j, c)| *first.entry(c.as_slice()).or_insert(j))
        .collect();
    let g = group.len();
    Ok(i2t
        .iter()
        .zip(&t2i)
        .zip(rngs.iter_mut())
        .enumerate()
        .map(|(r, ((it, ti), rng))| {
            let own = (offset as usize) + r;
            let mine = group.get(own).copied();
            // A column without a caption (a shape mismatch) is never a negative.
            let negative = |j: usize| j != own && j < g && Some(group[j]) != mine;
            let text = sample_hard_negative_among(it, negative, rng).map(|j| j as i64);
            let image = sample_hard_negative_among(ti, negative, rng).map(|j| j as i64);
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
                tokens: Tensor::zeros([0, 1], (Kind::Int64, dev)),
            };
            return (img, txt, x);
        }
        let keep = self.patch_keep(rows);
        let (img, image) = m.image_features_and_tokens(images, keep.as_ref());
        let (txt, text, eot) = m.text_features_and_tokens(tokens);
        let tokens = tokens.shallow_clone();
        (
            img,
            txt,
            ItmInputs {
                image,
                text,
                eot,
                tokens,
            },
        )
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
        // The global batch's captions (token ids up to the end of text), whose equal ones are
        // not negatives of each other.
        let all_eot = coll.all_gather(&x.eot)?;
        let used = if g > 0 {
            all_eot.max().int64_value(&[]) + 1
        } else {
            1
        };
        let width = x.tokens.size()[1];
        let tokens = if width < used {
            x.tokens.constant_pad_nd([0, used - width])
        } else {
            x.tokens.narrow(1, 0, used)
        };
        let all_tokens = coll.all_gather(&tokens.to_kind(Kind::Int64).contiguous())?;
        let negatives = if n > 0 {
            let _ng = tch::no_grad_guard();
            let captions = caption_keys(&all_tokens, &all_eot)?;
            let scale = m.logit_scale.detach().exp().to_kind(kind);
            let i2t = img_f.detach().matmul(&all_txt_f.tr()) * &scale;
            let t2i = txt_f.detach().matmul(&all_img_f.tr()) * &scale;
            let mut rngs = self.row_rngs(STREAM, offset, n);
            hard_negatives(&i2t, &t2i, offset, &captions, &mut rngs)?
        } else {
            Vec::new()
        };
        // 2. The token sequences of the global batch, texts padded to its longest caption.
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
        // text), for the rows that have a true negative (none in a global batch of one, or
        // where every caption is the same).
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
        // The pairs of the global batch, what the loss is a mean over.
        let pairs = Tensor::from_slice(&[labels.len() as i64]).to_device(dev);
        let pairs: i64 = Vec::<i64>::try_from(coll.all_gather(&pairs)?.to_device(Device::Cpu))?
            .iter()
            .sum();
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
            // This rank's share of the global mean, as a mean over its rows: weighted by
            // n / global and summed over the ranks it is the global mean. (Every row with both
            // negatives: the mean over this rank's pairs.)
            let mean = sum / pairs.max(1) as f64;
            let loss = mean.double_value(&[]) * rows.global as f64 / n as f64;
            // The global mean over every rank's pairs.
            (loss, mean)
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
