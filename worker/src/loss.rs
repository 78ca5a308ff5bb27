//! The objectives. Contrastive and MAE return a mean over this rank's rows (the trainer scales them
//! by local/global batch, so sums over ranks are global means); MLM a sum the trainer divides by
//! the global count of chosen tokens.

mod siglip;

pub use siglip::siglip_sum;
use tch::{Kind, Reduction, Tensor};

/// OpenCLIP's local contrastive loss: this rank's `n` rows, starting at `offset` of the gathered
/// features, against every gathered column. `img`, `txt`: [G, E] normalised; `logit_scale`: the
/// log of the temperature's inverse. Symmetric: (CE(image→text) + CE(text→image)) / 2.
pub fn contrastive(
    img: &Tensor,
    txt: &Tensor,
    logit_scale: &Tensor,
    offset: i64,
    n: i64,
) -> Tensor {
    let scale = logit_scale.exp();
    let labels = Tensor::arange_start(offset, offset + n, (Kind::Int64, img.device()));
    let per_image = img.narrow(0, offset, n).matmul(&txt.tr()) * &scale;
    let per_text = txt.narrow(0, offset, n).matmul(&img.tr()) * &scale;
    let ce = |logits: &Tensor| {
        logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0)
    };
    (ce(&per_image) + ce(&per_text)) / 2.0
}

/// MAE's loss: MSE between predicted and per-patch-normalised pixels, on hidden patches only.
/// `pred`: [B, G, 3·p·p]; `images`: [B, 3, S, S]; `hidden`: [B, G] with 1 on hidden patches.
pub fn mae(pred: &Tensor, images: &Tensor, hidden: &Tensor, patch: i64) -> Tensor {
    let target = patchify(&images.to_kind(pred.kind()), patch);
    let mean = target.mean_dim(&[-1i64][..], true, pred.kind());
    let var = target.var_dim(&[-1i64][..], true, true);
    let target = (target - mean) / (var + 1e-6).sqrt();
    let per_patch = (pred - target)
        .square()
        .mean_dim(&[-1i64][..], false, pred.kind());
    let hidden = hidden.to_kind(pred.kind());
    (per_patch * &hidden).sum(pred.kind()) / hidden.sum(pred.kind()).clamp_min(1.0)
}

/// [B, 3, S, S] → [B, G, p·p·3], patches in the conv's row-major order, pixels as (y, x, c).
pub fn patchify(images: &Tensor, p: i64) -> Tensor {
    let (b, c, h, w) = images.size4().unwrap_or((0, 0, 0, 0));
    let (gh, gw) = (h / p, w / p);
    images
        .reshape([b, c, gh, p, gw, p])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([b, gh * gw, p * p * c])
}

/// MLM's loss, summed: cross-entropy of `logits` [M, V] against `labels` [M]; the trainer divides
/// by the chosen positions of the whole global batch. 0 when nothing was chosen.
pub fn mlm_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    if labels.numel() == 0 {
        return logits.sum(logits.kind()) * 0.0;
    }
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, -100, 0.0)
}
