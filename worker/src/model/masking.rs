//! Random masks for FLIP patch dropout, MAE and MLM. Each row draws from its own RNG, which the
//! caller seeds from (seed, step, the row's index in the global batch): the masks do not depend on
//! how the global batch is split over ranks, and a resumed run draws the same ones without saving
//! generator state.

use rand::seq::SliceRandom;
use rand::Rng;
use tch::{Kind, Tensor};

/// For each image (one RNG per row), `keep` distinct patch indices out of `g`, uniformly:
/// [B, keep] i64.
pub fn patch_keep<R: Rng>(rows: &mut [R], g: i64, keep: i64) -> Tensor {
    let b = rows.len() as i64;
    let mut idx = Vec::with_capacity((b * keep) as usize);
    let mut perm: Vec<i64> = (0..g).collect();
    for rng in rows.iter_mut() {
        // From the identity every time: a row's mask must not depend on the rows before it.
        perm.iter_mut().zip(0..).for_each(|(p, i)| *p = i);
        perm.shuffle(rng);
        idx.extend_from_slice(&perm[..keep as usize]);
    }
    Tensor::from_slice(&idx).view([b, keep])
}

/// Patches kept by a drop/mask ratio: at least one.
pub fn kept(g: i64, ratio: f64) -> i64 {
    ((g as f64 * (1.0 - ratio)) as i64).clamp(1, g)
}

/// An MAE mask: the visible patches, the permutation back to image order, and which are hidden.
#[derive(Debug)]
pub struct MaeMask {
    /// [B, K] indices of the visible patches.
    pub keep: Tensor,
    /// [B, G]: position of each patch in (visible ++ hidden) order.
    pub restore: Tensor,
    /// [B, G] f32, 1 where the patch is hidden (the loss is taken there).
    pub hidden: Tensor,
}

pub fn mae_mask<R: Rng>(rows: &mut [R], g: i64, ratio: f64) -> MaeMask {
    let b = rows.len() as i64;
    let k = kept(g, ratio);
    let (mut keep, mut restore, mut hidden) = (
        Vec::new(),
        vec![0i64; (b * g) as usize],
        vec![0f32; (b * g) as usize],
    );
    let mut perm: Vec<i64> = (0..g).collect();
    for (row, rng) in rows.iter_mut().enumerate() {
        // From the identity every time: a row's mask must not depend on the rows before it.
        perm.iter_mut().zip(0..).for_each(|(p, i)| *p = i);
        perm.shuffle(rng);
        keep.extend_from_slice(&perm[..k as usize]);
        for (pos, &patch) in perm.iter().enumerate() {
            restore[row * g as usize + patch as usize] = pos as i64;
            if pos as i64 >= k {
                hidden[row * g as usize + patch as usize] = 1.0;
            }
        }
    }
    MaeMask {
        keep: Tensor::from_slice(&keep).view([b, k]),
        restore: Tensor::from_slice(&restore).view([b, g]),
        hidden: Tensor::from_slice(&hidden).view([b, g]),
    }
}

/// A BERT-style MLM corruption of a token batch.
#[derive(Debug)]
pub struct MlmMask {
    /// [B, N] tokens with 10% of the chosen replaced by random ids.
    pub input: Tensor,
    /// [B, N] bool: chosen positions whose embedding becomes the mask vector (80%).
    pub replace: Tensor,
    /// [B, N] bool: every chosen position (the loss is taken there).
    pub chosen: Tensor,
    /// [M] i64: the original ids at the chosen positions, in row-major order.
    pub labels: Tensor,
    /// [B, 1, 1, N] bool: keys up to and including end-of-text (no attention to padding).
    pub attend: Tensor,
}

/// Chooses `ratio` of the tokens strictly between start-of-text (position 0) and end-of-text (the
/// highest id of the row); of those 80% masked, 10% random (ids below the two special tokens at
/// the top of the vocabulary), 10% kept.
pub fn mlm_mask<R: Rng>(rows: &mut [R], tokens: &[i64], n: i64, ratio: f64, vocab: i64) -> MlmMask {
    let b = rows.len() as i64;
    let mut input = tokens.to_vec();
    let mut replace = vec![false; tokens.len()];
    let mut chosen = vec![false; tokens.len()];
    let mut attend = vec![false; tokens.len()];
    let mut labels = Vec::new();
    for (r, rng) in rows.iter_mut().enumerate() {
        let row = &tokens[r * n as usize..(r + 1) * n as usize];
        let eot = row
            .iter()
            .enumerate()
            .max_by_key(|(i, &t)| (t, std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        for i in 0..=eot {
            attend[r * n as usize + i] = true;
        }
        for i in 1..eot {
            let at = r * n as usize + i;
            if rng.gen::<f64>() >= ratio {
                continue;
            }
            chosen[at] = true;
            labels.push(tokens[at]);
            let u = rng.gen::<f64>();
            if u < 0.8 {
                replace[at] = true;
            } else if u < 0.9 {
                input[at] = rng.gen_range(0..(vocab - 2).max(1));
            }
        }
    }
    let bool_t = |v: &[bool]| Tensor::from_slice(v).to_kind(Kind::Bool).view([b, n]);
    MlmMask {
        input: Tensor::from_slice(&input).view([b, n]),
        replace: bool_t(&replace),
        chosen: bool_t(&chosen),
        labels: Tensor::from_slice(&labels),
        attend: bool_t(&attend).view([b, 1, 1, n]),
    }
}
