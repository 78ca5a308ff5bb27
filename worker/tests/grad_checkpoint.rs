//! Activation checkpointing (`model.grad_checkpointing`) changes memory, not mathematics: the
//! gradients equal the plain path's for every objective, with LiT locking, and combined with
//! GradCache micro-batches and the overlapped all-reduce the updates equal the plain one-pass
//! step's. In f64 (see dist_exact.rs for why): the recomputation runs the same kernels on the
//! same inputs, so a tight bound still means "the same function".

mod common;

use common::{global_batch, on_ring, tiny_config, RNG};
use ferroclip_proto::config::{RunConfig, Switch};
use ferroclip_worker::collective::ring::RingOptions;
use ferroclip_worker::collective::Single;
use ferroclip_worker::model::recomputed_blocks;
use ferroclip_worker::train::{StepLosses, Trainer};
use tch::{Kind, Tensor};

/// Relative bound on gradients and absolute bound on parameters (as dist_exact's `EXACT`).
const EXACT: f64 = 1e-9;

type Named = Vec<(String, Tensor)>;

/// Every objective on: InfoNCE and SigLIP over the global batch, MLM, MAE and FLIP's patch
/// dropout.
fn every_objective() -> RunConfig {
    let mut c = tiny_config();
    c.optim.lr = 2e-3;
    c.optim.warmup_steps = 1;
    c.cluster.bucket_mb = 0.05;
    let o = &mut c.objectives;
    (o.contrastive, o.siglip, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.5, 0.25);
    c
}

fn trainer(cfg: &RunConfig) -> Trainer {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    Trainer::with_kind(cfg, 10, Kind::Double).expect("trainer")
}

fn with_checkpointing(cfg: &RunConfig) -> RunConfig {
    let mut c = cfg.clone();
    c.model.grad_checkpointing = true;
    c
}

/// One step's losses and gradients (None where a parameter got none) on global batch 0.
fn one_step_grads(cfg: &RunConfig) -> (StepLosses, Vec<(String, Option<Tensor>)>) {
    let mut t = trainer(cfg);
    let (img, tok) = global_batch(0, Kind::Double);
    let losses = t
        .compute_grads_tensors(&img, &tok, 16, &mut Single)
        .expect("grads");
    let grads = t
        .model
        .params
        .iter()
        .map(|(n, p)| {
            let g = p.grad();
            (n.clone(), g.defined().then(|| g.copy()))
        })
        .collect();
    (losses, grads)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// Gradients equal within `EXACT` of each gradient's scale; the same parameters got one.
fn assert_same_grads(plain: &[(String, Option<Tensor>)], ckpt: &[(String, Option<Tensor>)]) {
    assert_eq!(plain.len(), ckpt.len());
    let mut worst = 0.0f64;
    for ((n, a), (m, b)) in plain.iter().zip(ckpt) {
        assert_eq!(n, m);
        match (a, b) {
            (Some(a), Some(b)) => {
                let d = max_abs(&(a - b));
                let scale = max_abs(a);
                assert!(
                    d <= EXACT * scale,
                    "gradient of {n} differs by {d:e} (max {scale:e})"
                );
                worst = worst.max(if scale > 0.0 { d / scale } else { d });
            }
            (None, None) => {}
            _ => panic!("{n}: gradient defined on one side only"),
        }
    }
    eprintln!("largest relative gradient difference {worst:e}");
}

fn assert_same_losses(a: &StepLosses, b: &StepLosses) {
    for (what, x, y) in [
        ("contrastive", a.contrastive, b.contrastive),
        ("siglip", a.siglip, b.siglip),
        ("mlm", a.mlm, b.mlm),
        ("mae", a.mae, b.mae),
        ("total", a.total, b.total),
    ] {
        assert!(
            (x - y).abs() <= EXACT * x.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    }
}

#[test]
fn checkpointed_gradients_equal_the_plain_ones_with_every_objective() {
    let cfg = every_objective();
    let (l_plain, g_plain) = one_step_grads(&cfg);
    let before = recomputed_blocks();
    let (l_ckpt, g_ckpt) = one_step_grads(&with_checkpointing(&cfg));
    // Vision (contrastive+SigLIP features, MAE's encoder) 2 + 2 blocks, text (features, MLM)
    // 2 + 2, the MAE decoder 1: each recomputed once in the one backward.
    let recomputed = recomputed_blocks() - before;
    assert!(
        recomputed >= 9,
        "only {recomputed} blocks recomputed: checkpointing is off"
    );
    assert_same_losses(&l_plain, &l_ckpt);
    assert_same_grads(&g_plain, &g_ckpt);
    // The test can fail: every tower and head got a nonzero gradient.
    for part in [
        "visual.transformer",
        "transformer.resblocks",
        "mlm.",
        "mae.decoder.",
    ] {
        let moved = g_ckpt
            .iter()
            .filter(|(n, _)| n.starts_with(part))
            .filter_map(|(_, g)| g.as_ref().map(max_abs))
            .fold(0.0, f64::max);
        assert!(moved > 0.0, "no gradient reached {part}");
    }
}

#[test]
fn checkpointed_gradients_equal_the_plain_ones_with_lit_locking() {
    // A locked image tower except its last group, and a fully locked text tower: blocks whose
    // parameters need no grad under inputs that do not either, and the reverse.
    let mut cfg = every_objective();
    cfg.objectives.siglip = 0.0;
    cfg.model.lock_image = true;
    cfg.model.lock_image_unlocked_groups = 2; // the last block + ln_post, and the projection
    cfg.model.lock_text = true;
    let (l_plain, g_plain) = one_step_grads(&cfg);
    let (l_ckpt, g_ckpt) = one_step_grads(&with_checkpointing(&cfg));
    assert_same_losses(&l_plain, &l_ckpt);
    assert_same_grads(&g_plain, &g_ckpt);
    let has = |name: &str| {
        g_ckpt
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, g)| g.as_ref())
            .is_some()
    };
    assert!(has("visual.transformer.resblocks.1.attn.in_proj_weight"));
    assert!(!has("visual.transformer.resblocks.0.attn.in_proj_weight"));
    assert!(!has("transformer.resblocks.1.attn.in_proj_weight"));
}

fn params(t: &Trainer) -> Named {
    t.model
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy()))
        .collect()
}

/// One process, the whole batch, 3 updates.
fn single(cfg: &RunConfig) -> Named {
    let mut t = trainer(cfg);
    for s in 0..3 {
        let (img, tok) = global_batch(s, Kind::Double);
        t.compute_grads_tensors(&img, &tok, 16, &mut Single)
            .expect("grads");
        t.apply_update().expect("update");
    }
    params(&t)
}

/// Two ranks of 8 over the TCP ring, 3 updates.
fn two_ranks(cfg: &RunConfig) -> Vec<Named> {
    on_ring(2, RingOptions::default(), |rank, ring| {
        let mut t = trainer(cfg);
        for s in 0..3 {
            let (img, tok) = global_batch(s, Kind::Double);
            let from = 8 * rank as i64;
            let (img, tok) = (img.narrow(0, from, 8), tok.narrow(0, from, 8));
            t.compute_grads_tensors(&img, &tok, 16, ring)
                .expect("grads");
            t.apply_update().expect("update");
        }
        params(&t)
    })
}

fn assert_close(a: &Named, b: &Named, what: &str) {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = max_abs(&(ta - tb));
        assert!(d <= EXACT, "{what}: {na} differs by {d:e}");
        worst = worst.max(d);
    }
    eprintln!("{what}: largest parameter difference {worst:e}");
}

#[test]
fn checkpointing_with_micro_batches_updates_as_the_plain_one_pass_step() {
    let cfg = every_objective();
    let reference = single(&cfg);
    let mut ckpt = with_checkpointing(&cfg);
    ckpt.optim.micro_batch = 3; // 3+3+3+3+3+1 rows
    let before = recomputed_blocks();
    let accumulated = single(&ckpt);
    assert!(recomputed_blocks() > before, "checkpointing is off");
    assert_close(
        &accumulated,
        &reference,
        "checkpointing + micro-batches of 3 vs one pass",
    );
    // The test can fail: three updates moved the parameters far beyond the bound.
    let init = params(&trainer(&cfg));
    let moved = init
        .iter()
        .zip(&reference)
        .map(|((_, a), (_, b))| max_abs(&(a - b)))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "no parameter moved ({moved:e})");
}

#[test]
fn checkpointing_with_the_overlapped_all_reduce_updates_as_the_plain_step() {
    // The overlap hooks fire when a parameter's gradient is accumulated: with checkpointing
    // that happens once per backward too (the recomputation's gradients come back through the
    // autograd Function), so the buckets go out complete. Two ranks, with and without
    // micro-batches, against one plain process.
    let cfg = every_objective();
    let reference = single(&cfg);
    let mut ckpt = with_checkpointing(&cfg);
    ckpt.cluster.overlap_allreduce = Switch::On;
    let ranks = two_ranks(&ckpt);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(
        &ranks[0],
        &reference,
        "2×8 checkpointed, overlapped vs 1×16 plain",
    );
    ckpt.optim.micro_batch = 2;
    let ranks = two_ranks(&ckpt);
    assert_close(&ranks[0], &reference, "2×(4×2) checkpointed vs 1×16 plain");
}
