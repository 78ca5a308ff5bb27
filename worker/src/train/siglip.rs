//! SigLIP over the global batch, exact, with O(local × local) memory per rank: instead of
//! gathering every text feature, the ranks take turns broadcasting their text chunk; each rank
//! scores its own image rows against that chunk (one block of the global sigmoid loss), and the
//! chunk's gradient is summed over the ranks and kept by its owner. Bytes on the wire: one
//! all-gather's worth of text features plus one all-reduce of each chunk's gradient.

use tch::Tensor;

use super::objectives::{Rows, Term};
use super::{Result, Trainer};
use crate::collective::{Collective, CollectiveError};
use crate::loss;
use crate::model::ModelError;

/// One rank's part of the exchange.
pub struct Exchanged {
    /// Σ over this rank's blocks of `loss::siglip_sum` (unweighted).
    pub loss_sum: f64,
    /// d(weight · global loss sum) / d(this rank's image features), [n, E].
    pub img_grad: Tensor,
    /// d(weight · global loss sum) / d(this rank's text features), summed over the ranks.
    pub txt_grad: Tensor,
}

/// The chunked exchange. `img`, `txt`: this rank's features [n, E] (detached or not: only their
/// values are used); `lens`: every rank's row count. Back-propagates `weight` × each block's
/// sum into `logit_scale` and `logit_bias` (their grads accumulate) and returns the features'
/// gradients. Every rank issues the same collectives in the same order, rows or not.
pub fn exchange(
    img: &Tensor,
    txt: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    lens: &[i64],
    weight: f64,
    coll: &mut dyn Collective,
) -> std::result::Result<Exchanged, CollectiveError> {
    let rank = coll.rank();
    let n = lens.get(rank).copied().unwrap_or(0);
    let (kind, dev) = (txt.kind(), txt.device());
    let width = txt.size().get(1).copied().unwrap_or(0);
    let img_leaf = img.detach().set_requires_grad(true);
    let mut loss_sum = 0.0;
    let mut txt_grad = txt.detach().zeros_like();
    for (s, &n_s) in lens.iter().enumerate() {
        if n_s == 0 {
            continue; // every rank knows the lengths: nobody waits for an empty chunk
        }
        let mut chunk = if s == rank {
            txt.detach().contiguous()
        } else {
            Tensor::zeros([n_s, width], (kind, dev))
        };
        coll.broadcast(&mut chunk, s)?;
        let chunk = chunk.set_requires_grad(true);
        let mut g = if n > 0 {
            let l = loss::siglip_sum(&img_leaf, &chunk, logit_scale, logit_bias, s == rank);
            loss_sum += l.double_value(&[]);
            (l * weight).backward();
            chunk.grad()
        } else {
            chunk.detach().zeros_like()
        };
        coll.all_reduce_sum(&mut g)?;
        if s == rank {
            txt_grad = g;
        }
    }
    let img_grad = if n > 0 {
        img_leaf.grad()
    } else {
        img_leaf.detach().zeros_like()
    };
    Ok(Exchanged {
        loss_sum,
        img_grad,
        txt_grad,
    })
}

impl Trainer {
    /// SigLIP's share of the step: the loss reported is this rank's rows' sum over every column
    /// divided by its row count (OpenCLIP's per-rank value); the gradient is that of the global
    /// sum divided by the global batch (the mean over ranks of OpenCLIP's losses when the ranks
    /// hold equal shares, as DDP averages them).
    pub(super) fn siglip(
        &self,
        img_f: &Tensor,
        txt_f: &Tensor,
        rows: &Rows,
        coll: &mut dyn Collective,
    ) -> Result<Term> {
        let m = &self.model;
        let bias = m.logit_bias.as_ref().ok_or(ModelError::NoHead("siglip"))?;
        let weight = self.objectives.siglip / rows.global as f64;
        let tb = std::time::Instant::now();
        let ex = exchange(img_f, txt_f, &m.logit_scale, bias, &rows.lens, weight, coll)?;
        let backward_s = tb.elapsed().as_secs_f64();
        let mut surrogate = Vec::new();
        if rows.n > 0 {
            surrogate.push((img_f * ex.img_grad).sum(img_f.kind()));
            surrogate.push((txt_f * ex.txt_grad).sum(txt_f.kind()));
        }
        Ok(Term {
            loss: ex.loss_sum / rows.n.max(1) as f64,
            surrogate,
            backward_s,
        })
    }
}
