//! Exact gradient accumulation (GradCache, Gao et al. 2021; OpenCLIP's `--accum-freq`):
//! `optim.micro_batch` rows per forward pass with activations kept. The step first computes
//! every micro-batch's features without storing activations, takes the global-batch contrastive
//! losses on them (the same collectives as the one-pass step) and their gradients w.r.t. the
//! features, then re-runs each micro-batch with grad and back-propagates its cached feature
//! gradients together with its MLM/MAE terms (masks are drawn per global row, MLM is normalised
//! by the step's global count). One gradient all-reduce at the end: the update equals the
//! one-pass step's.

use tch::Tensor;

use super::objectives::{mlm_global, Rows};
use super::{Result, StepLosses, Trainer};
use crate::collective::Collective;

impl Trainer {
    /// `forward_backward` in micro-batches of `micro` rows; every rank takes this path when
    /// `optim.micro_batch` is set (the same collectives whatever its row count).
    pub(super) fn forward_backward_micro(
        &mut self,
        images: &Tensor,
        tokens: &Tensor,
        rows: &Rows,
        micro: i64,
        coll: &mut dyn Collective,
    ) -> Result<StepLosses> {
        let t0 = std::time::Instant::now();
        let o = self.objectives.clone();
        let n = rows.n;
        let chunks: Vec<(i64, i64)> = (0..n)
            .step_by(micro.max(1) as usize)
            .map(|s| (s, micro.min(n - s)))
            .collect();
        let part = |t: &Tensor, (s, l): (i64, i64)| t.narrow(0, s, l);
        let mut out = StepLosses::default();
        let mut backward_s = 0.0;
        // 1. Features without activations, the contrastive losses over the global batch, and
        // their gradients w.r.t. this rank's features (the leaves' grads).
        let mut feature_grads = None;
        if o.contrastive > 0.0 || o.siglip > 0.0 {
            let (img, txt) = tch::no_grad(|| -> (Tensor, Tensor) {
                let (mut is, mut ts) = (Vec::new(), Vec::new());
                for &c in &chunks {
                    let (i, t) =
                        self.features(&part(images, c), &part(tokens, c), &rows.chunk(c.0, c.1));
                    is.push(i);
                    ts.push(t);
                }
                let empty = || self.features(images, tokens, rows);
                if is.is_empty() {
                    empty()
                } else {
                    (Tensor::cat(&is, 0), Tensor::cat(&ts, 0))
                }
            });
            let img = img.detach().set_requires_grad(true);
            let txt = txt.detach().set_requires_grad(true);
            let mut surrogate = Vec::new();
            if o.contrastive > 0.0 {
                let t = self.contrastive(&img, &txt, rows, coll)?;
                (out.contrastive, backward_s) = (t.loss, backward_s + t.backward_s);
                surrogate.extend(t.surrogate);
            }
            if o.siglip > 0.0 {
                let t = self.siglip(&img, &txt, rows, coll)?;
                (out.siglip, backward_s) = (t.loss, backward_s + t.backward_s);
                surrogate.extend(t.surrogate);
            }
            if !surrogate.is_empty() {
                // The surrogates are ⟨features, g⟩: this backward hands g to the leaves.
                Tensor::stack(&surrogate, 0).sum(img.kind()).backward();
                feature_grads = Some((img.grad(), txt.grad()));
            }
        }
        // MLM is a token mean over the global batch: the count once, before the micro-batches.
        let mlm = o.mlm > 0.0 && self.model.mlm.is_some();
        let (mut chosen, mut global) = (0, 1.0);
        if mlm {
            if n > 0 {
                chosen = self.mlm_mask(tokens, rows)?.labels.numel() as i64;
            }
            global = mlm_global(chosen, rows.device, coll)?;
        }
        let mae = o.mae > 0.0 && n > 0 && self.model.mae.is_some();
        // 2. Each micro-batch again, with grad: its cached feature gradients and its MLM/MAE.
        for &c in &chunks {
            let r = rows.chunk(c.0, c.1);
            let (img, tok) = (part(images, c), part(tokens, c));
            let mut surrogate = Vec::new();
            if let Some((gi, gt)) = &feature_grads {
                let (fi, ft) = self.features(&img, &tok, &r);
                surrogate.push((fi * part(gi, c)).sum(gi.kind()));
                surrogate.push((ft * part(gt, c)).sum(gt.kind()));
            }
            if mlm {
                let t = self.mlm_chunk(&tok, &r, chosen, global)?;
                out.mlm += t.loss;
                surrogate.extend(t.surrogate);
            }
            if mae {
                let t = self.mae(&img, &r)?;
                out.mae += t.loss * c.1 as f64 / n as f64;
                surrogate.extend(t.surrogate);
            }
            let tb = std::time::Instant::now();
            if !surrogate.is_empty() {
                let l = Tensor::stack(&surrogate, 0).sum(self.model.kind());
                // Nothing to back-propagate when every parameter it reaches is locked.
                if l.requires_grad() {
                    l.backward();
                }
            }
            backward_s += tb.elapsed().as_secs_f64();
        }
        out.total = out.weighted(&o, self.step)?;
        let ta = std::time::Instant::now();
        if coll.world_size() > 1 {
            self.all_reduce_grads(coll)?;
        }
        backward_s += ta.elapsed().as_secs_f64();
        self.last_times = super::PhaseTimes {
            forward_s: t0.elapsed().as_secs_f64() - backward_s,
            backward_s,
        };
        Ok(out)
    }
}
