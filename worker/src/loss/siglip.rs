//! SigLIP's sigmoid pairwise loss (Zhai et al. 2023; OpenCLIP's `SigLipLoss`) on one block of
//! the global image × text matrix. The trainer sums the blocks (`train::siglip`) so that no
//! rank ever holds more than its rows against one other rank's columns.

use tch::Tensor;

/// Σ −log σ(y_ij · (t·⟨img_i, txt_j⟩ + b)) over the block, with t = exp(`logit_scale`),
/// b = `logit_bias`, y_ij = +1 for a matching pair and −1 otherwise. `diagonal`: the block
/// pairs rows with their own columns (then y_ii = +1; the block must be square), else every
/// pair is negative. OpenCLIP divides by the local batch; the trainer divides the sum over all
/// blocks by the global batch instead, the same when ranks hold equal shares.
pub fn siglip_sum(
    img: &Tensor,
    txt: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    diagonal: bool,
) -> Tensor {
    let logits = img.matmul(&txt.tr()) * logit_scale.exp() + logit_bias;
    let signs = if diagonal {
        // 2·I − 1
        Tensor::eye(img.size()[0], (logits.kind(), logits.device())) * 2.0 - 1.0
    } else {
        Tensor::full_like(&logits, -1.0)
    };
    -(logits * signs).log_sigmoid().sum(img.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn unit(rows: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let x = Tensor::randn([rows, 3], (Kind::Double, Device::Cpu));
        &x / x.norm_scalaropt_dim(2, [-1], true)
    }

    /// The element-wise definition, written out with plain f64 arithmetic.
    fn by_hand(img: &Tensor, txt: &Tensor, t: f64, b: f64) -> f64 {
        let n = img.size()[0];
        let dot = img.matmul(&txt.tr());
        let mut sum = 0.0;
        for i in 0..n {
            for j in 0..n {
                let y = if i == j { 1.0 } else { -1.0 };
                let z = y * (t.exp() * dot.double_value(&[i, j]) + b);
                sum += (1.0 + (-z).exp()).ln();
            }
        }
        sum
    }

    #[test]
    fn the_block_sum_is_the_definition_and_its_gradients_match_finite_differences() {
        let img = unit(3, 1).set_requires_grad(true);
        let txt = unit(3, 2);
        let (t, b) = (1.3, -0.7);
        let scale = Tensor::from(t).set_requires_grad(true);
        let bias = Tensor::from(b).set_requires_grad(true);
        let l = siglip_sum(&img, &txt, &scale, &bias, true);
        let want = by_hand(&img.detach(), &txt, t, b);
        assert!((l.double_value(&[]) - want).abs() < 1e-12, "{l} vs {want}");
        l.backward();
        // Central differences in f64, step 1e-6: truncation ~1e-12, rounding ~1e-10.
        let h = 1e-6;
        let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
        let d_scale = fd(&|e| by_hand(&img.detach(), &txt, t + e, b));
        let d_bias = fd(&|e| by_hand(&img.detach(), &txt, t, b + e));
        assert!((scale.grad().double_value(&[]) - d_scale).abs() < 1e-7);
        assert!((bias.grad().double_value(&[]) - d_bias).abs() < 1e-7);
        for i in 0..3 {
            for k in 0..3 {
                let d = fd(&|e| {
                    let moved = img.detach().copy();
                    let _ = moved.get(i).get(k).g_add_scalar_(e);
                    by_hand(&moved, &txt, t, b)
                });
                let g = img.grad().double_value(&[i, k]);
                assert!((g - d).abs() < 1e-7, "d/dimg[{i},{k}]: {g} vs {d}");
            }
        }
    }

    #[test]
    fn an_off_diagonal_block_is_all_negatives() {
        let (img, txt) = (unit(2, 3), unit(4, 4));
        let (scale, bias) = (Tensor::from(0.5f64), Tensor::from(-2.0f64));
        let l = siglip_sum(&img, &txt, &scale, &bias, false).double_value(&[]);
        let z = -(img.matmul(&txt.tr()) * 0.5f64.exp() - 2.0);
        let want = (z.neg().exp() + 1.0)
            .log()
            .sum(Kind::Double)
            .double_value(&[]);
        assert!((l - want).abs() < 1e-12, "{l} vs {want}");
    }
}
