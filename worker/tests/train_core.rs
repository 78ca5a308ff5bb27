//! Losses, masks, and the trainer's compute_grads/apply_update on tiny models and random data.

mod common;

use ferroclip_proto::config::RunConfig;
use ferroclip_worker::collective::{Collective, CollectiveError, Single};
use ferroclip_worker::loss;
use ferroclip_worker::model::masking;
use ferroclip_worker::train::Trainer;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

/// A tiny custom model: 16 px images, patch 4, width 32, 2+2 layers, vocab 300, context 8.
fn config(contrastive: f64, mlm: f64, mae: f64) -> RunConfig {
    let mut c = common::tiny_config();
    c.objectives.contrastive = contrastive;
    c.objectives.mlm = mlm;
    c.objectives.mae = mae;
    c.optim.lr = 2e-3;
    c.optim.warmup_steps = 2;
    c.optim.weight_decay = 0.0;
    c
}

/// Random images and token rows "sot w w w eot 0 0" with sot/eot the two top ids (298, 299).
fn batch(n: i64, seed: i64, kind: Kind) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let images = Tensor::randn([n, 3, 16, 16], (kind, Device::Cpu));
    let words = Tensor::randint_low(1, 298, [n, 8], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(8, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let len = Tensor::randint_low(3, 8, [n, 1], (Kind::Int64, Device::Cpu));
    let t = words.where_self(&pos.lt_tensor(&len), &Tensor::zeros_like(&words));
    let t = t.where_self(&pos.ne(0), &Tensor::full_like(&t, 298));
    let t = t.where_self(&pos.ne_tensor(&len), &Tensor::full_like(&t, 299));
    (images, t)
}

#[test]
fn infonce_on_a_hand_computable_case() {
    // Orthonormal pairs, scale 1: each row's logits are (1, 0) → CE = ln(1 + e^-1).
    let f = Tensor::eye(2, (Kind::Double, Device::Cpu));
    let l = loss::contrastive(&f, &f, &Tensor::from(0.0f64), 0, 2).double_value(&[]);
    assert!((l - (1.0 + (-1.0f64).exp()).ln()).abs() < 1e-12, "{l}");
    // Local rows: row 1 of 2 against both columns gives the same per-row value.
    let l1 = loss::contrastive(&f, &f, &Tensor::from(0.0f64), 1, 1).double_value(&[]);
    assert!((l1 - l).abs() < 1e-12);
    // Swapped pairs: each row's logits are (0, 1) for label 0 → CE = ln(1 + e).
    let t = Tensor::from_slice(&[0.0f64, 1.0, 1.0, 0.0]).view([2, 2]);
    let l = loss::contrastive(&f, &t, &Tensor::from(0.0f64), 0, 2).double_value(&[]);
    assert!((l - (1.0 + 1.0f64.exp()).ln()).abs() < 1e-12, "{l}");
}

#[test]
fn compute_grads_with_single_equals_plain_infonce_and_finite_differences() {
    let cfg = config(1.0, 0.0, 0.0);
    let mut tr = Trainer::with_kind(&cfg, 10, Kind::Double).expect("trainer");
    let (images, tokens) = batch(4, 7, Kind::Double);
    tr.compute_grads_tensors(&images, &tokens, 4, &mut Single)
        .expect("grads");

    // The same model, plain InfoNCE with one backward.
    let plain = Trainer::with_kind(&cfg, 10, Kind::Double).expect("trainer");
    let m = &plain.model;
    let l = loss::contrastive(
        &m.image_features(&images, None),
        &m.text_features(&tokens),
        &m.logit_scale,
        0,
        4,
    );
    l.backward();
    for ((name, a), (_, b)) in tr.model.params.iter().zip(plain.model.params.iter()) {
        let d = (a.grad() - b.grad()).abs().max().double_value(&[]);
        assert!(d < 1e-10, "{name}: gradients differ by {d}");
    }

    // Central finite differences on a few entries of different tensors.
    let eval = || {
        tch::no_grad(|| {
            let m = &tr.model;
            loss::contrastive(
                &m.image_features(&images, None),
                &m.text_features(&tokens),
                &m.logit_scale,
                0,
                4,
            )
            .double_value(&[])
        })
    };
    let h = 1e-6;
    for name in [
        "visual.conv1.weight",
        "transformer.resblocks.1.attn.in_proj_weight",
        "text_projection",
        "logit_scale",
        "visual.ln_post.bias",
    ] {
        let p = tr.model.params.get(name).expect(name).shallow_clone();
        let flat = p.detach().view([-1]);
        let analytic = p.grad().view([-1]);
        for i in [0i64, flat.size()[0] / 2] {
            let x0 = flat.double_value(&[i]);
            let _ = flat.get(i).fill_(x0 + h);
            let up = eval();
            let _ = flat.get(i).fill_(x0 - h);
            let down = eval();
            let _ = flat.get(i).fill_(x0);
            let fd = (up - down) / (2.0 * h);
            let an = analytic.double_value(&[i]);
            assert!(
                (fd - an).abs() < 1e-6 * (1.0 + an.abs()),
                "{name}[{i}]: analytic {an} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn mask_ratios_match_the_config() {
    let mut rows: Vec<StdRng> = (0..8).map(StdRng::seed_from_u64).collect();
    let m = masking::mae_mask(&mut rows, 64, 0.75);
    assert_eq!(m.keep.size(), [8, 16]);
    let hidden_per_row = m.hidden.sum_dim_intlist(1, false, Kind::Float);
    assert_eq!(
        Vec::<f32>::try_from(hidden_per_row).expect("vec"),
        vec![48.0; 8]
    );
    // A visible patch is never hidden; restore puts each patch back where it was.
    assert_eq!(
        m.hidden
            .gather(1, &m.keep, false)
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
    let order = m.restore.argsort(1, false);
    assert!(order.narrow(1, 0, 16).equal(&m.keep));

    // MLM on 2000 rows of 30 eligible tokens (sot, 30 words, eot).
    let (b, n) = (2000i64, 32i64);
    let mut toks = Vec::new();
    for _ in 0..b {
        toks.push(49406);
        toks.extend((0..30).map(|i| 100 + i));
        toks.push(49407);
    }
    let mut rows: Vec<StdRng> = (0..b as u64).map(StdRng::seed_from_u64).collect();
    let mk = masking::mlm_mask(&mut rows, &toks, n, 0.15, 49408);
    let chosen = mk.chosen.sum(Kind::Float).double_value(&[]);
    let frac = chosen / (b * 30) as f64;
    assert!((frac - 0.15).abs() < 0.01, "chosen fraction {frac}");
    let replaced = mk.replace.sum(Kind::Float).double_value(&[]) / chosen;
    assert!(
        (replaced - 0.8).abs() < 0.02,
        "mask-token fraction {replaced}"
    );
    let orig = Tensor::from_slice(&toks).view([b, n]);
    let changed = mk.input.ne_tensor(&orig).sum(Kind::Float).double_value(&[]) / chosen;
    assert!(
        (changed - 0.1).abs() < 0.02,
        "random-token fraction {changed}"
    );
    // sot and eot are never chosen.
    assert_eq!(
        mk.chosen.select(1, 0).sum(Kind::Float).double_value(&[]),
        0.0
    );
    assert_eq!(
        mk.chosen.select(1, 31).sum(Kind::Float).double_value(&[]),
        0.0
    );
    assert_eq!(mk.labels.size(), [chosen as i64]);
}

/// Trains 25 steps on one fixed batch with only the given objective; returns (first, last) loss.
fn train_alone(
    c: f64,
    mlm: f64,
    mae: f64,
    pick: fn(&ferroclip_worker::train::StepLosses) -> f64,
) -> (f64, f64) {
    let mut cfg = config(c, mlm, mae);
    cfg.objectives.patch_dropout = if c > 0.0 { 0.5 } else { 0.0 };
    let mut tr = Trainer::new(&cfg, 40).expect("trainer");
    let (images, tokens) = batch(8, 3, Kind::Float);
    let mut losses = Vec::new();
    for _ in 0..40 {
        let l = tr
            .compute_grads_tensors(&images, &tokens, 8, &mut Single)
            .expect("grads");
        tr.apply_update().expect("update");
        losses.push(pick(&l));
    }
    // Masks change every step, so single losses are noisy: compare the first and last fives.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&losses[..5]), mean(&losses[35..]))
}

#[test]
fn each_objective_alone_lowers_its_loss() {
    let (a, b) = train_alone(1.0, 0.0, 0.0, |l| l.contrastive);
    assert!(b < 0.7 * a, "contrastive {a} -> {b}");
    let (a, b) = train_alone(0.0, 1.0, 0.0, |l| l.mlm);
    assert!(b < 0.9 * a, "mlm {a} -> {b}");
    let (a, b) = train_alone(0.0, 0.0, 1.0, |l| l.mae);
    assert!(b < 0.9 * a, "mae {a} -> {b}");
}

#[test]
fn cpu_runs_are_bit_reproducible() {
    let run = || {
        let mut tr = Trainer::new(&config(1.0, 0.5, 0.5), 10).expect("trainer");
        (0..3)
            .map(|s| {
                let (images, tokens) = batch(6, s, Kind::Float);
                let l = tr
                    .compute_grads_tensors(&images, &tokens, 6, &mut Single)
                    .expect("grads");
                tr.apply_update().expect("update");
                l.total
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.iter().all(|l| l.is_finite()));
}

/// World size 2 whose peer never answers.
struct DeadPeer;
impl Collective for DeadPeer {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&mut self, _t: &mut Tensor) -> Result<(), CollectiveError> {
        Err(CollectiveError::Timeout {
            peer: 1,
            op: "all_reduce",
            timeout_s: 0.1,
        })
    }
    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(Tensor::cat(&[t.shallow_clone(), t.shallow_clone()], 0))
    }
    fn broadcast(&mut self, _t: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[test]
fn a_failed_collective_abandons_the_step_with_zero_grads_and_no_update() {
    let mut tr = Trainer::new(&config(1.0, 0.0, 0.0), 10).expect("trainer");
    let before: Vec<Tensor> = tr.state_tensors().iter().map(|t| t.copy()).collect();
    let (images, tokens) = batch(4, 1, Kind::Float);
    let err = tr
        .compute_grads_tensors(&images, &tokens, 8, &mut DeadPeer)
        .unwrap_err();
    assert!(err.to_string().contains("peer rank 1"), "{err}");
    for (name, p) in tr.model.params.iter() {
        let g = p.grad();
        assert!(
            !g.defined() || g.abs().sum(Kind::Double).double_value(&[]) == 0.0,
            "{name} kept a gradient"
        );
    }
    for (a, b) in before.iter().zip(tr.state_tensors()) {
        assert!(a.equal(&b));
    }
    assert_eq!(tr.step(), 0);
}

#[test]
fn a_batch_of_the_wrong_shape_is_an_error() {
    let mut tr = Trainer::new(&config(1.0, 0.0, 0.0), 10).expect("trainer");
    let (images, tokens) = batch(4, 1, Kind::Float);
    let err = tr
        .compute_grads_tensors(&images.narrow(2, 0, 8), &tokens, 4, &mut Single)
        .unwrap_err();
    assert!(err.to_string().contains("images have shape"), "{err}");
    let err = tr
        .compute_grads_tensors(&images, &tokens, 2, &mut Single)
        .unwrap_err();
    assert!(err.to_string().contains("global batch"), "{err}");
}

#[test]
fn schedule_warms_up_then_decays_to_zero() {
    use ferroclip_worker::optim::cosine_lr;
    assert!((cosine_lr(1.0, 0, 4, 20) - 0.25).abs() < 1e-12);
    assert!((cosine_lr(1.0, 3, 4, 20) - 1.0).abs() < 1e-12);
    assert!((cosine_lr(1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
    assert!(cosine_lr(1.0, 20, 4, 20).abs() < 1e-12);
}
