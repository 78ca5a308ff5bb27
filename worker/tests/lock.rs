//! LiT locking (`model.lock_image`, `model.lock_text`, their unlocked groups): locked parameters
//! stay bit-identical through training, the others train, and the gradient all-reduce carries
//! only the trainable ones.

mod common;

use common::{global_batch, on_ring, tiny_config, RNG};
use ferroclip_proto::config::{RunConfig, Switch};
use ferroclip_worker::collective::ring::RingOptions;
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::Trainer;
use tch::{Kind, Tensor};

fn trainer(cfg: &RunConfig) -> Trainer {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    Trainer::with_kind(cfg, 10, Kind::Float).expect("trainer")
}

fn snapshot(t: &Trainer) -> Vec<(String, Tensor)> {
    t.model
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy()))
        .collect()
}

/// Every objective on, so the locked towers are reached by MLM/MAE/FLIP too.
fn config() -> RunConfig {
    let mut c = tiny_config();
    c.optim.lr = 1e-2;
    c.optim.warmup_steps = 1;
    let o = &mut c.objectives;
    (o.contrastive, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.25);
    c
}

/// Trains 3 steps on one process; returns (name, bit-identical to its initial value).
fn unchanged_after_training(cfg: &RunConfig) -> Vec<(String, bool)> {
    let mut t = trainer(cfg);
    let before = snapshot(&t);
    for s in 0..3 {
        let (img, tok) = global_batch(s, Kind::Float);
        t.compute_grads_tensors(&img, &tok, 16, &mut Single)
            .expect("grads");
        t.apply_update().expect("update");
    }
    before
        .iter()
        .zip(snapshot(&t))
        .map(|((n, a), (_, b))| (n.clone(), a.equal(&b)))
        .collect()
}

#[test]
fn a_locked_image_tower_stays_bit_identical_while_the_rest_trains() {
    let mut cfg = config();
    cfg.model.lock_image = true;
    for (name, same) in unchanged_after_training(&cfg) {
        // MAE's decoder is not part of the image tower: it trains on the frozen encoder.
        assert_eq!(same, name.starts_with("visual."), "{name}");
    }
}

#[test]
fn unlocked_groups_of_a_locked_text_tower_train() {
    let mut cfg = config();
    cfg.model.lock_text = true;
    cfg.model.lock_text_unlocked_groups = 2; // the last block + ln_final, and the projection
    let text = |n: &str| !n.starts_with("visual.") && !n.starts_with("m") && n != "logit_scale";
    for (name, same) in unchanged_after_training(&cfg) {
        let unlocked = name.starts_with("transformer.resblocks.1.")
            || name.starts_with("ln_final.")
            || name == "text_projection";
        assert_eq!(same, text(&name) && !unlocked, "{name}");
    }
}

/// ITM as a re-ranker on trained towers (bench/README-itm.md, "ITM on locked towers"): both
/// towers locked and the contrastive weight 0, only the fusion encoder and the ITM head train;
/// the dual encoder (towers, projections, logit scale) stays bit-identical, so its recall is the
/// one re-ranking is compared with.
#[test]
fn itm_on_locked_towers_trains_the_fusion_encoder_alone() {
    let mut cfg = tiny_config();
    cfg.optim.lr = 1e-2;
    cfg.optim.warmup_steps = 1;
    cfg.model.fusion_layers = Some(1);
    (cfg.model.lock_image, cfg.model.lock_text) = (true, true);
    (cfg.objectives.contrastive, cfg.objectives.itm) = (0.0, 1.0);
    let mut trained = 0;
    for (name, same) in unchanged_after_training(&cfg) {
        let fusion = name.starts_with("fusion.") || name.starts_with("itm_head.");
        assert_eq!(same, !fusion, "{name}");
        trained += usize::from(fusion);
    }
    assert!(trained > 10, "{trained} fusion tensors");
}

/// The elements the plain all-reduce sends per step on 2 ranks (rank 0's buckets; rank 1 must
/// send the same).
fn allreduce_elements(cfg: &RunConfig) -> usize {
    let sizes = on_ring(2, RingOptions::default(), |rank, ring| {
        let mut t = trainer(cfg);
        let (img, tok) = global_batch(0, Kind::Float);
        let (img, tok) = (
            img.narrow(0, 8 * rank as i64, 8),
            tok.narrow(0, 8 * rank as i64, 8),
        );
        t.compute_grads_tensors(&img, &tok, 16, ring)
            .expect("grads");
        t.apply_update().expect("update");
        t.bucket_sizes()
            .expect("buckets laid out")
            .iter()
            .sum::<usize>()
    });
    assert_eq!(sizes[0], sizes[1]);
    sizes[0]
}

#[test]
fn the_all_reduce_carries_only_the_trainable_parameters() {
    let mut cfg = config();
    cfg.cluster.overlap_allreduce = Switch::Off;
    cfg.cluster.bucket_mb = 0.05;
    let model = trainer(&cfg).model;
    let numel = |f: &dyn Fn(&str) -> bool| -> usize {
        model
            .params
            .iter()
            .filter(|(n, _)| f(n))
            .map(|(_, p)| p.numel())
            .sum()
    };
    let all = numel(&|_| true);
    let visual = numel(&|n| n.starts_with("visual."));
    assert_eq!(allreduce_elements(&cfg), all);
    cfg.model.lock_image = true;
    let locked = allreduce_elements(&cfg);
    eprintln!(
        "all-reduce per step: {} bytes unlocked, {} bytes with lock_image",
        4 * all,
        4 * locked
    );
    assert_eq!(locked, all - visual);
}
