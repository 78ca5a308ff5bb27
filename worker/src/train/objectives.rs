//! The three objectives, one function each. Each takes this rank's rows of the global batch,
//! runs its forward (and the collectives its global normalisation needs) and returns a [`Term`]:
//! its loss for `StepLosses` and the surrogate terms whose gradient, in the trainer's one model
//! backward, is the objective's share of the model gradient.
//!
//! SigLIP's chunked exchange is in `siglip.rs`.
//!
//! Masks are drawn per row from `row_rngs(stream, ..)`: stream 1 FLIP patch dropout, 2 MLM,
//! 3 MAE, 4 ITM's hard negatives (`itm.rs`).

use rand::rngs::StdRng;
use tch::{Device, Kind, Tensor};

use super::{Result, Trainer};
use crate::collective::Collective;
use crate::loss;
use crate::model::masking;

/// Where this rank's rows sit in the global batch (masks and the contrastive labels).
#[derive(Debug)]
pub(super) struct Rows {
    /// Index of this rank's first row in the global batch.
    pub offset: i64,
    /// This rank's row count (0 in the last, partial step of a run, for some ranks).
    pub n: i64,
    /// n / global batch: turns a local mean into this rank's share of the global mean.
    pub scale: f64,
    /// The global batch (rows over every rank).
    pub global: i64,
    /// Every rank's row count, in rank order.
    pub lens: Vec<i64>,
    pub device: Device,
}

impl Rows {
    /// Every rank's row count, gathered (the step's first collective).
    pub fn locate(
        n: i64,
        global_batch: usize,
        device: Device,
        coll: &mut dyn Collective,
    ) -> Result<Self> {
        let lens = coll.all_gather(&Tensor::from_slice(&[n]).to_device(device))?;
        let lens: Vec<i64> = Vec::<i64>::try_from(lens.to_device(Device::Cpu))?;
        let offset: i64 = lens[..coll.rank().min(lens.len())].iter().sum();
        Ok(Rows {
            offset,
            n,
            scale: n as f64 / global_batch as f64,
            global: global_batch as i64,
            lens,
            device,
        })
    }

    /// Rows `start..start + len` of this rank's (a micro-batch), placed in the global batch.
    pub fn chunk(&self, start: i64, len: i64) -> Self {
        Rows {
            offset: self.offset + start,
            n: len,
            scale: len as f64 / self.global as f64,
            global: self.global,
            lens: self.lens.clone(),
            device: self.device,
        }
    }
}

/// One objective's part of a step.
pub(super) struct Term {
    /// This rank's loss, before the objective's weight.
    pub loss: f64,
    /// Scalars to add into the model backward (weights and normalisation applied).
    pub surrogate: Vec<Tensor>,
    /// Seconds in a backward of the objective's own (the contrastive loss's, to the gathered
    /// features).
    pub backward_s: f64,
}

impl Trainer {
    /// One RNG per row for masks and patch dropout, a function of (seed, step, call, objective,
    /// the row's index in the global batch): the same masks whatever the world size, and a
    /// resumed run draws them again without saving generator state.
    pub(super) fn row_rngs(&self, stream: u64, first_row: i64, n: i64) -> Vec<StdRng> {
        (first_row..first_row + n)
            .map(|row| super::row_rng(self.seed, self.step, self.calls, stream, row))
            .collect()
    }

    /// This rank's normalised image (FLIP's patch dropout applied) and text features for the
    /// contrastive objectives; [0, E] without rows.
    pub(super) fn features(
        &self,
        images: &Tensor,
        tokens: &Tensor,
        rows: &Rows,
    ) -> (Tensor, Tensor) {
        let m = &self.model;
        let (n, dev) = (rows.n, rows.device);
        let keep = self.patch_keep(rows);
        if n > 0 {
            (
                m.image_features(images, keep.as_ref()),
                m.text_features(tokens),
            )
        } else {
            let empty = Tensor::zeros([0, m.config.embed_dim], (m.kind(), dev));
            (empty.shallow_clone(), empty)
        }
    }

    /// FLIP's kept patches of this rank's rows ([n, K] indices; None without patch dropout).
    pub(super) fn patch_keep(&self, rows: &Rows) -> Option<Tensor> {
        let pd = self.objectives.patch_dropout;
        let g = self.model.config.num_patches();
        (pd > 0.0).then(|| {
            let mut rngs = self.row_rngs(1, rows.offset, rows.n);
            masking::patch_keep(&mut rngs, g, masking::kept(g, pd)).to_device(rows.device)
        })
    }

    /// Patches each image keeps in the contrastive pass (all without patch dropout).
    pub(super) fn kept_patches(&self) -> i64 {
        let (pd, g) = (
            self.objectives.patch_dropout,
            self.model.config.num_patches(),
        );
        if pd > 0.0 {
            masking::kept(g, pd)
        } else {
            g
        }
    }

    /// InfoNCE over the global batch with gather-with-grad: features are all-gathered (detached)
    /// into leaves, this rank's rows are scored against every column, the leaves' gradients are
    /// summed over the ranks, and this rank's slice of them weighs its own features in the
    /// surrogate. Collectives: two all-gathers, two all-reduces.
    pub(super) fn contrastive(
        &self,
        img_f: &Tensor,
        txt_f: &Tensor,
        rows: &Rows,
        coll: &mut dyn Collective,
    ) -> Result<Term> {
        let o = &self.objectives;
        let m = &self.model;
        let (offset, n) = (rows.offset, rows.n);
        let all_img = coll
            .all_gather(&img_f.detach())?
            .detach()
            .set_requires_grad(true);
        let all_txt = coll
            .all_gather(&txt_f.detach())?
            .detach()
            .set_requires_grad(true);
        let l = if n > 0 {
            loss::contrastive(&all_img, &all_txt, &m.logit_scale, offset, n)
        } else {
            // Zero, but with defined (zero) gradients for the all-reduces below.
            (all_img.sum(m.kind()) + all_txt.sum(m.kind()) + &m.logit_scale) * 0.0
        };
        let loss = l.double_value(&[]);
        let tb = std::time::Instant::now();
        (l * (o.contrastive * rows.scale)).backward();
        let backward_s = tb.elapsed().as_secs_f64();
        let mut g_img = all_img.grad();
        let mut g_txt = all_txt.grad();
        coll.all_reduce_sum(&mut g_img)?;
        coll.all_reduce_sum(&mut g_txt)?;
        let mut surrogate = Vec::new();
        if n > 0 {
            surrogate.push((img_f * g_img.narrow(0, offset, n)).sum(img_f.kind()));
            surrogate.push((txt_f * g_txt.narrow(0, offset, n)).sum(txt_f.kind()));
        }
        Ok(Term {
            loss,
            surrogate,
            backward_s,
        })
    }

    /// BERT's masked-token loss, a token mean over the global batch: this rank's summed loss is
    /// divided by every rank's chosen count (one all-reduce). The loss reported is the local
    /// mean (0 without rows).
    pub(super) fn mlm(
        &self,
        tokens: &Tensor,
        rows: &Rows,
        coll: &mut dyn Collective,
    ) -> Result<Term> {
        let local = self.mlm_local(tokens, rows)?;
        let chosen = local.as_ref().map_or(0, |(_, k)| *k);
        let global = mlm_global(chosen, rows.device, coll)?;
        Ok(self.mlm_term(local, chosen, global))
    }

    /// The MLM masks of this rank's rows (which tokens are chosen, and what replaces them).
    pub(super) fn mlm_mask(&self, tokens: &Tensor, rows: &Rows) -> Result<masking::MlmMask> {
        let len = tokens.size()[1];
        let flat = Vec::<i64>::try_from(
            tokens
                .to_device(Device::Cpu)
                .to_kind(Kind::Int64)
                .flatten(0, -1),
        )?;
        let mut rngs = self.row_rngs(2, rows.offset, rows.n);
        let (ratio, vocab) = (self.objectives.mlm_ratio, self.model.config.vocab_size);
        Ok(masking::mlm_mask(&mut rngs, &flat, len, ratio, vocab))
    }

    /// This rank's summed MLM loss and its chosen count (None without rows).
    fn mlm_local(&self, tokens: &Tensor, rows: &Rows) -> Result<Option<(Tensor, i64)>> {
        if rows.n == 0 {
            return Ok(None);
        }
        let dev = rows.device;
        let mk = self.mlm_mask(tokens, rows)?;
        let logits = self.model.mlm_logits(
            &mk.input.to_device(dev),
            &mk.attend.to_device(dev),
            &mk.replace.to_device(dev),
            &mk.chosen.to_device(dev),
        )?;
        let l = loss::mlm_sum(&logits, &mk.labels.to_device(dev));
        Ok(Some((l, mk.labels.numel() as i64)))
    }

    /// The term of a summed MLM loss: reported per `report_count` tokens (this rank's chosen
    /// count), back-propagated per `global` (every rank's).
    pub(super) fn mlm_term(
        &self,
        local: Option<(Tensor, i64)>,
        report_count: i64,
        global: f64,
    ) -> Term {
        let mut term = Term {
            loss: 0.0,
            surrogate: Vec::new(),
            backward_s: 0.0,
        };
        if let Some((l, _)) = local {
            term.loss = l.double_value(&[]) / report_count.max(1) as f64;
            term.surrogate.push(l * (self.objectives.mlm / global));
        }
        term
    }

    /// MLM of a micro-batch (`rows` its part of the batch), with the step's counts.
    pub(super) fn mlm_chunk(
        &self,
        tokens: &Tensor,
        rows: &Rows,
        report_count: i64,
        global: f64,
    ) -> Result<Term> {
        let local = self.mlm_local(tokens, rows)?;
        Ok(self.mlm_term(local, report_count, global))
    }

    /// MAE's pixel loss on the hidden patches, for a rank with rows (no collective). Every row
    /// hides as many patches, so local mean × n/B sums to the global mean.
    pub(super) fn mae(&self, images: &Tensor, rows: &Rows) -> Result<Term> {
        let o = &self.objectives;
        let m = &self.model;
        let dev = rows.device;
        let mut rngs = self.row_rngs(3, rows.offset, rows.n);
        let mk = masking::mae_mask(&mut rngs, m.config.num_patches(), o.mae_ratio);
        let pred = m.mae_predict(images, &mk.keep.to_device(dev), &mk.restore.to_device(dev))?;
        let l = loss::mae(
            &pred,
            images,
            &mk.hidden.to_device(dev),
            m.config.patch_size,
        );
        Ok(Term {
            loss: l.double_value(&[]),
            surrogate: vec![l * (o.mae * rows.scale)],
            backward_s: 0.0,
        })
    }
}

/// Every rank's chosen MLM tokens, summed (one all-reduce), at least 1.
pub(super) fn mlm_global(chosen: i64, dev: Device, coll: &mut dyn Collective) -> Result<f64> {
    let mut count = Tensor::from_slice(&[chosen as f32]).to_device(dev);
    coll.all_reduce_sum(&mut count)?;
    Ok(count.double_value(&[0]).max(1.0))
}
