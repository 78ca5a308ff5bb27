//! Data-parallel exactness: 2 ranks × batch 8 over the real TCP ring must update the parameters
//! exactly as 1 process × batch 16 on the same samples (contrastive over the global batch with
//! gathered features and summed-back gradients, bucketed gradient all-reduce, overlapped with
//! backward or not).
//!
//! Why float64: the two sides add the same numbers in different orders (a batch of 16 against
//! two of 8, libtorch's kernels choosing their blocking per CPU), and AdamW divides each update
//! by the gradient's own scale, so in f32 a parameter whose gradient is tiny moves by up to
//! ~1e-5 differently on one CPU and not another. In f64 those rounding differences are ~1e-16
//! relative; after Adam's normalisation they stay below 1e-12, so `EXACT` = 1e-9 is both far from
//! rounding and far below what a real bug does (a missing all-reduce, a wrong gather-with-grad or
//! a mask drawn per rank move parameters by ~lr = 2e-3). The f32 training path is checked
//! separately, on gradients before the optimizer, against the f64 reference.

mod common;

use common::{global_batch, on_ring, tiny_config, RNG};
use ferroclip_proto::config::{RunConfig, Switch};
use ferroclip_worker::collective::ring::RingOptions;
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::Trainer;
use tch::{Kind, Tensor};

/// Parameters of the f64 runs may differ by this much (see the module comment).
const EXACT: f64 = 1e-9;

fn config() -> RunConfig {
    let mut c = tiny_config();
    c.optim.lr = 2e-3;
    c.optim.warmup_steps = 1;
    c.cluster.bucket_mb = 0.05; // several buckets even for this tiny model
    c
}

/// A trainer built under the generator lock (model init draws from torch's global generator).
/// The initial values are the same in every kind (drawn in f32, then converted).
fn trainer(cfg: &RunConfig, kind: Kind) -> Trainer {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    Trainer::with_kind(cfg, 10, kind).expect("trainer")
}

type Named = Vec<(String, Tensor)>;

fn params(t: &Trainer) -> Named {
    t.model
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy()))
        .collect()
}

fn grads(t: &Trainer) -> Named {
    t.model
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().to_kind(Kind::Double)))
        .collect()
}

/// One process, the whole batch, `steps` updates, in f64.
fn single(cfg: &RunConfig, steps: i64) -> Named {
    let mut t = trainer(cfg, Kind::Double);
    for s in 0..steps {
        let (img, tok) = global_batch(s, Kind::Double);
        t.compute_grads_tensors(&img, &tok, 16, &mut Single)
            .expect("grads");
        t.apply_update().expect("update");
    }
    params(&t)
}

fn two_ranks(cfg: &RunConfig, steps: i64) -> Vec<Named> {
    two_ranks_split(cfg, steps, 8)
}

/// Two ranks over the TCP ring in f64; rank 0 takes the first `split` samples of each step,
/// rank 1 the rest.
fn two_ranks_split(cfg: &RunConfig, steps: i64, split: i64) -> Vec<Named> {
    on_ring(2, RingOptions::default(), |rank, ring| {
        let mut t = trainer(cfg, Kind::Double);
        for s in 0..steps {
            let (img, tok) = global_batch(s, Kind::Double);
            let (from, len) = if rank == 0 {
                (0, split)
            } else {
                (split, 16 - split)
            };
            let (img, tok) = (img.narrow(0, from, len), tok.narrow(0, from, len));
            t.compute_grads_tensors(&img, &tok, 16, ring)
                .expect("grads");
            t.apply_update().expect("update");
        }
        params(&t)
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn assert_close(a: &Named, b: &Named, what: &str) {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let diff = max_diff(ta, tb);
        assert!(diff <= EXACT, "{what}: {na} differs by {diff:e}");
        worst = worst.max(diff);
    }
    eprintln!("{what}: largest parameter difference {worst:e}");
}

/// The test can fail: training moved the parameters (named `part`, all if empty) far more than
/// the tolerance.
fn assert_moved(cfg: &RunConfig, trained: &Named, part: &str) {
    let init = params(&trainer(cfg, Kind::Double));
    let moved = init
        .iter()
        .zip(trained)
        .filter(|((n, _), _)| n.contains(part))
        .map(|((_, a), (_, b))| max_diff(a, b))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "no parameter {part:?} moved (max {moved:e})");
}

#[test]
fn two_ranks_of_8_equal_one_process_of_16_contrastive() {
    let cfg = config();
    let reference = single(&cfg, 3);
    let ranks = two_ranks(&cfg, 3);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(&ranks[0], &reference, "2×8 vs 1×16");
    assert_moved(&cfg, &reference, "");
}

#[test]
fn two_ranks_of_8_equal_one_process_of_16_with_every_objective() {
    // Masks are drawn per row of the global batch, MLM is a token mean over the global batch and
    // MAE a mean over equal-sized masks, so splitting the batch changes nothing.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.25);
    let reference = single(&cfg, 3);
    let ranks = two_ranks(&cfg, 3);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(&ranks[0], &reference, "2×8 vs 1×16");
    // The MLM head and the MAE decoder were trained too.
    assert_moved(&cfg, &reference, "mlm.");
    assert_moved(&cfg, &reference, "mae.");
}

#[test]
fn two_ranks_of_8_equal_one_process_of_16_siglip() {
    // SigLIP's chunk-by-chunk exchange instead of the gathered InfoNCE.
    let mut cfg = config();
    (cfg.objectives.contrastive, cfg.objectives.siglip) = (0.0, 1.0);
    let reference = single(&cfg, 3);
    let ranks = two_ranks(&cfg, 3);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(&ranks[0], &reference, "2×8 vs 1×16");
    assert_moved(&cfg, &reference, "logit_bias");
    assert_moved(&cfg, &reference, "visual.");
}

#[test]
fn two_ranks_of_8_equal_one_process_of_16_siglip_with_every_objective() {
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.siglip, o.mlm, o.mae, o.patch_dropout) = (0.0, 1.0, 0.5, 0.5, 0.25);
    let reference = single(&cfg, 3);
    let ranks = two_ranks(&cfg, 3);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(&ranks[0], &reference, "2×8 vs 1×16");
    assert_moved(&cfg, &reference, "logit_bias");
    assert_moved(&cfg, &reference, "mlm.");
    assert_moved(&cfg, &reference, "mae.");
}

#[test]
fn two_ranks_of_4_micro_batches_of_2_equal_one_process_of_16_in_one_pass() {
    // GradCache: features first without activations, losses over the global batch, then each
    // micro-batch again with its cached feature gradients; every objective on, both contrastive
    // losses, FLIP's patch dropout included.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.siglip, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.5, 0.25);
    let reference = single(&cfg, 3);
    cfg.optim.micro_batch = 2;
    let ranks = two_ranks(&cfg, 3);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(&ranks[0], &reference, "2×(4×2) vs 1×16");
    // Unequal shares: 5 rows (micro-batches 2+2+1) and 11.
    let ranks = two_ranks_split(&cfg, 3, 5);
    assert_close(&ranks[0], &reference, "(2+2+1) + 11 vs 1×16");
    assert_moved(&cfg, &reference, "visual.");
    assert_moved(&cfg, &reference, "mlm.");
    assert_moved(&cfg, &reference, "mae.");
}

/// Every objective at once, ITM on a one-layer fusion encoder included.
fn itm_config() -> RunConfig {
    let mut cfg = config();
    cfg.model.fusion_layers = Some(1);
    let o = &mut cfg.objectives;
    (
        o.contrastive,
        o.siglip,
        o.mlm,
        o.mae,
        o.itm,
        o.patch_dropout,
    ) = (1.0, 0.5, 0.5, 0.5, 1.0, 0.25);
    cfg
}

/// ITM's global batch of step `s`: captions all distinct at step 0; at step 1 rows 0-5 share
/// row 0's caption and rows 8-11 row 8's (duplicates across both ranks' rows, which the hard
/// negatives must skip); at step 2 every row has row 0's caption (no true negative at all: the
/// positives alone).
fn itm_batch(s: i64) -> (Tensor, Tensor) {
    let (img, tok) = global_batch(s, Kind::Double);
    let copy = |tok: &Tensor, rows: std::ops::RangeInclusive<i64>, from: i64| {
        let t = tok.copy();
        for r in rows {
            t.get(r).copy_(&tok.get(from));
        }
        t
    };
    let tok = match s % 3 {
        1 => copy(&copy(&tok, 0..=5, 0), 8..=11, 8),
        2 => copy(&tok, 0..=15, 0),
        _ => tok,
    };
    (img, tok)
}

/// `steps` steps on `split` + (16 − split) rows over the ring (one rank for split 16 with
/// `Single`): each step's global-batch losses (each rank's local means weighted by its rows,
/// summed) and the parameters after.
fn losses_and_params(cfg: &RunConfig, steps: i64, split: Option<i64>) -> (Vec<[f64; 6]>, Named) {
    let run = |t: &mut Trainer,
               img: &Tensor,
               tok: &Tensor,
               coll: &mut dyn ferroclip_worker::collective::Collective| {
        let n = img.size()[0] as f64 / 16.0;
        let l = t.compute_grads_tensors(img, tok, 16, coll).expect("grads");
        t.apply_update().expect("update");
        [l.total, l.contrastive, l.siglip, l.mlm, l.mae, l.itm].map(|v| v * n)
    };
    let Some(split) = split else {
        let mut t = trainer(cfg, Kind::Double);
        let losses = (0..steps)
            .map(|s| {
                let (img, tok) = itm_batch(s);
                run(&mut t, &img, &tok, &mut Single)
            })
            .collect();
        return (losses, params(&t));
    };
    let ranks = on_ring(2, RingOptions::default(), |rank, ring| {
        let mut t = trainer(cfg, Kind::Double);
        let losses: Vec<[f64; 6]> = (0..steps)
            .map(|s| {
                let (img, tok) = itm_batch(s);
                let (from, len) = if rank == 0 {
                    (0, split)
                } else {
                    (split, 16 - split)
                };
                run(
                    &mut t,
                    &img.narrow(0, from, len),
                    &tok.narrow(0, from, len),
                    ring,
                )
            })
            .collect();
        (losses, params(&t))
    });
    let mut it = ranks.into_iter();
    let (Some((l0, p0)), Some((l1, p1))) = (it.next(), it.next()) else {
        panic!("two ranks");
    };
    assert_close(&p0, &p1, "rank 0 vs rank 1");
    let sums = l0
        .iter()
        .zip(&l1)
        .map(|(a, b)| std::array::from_fn(|i| a[i] + b[i]))
        .collect();
    (sums, p0)
}

#[test]
fn two_ranks_of_8_equal_one_process_of_16_with_itm_and_every_objective() {
    // ITM's hard negatives are drawn per row of the global batch from the global similarities,
    // the token sequences gathered with their gradients summed back, captions equal to the row's
    // never drawn (`itm_batch`): splitting the batch (evenly,
    // unevenly, or leaving a rank empty) changes neither the losses nor the update. Besides
    // parameters, the losses (MLM's is a local token mean, so it is left out: its global figure
    // is not a row-weighted sum) agree to f64 rounding.
    let cfg = itm_config();
    let (ref_losses, reference) = losses_and_params(&cfg, 3, None);
    // The overlapped all-reduce too: the fusion encoder's grads, made in ITM's own backward
    // before the model backward, go into their buckets after it (as logit_scale's do).
    for (split, overlap) in [
        (8, Switch::Off),
        (5, Switch::Off),
        (16, Switch::On),
        (8, Switch::On),
    ] {
        let mut cfg = cfg.clone();
        cfg.cluster.overlap_allreduce = overlap;
        let (losses, ranks) = losses_and_params(&cfg, 3, Some(split));
        assert_close(
            &ranks,
            &reference,
            &format!("{split}+{} vs 1×16", 16 - split),
        );
        for (step, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
            for (i, what) in [(1, "contrastive"), (2, "siglip"), (4, "mae"), (5, "itm")] {
                let d = (a[i] - b[i]).abs();
                assert!(
                    d <= EXACT,
                    "step {step}: {what} loss {} vs {} ({split} split)",
                    a[i],
                    b[i]
                );
            }
        }
    }
    // ITM trained: the loss is a real one (near ln 2 at init) and the fusion encoder moved.
    assert!(ref_losses[0][5] > 0.1, "itm loss {}", ref_losses[0][5]);
    assert_moved(&cfg, &reference, "fusion.");
    assert_moved(&cfg, &reference, "itm_head.");
    assert_moved(&cfg, &reference, "visual.");
}

#[test]
fn itm_refuses_micro_batches_and_a_model_without_fusion() {
    let mut cfg = itm_config();
    cfg.optim.micro_batch = 2;
    let _rng = common::RNG.lock().unwrap_or_else(|e| e.into_inner());
    let err = Trainer::with_kind(&cfg, 10, Kind::Double)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("micro_batch"), "{err}");
    let mut cfg = itm_config();
    cfg.model.fusion_layers = Some(0);
    let err = Trainer::with_kind(&cfg, 10, Kind::Double)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("fusion_layers"), "{err}");
}

#[test]
fn overlapped_all_reduce_updates_exactly_as_the_plain_path() {
    // cluster.overlap_allreduce = "on" (the default on GPUs) all-reduces buckets during the model
    // backward; the plain path after it. Same buckets, same order: the same sums.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.25);
    cfg.cluster.overlap_allreduce = Switch::On;
    let overlapped = two_ranks(&cfg, 3);
    cfg.cluster.overlap_allreduce = Switch::Off;
    let plain = two_ranks(&cfg, 3);
    assert_close(&overlapped[0], &plain[0], "overlapped vs plain, rank 0");
    assert_close(&overlapped[1], &plain[1], "overlapped vs plain, rank 1");
}

#[test]
fn a_rank_with_no_samples_takes_part_and_changes_nothing() {
    // A rank may be handed no rows: it must still join every collective.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.mlm, o.mae) = (1.0, 0.5, 0.5);
    // The full rank overlaps its all-reduce with backward; the empty one has no backward and
    // takes the plain path: the two must still issue the same all-reduces.
    cfg.cluster.overlap_allreduce = Switch::On;
    let reference = single(&cfg, 2);
    let ranks = two_ranks_split(&cfg, 2, 16);
    assert_close(&ranks[1], &ranks[0], "empty rank vs full rank");
    assert_close(&ranks[0], &reference, "16+0 vs 1×16");
}

#[test]
fn f32_gradients_of_two_ranks_match_the_f64_reference_within_rounding() {
    // The training dtype end to end: f32 towers, f32 buckets, the ring's f32 reduce-scatter.
    // Gradients before the optimizer (no Adam amplification), per tensor, relative to the
    // tensor's f64 gradient norm: f32 rounding (2^-24 per operation, a few hundred operations
    // deep) gives ~2e-6 (measured); the bound is 100× that, and a missing all-reduce (each rank holding
    // half the sum) or a wrong gather-with-grad gives ~1.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.25);
    let reference = {
        let mut t = trainer(&cfg, Kind::Double);
        let (img, tok) = global_batch(0, Kind::Double);
        t.compute_grads_tensors(&img, &tok, 16, &mut Single)
            .expect("grads");
        grads(&t)
    };
    let ranks = on_ring(2, RingOptions::default(), |rank, ring| {
        let mut t = trainer(&cfg, Kind::Float);
        let (img, tok) = global_batch(0, Kind::Float);
        let (img, tok) = (
            img.narrow(0, 8 * rank as i64, 8),
            tok.narrow(0, 8 * rank as i64, 8),
        );
        t.compute_grads_tensors(&img, &tok, 16, ring)
            .expect("grads");
        grads(&t)
    });
    assert_close_f32(&ranks[0], &ranks[1], 0.0, "rank 0 vs rank 1");
    assert_close_f32(&ranks[0], &reference, 2e-4, "f32 2×8 vs f64 1×16");
}

/// Per tensor: ‖a − b‖₂ ≤ rel·‖b‖₂ (rel 0: bit-identical).
fn assert_close_f32(a: &Named, b: &Named, rel: f64, what: &str) {
    let mut worst = 0.0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let err = (ta - tb).norm().double_value(&[]);
        let scale = tb.norm().double_value(&[]);
        assert!(
            err <= rel * scale,
            "{what}: {na}: ‖Δ‖ {err:e} vs ‖g‖ {scale:e} (limit {rel:e} relative)"
        );
        if scale > 0.0 {
            worst = worst.max(err / scale);
        }
    }
    eprintln!("{what}: worst relative gradient difference {worst:e}");
}
