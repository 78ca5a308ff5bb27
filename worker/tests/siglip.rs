//! SigLIP's chunked exchange (`train::siglip::exchange`) against the dense global loss computed
//! on one process, in f64: loss, feature gradients and the scale/bias gradients, over the real
//! TCP ring with equal and unequal shares (and a rank without rows).

mod common;

use common::on_ring;
use ferroclip_worker::collective::ring::RingOptions;
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::siglip::exchange;
use tch::{Device, Kind, Tensor};

/// Rounding in f64 over sums of a few hundred terms is ~1e-14; a wrong label, a missing block or
/// a gradient kept by the wrong rank is ~1e-2.
const EXACT: f64 = 1e-10;

const G: i64 = 16;

/// Unit-norm features [G, 8] for images and texts, drawn so that matching pairs are similar.
fn features() -> (Tensor, Tensor) {
    let _rng = common::RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let norm = |x: Tensor| &x / x.norm_scalaropt_dim(2, [-1], true);
    let img = Tensor::randn([G, 8], (Kind::Double, Device::Cpu));
    let txt = &img + Tensor::randn([G, 8], (Kind::Double, Device::Cpu)) * 0.5;
    (norm(img), norm(txt))
}

fn scalar(v: f64) -> Tensor {
    Tensor::from(v).set_requires_grad(true)
}

/// (loss sum, d img, d txt, d scale, d bias) of the dense global loss / G, with the SigLIP init.
fn dense() -> (f64, Tensor, Tensor, f64, f64) {
    let (img, txt) = features();
    let (img, txt) = (img.set_requires_grad(true), txt.set_requires_grad(true));
    let (scale, bias) = (scalar(10f64.ln()), scalar(-10.0));
    let logits = img.matmul(&txt.tr()) * scale.exp() + &bias;
    let labels = Tensor::eye(G, (Kind::Double, Device::Cpu)) * 2.0 - 1.0;
    let sum = -(logits * labels).log_sigmoid().sum(Kind::Double);
    (&sum / G as f64).backward();
    let v = |t: &Tensor| t.grad().double_value(&[]);
    (
        sum.double_value(&[]),
        img.grad(),
        txt.grad(),
        v(&scale),
        v(&bias),
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Runs the exchange over `lens` rows per rank; checks every rank's share against `dense()`.
fn check(lens: &[i64]) {
    let offsets: Vec<i64> = lens
        .iter()
        .scan(0, |o, &n| {
            *o += n;
            Some(*o - n)
        })
        .collect();
    let run = |rank: usize, coll: &mut dyn ferroclip_worker::collective::Collective| {
        let (o, n) = (offsets[rank], lens[rank]);
        // Drawn in each rank's thread (tensors are not shared between threads).
        let (img, txt) = features();
        let (scale, bias) = (scalar(10f64.ln()), scalar(-10.0));
        let ex = exchange(
            &img.narrow(0, o, n),
            &txt.narrow(0, o, n),
            &scale,
            &bias,
            lens,
            1.0 / G as f64,
            coll,
        )
        .expect("exchange");
        let g = |t: &Tensor| {
            let g = t.grad();
            if g.defined() {
                g.double_value(&[])
            } else {
                0.0
            }
        };
        (ex, g(&scale), g(&bias))
    };
    let parts = if lens.len() == 1 {
        vec![run(0, &mut Single)]
    } else {
        on_ring(lens.len(), RingOptions::default(), |rank, ring| {
            run(rank, ring)
        })
    };
    let (loss, d_img, d_txt, d_scale, d_bias) = dense();
    let sum: f64 = parts.iter().map(|(ex, _, _)| ex.loss_sum).sum();
    assert!(
        (sum - loss).abs() < EXACT * loss,
        "{lens:?}: loss {sum} vs {loss}"
    );
    // The scale and bias gradients are per-rank shares that the gradient all-reduce sums.
    let scale: f64 = parts.iter().map(|p| p.1).sum();
    let bias: f64 = parts.iter().map(|p| p.2).sum();
    assert!(
        (scale - d_scale).abs() < EXACT,
        "{lens:?}: d scale {scale} vs {d_scale}"
    );
    assert!(
        (bias - d_bias).abs() < EXACT,
        "{lens:?}: d bias {bias} vs {d_bias}"
    );
    let mut worst = 0.0f64;
    for (rank, (ex, _, _)) in parts.iter().enumerate() {
        let (o, n) = (offsets[rank], lens[rank]);
        assert_eq!(ex.img_grad.size()[0], n);
        if n == 0 {
            continue;
        }
        let di = max_diff(&ex.img_grad, &d_img.narrow(0, o, n));
        let dt = max_diff(&ex.txt_grad, &d_txt.narrow(0, o, n));
        assert!(
            di < EXACT && dt < EXACT,
            "{lens:?} rank {rank}: {di:e} {dt:e}"
        );
        worst = worst.max(di).max(dt);
    }
    assert!(
        d_img.abs().max().double_value(&[]) > 1e-3,
        "a trivial gradient"
    );
    eprintln!("{lens:?}: loss {sum:.12} (dense {loss:.12}), worst feature-gradient diff {worst:e}");
}

#[test]
fn one_process_equals_the_dense_loss() {
    check(&[G]);
}

#[test]
fn two_ranks_of_8_equal_the_dense_loss() {
    check(&[8, 8]);
}

#[test]
fn unequal_shares_and_an_empty_rank_equal_the_dense_loss() {
    check(&[5, 11]);
    check(&[6, 0, 10]);
}

#[test]
fn siglip_starts_from_the_papers_scale_and_bias() {
    let mut cfg = common::tiny_config();
    let build = |cfg: &ferroclip_proto::config::RunConfig| {
        let _rng = common::RNG.lock().unwrap_or_else(|e| e.into_inner());
        ferroclip_worker::train::Trainer::new(cfg, 1).expect("trainer")
    };
    let clip = build(&cfg);
    assert!(clip.model.logit_bias.is_none());
    assert!((clip.model.logit_scale.double_value(&[]) - (1.0f64 / 0.07).ln()).abs() < 1e-6);
    (cfg.objectives.contrastive, cfg.objectives.siglip) = (0.0, 1.0);
    let sig = build(&cfg);
    assert!((sig.model.logit_scale.double_value(&[]) - 10f64.ln()).abs() < 1e-6);
    let bias = sig.model.logit_bias.as_ref().expect("logit_bias");
    assert_eq!(bias.double_value(&[]), -10.0);
    assert!(sig.model.params.get("logit_bias").is_some());
}
