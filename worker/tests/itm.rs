//! ITM's hard-negative sampler: each row's negative is drawn from the softmax of its similarities
//! to the global batch with its own pair excluded, from the row's RNG (run seed, step, global row
//! index), so the picks are the same whichever rank holds the row; a column holding the same
//! caption as the row (the row's own included) is a match, never drawn as a negative.

use ferroclip_worker::train::itm::{
    caption_keys, hard_negatives, sample_hard_negative, sample_hard_negative_among, STREAM,
};
use ferroclip_worker::train::row_rng;
use rand::rngs::StdRng;
use tch::{Device, Kind, Tensor};

/// 16 distinct captions.
fn distinct() -> Vec<Vec<i64>> {
    (0..16).map(|j| vec![49406, 100 + j, 49407]).collect()
}

fn rngs(seed: u64, step: u64, rows: std::ops::Range<i64>) -> Vec<StdRng> {
    rows.map(|r| row_rng(seed, step, 0, STREAM, r)).collect()
}

/// A 16 × 16 similarity matrix with a strong diagonal (as a trained model's): the own pair
/// would be picked almost always if it were not excluded.
fn sims(seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([16, 16], (Kind::Double, Device::Cpu)) * 2.0
        + Tensor::eye(16, (Kind::Double, Device::Cpu)) * 30.0
}

#[test]
fn never_the_positive_and_always_a_negative() {
    for step in 0..50 {
        let (i2t, t2i) = (sims(step), sims(1000 + step));
        let picks = hard_negatives(&i2t, &t2i, 0, &distinct(), &mut rngs(3, step as u64, 0..16))
            .expect("picks");
        for (row, (text, image)) in picks.into_iter().enumerate() {
            let (text, image) = (text.expect("a text"), image.expect("an image"));
            assert_ne!(
                text, row as i64,
                "step {step}: row {row} picked its own text"
            );
            assert_ne!(
                image, row as i64,
                "step {step}: row {row} picked its own image"
            );
            assert!((0..16).contains(&text) && (0..16).contains(&image));
        }
    }
    // A global batch of one has no negative.
    let mut rng = row_rng(0, 0, 0, STREAM, 0);
    assert_eq!(sample_hard_negative(&[5.0], 0, &mut rng), None);
}

#[test]
fn deterministic_and_the_same_for_one_rank_or_two() {
    let (i2t, t2i) = (sims(1), sims(2));
    let whole = hard_negatives(&i2t, &t2i, 0, &distinct(), &mut rngs(7, 11, 0..16)).expect("picks");
    let again = hard_negatives(&i2t, &t2i, 0, &distinct(), &mut rngs(7, 11, 0..16)).expect("picks");
    assert_eq!(whole, again);
    // Rank 0 holds rows 0..8, rank 1 rows 8..16 (and unevenly, 0..5 and 5..16).
    for split in [8, 5] {
        let mut halves = hard_negatives(
            &i2t.narrow(0, 0, split),
            &t2i.narrow(0, 0, split),
            0,
            &distinct(),
            &mut rngs(7, 11, 0..split),
        )
        .expect("rank 0");
        halves.extend(
            hard_negatives(
                &i2t.narrow(0, split, 16 - split),
                &t2i.narrow(0, split, 16 - split),
                split,
                &distinct(),
                &mut rngs(7, 11, split..16),
            )
            .expect("rank 1"),
        );
        assert_eq!(whole, halves, "split at {split}");
    }
    // Another step draws differently (the step is part of the seed).
    let other = hard_negatives(&i2t, &t2i, 0, &distinct(), &mut rngs(7, 12, 0..16)).expect("picks");
    assert_ne!(whole, other);
}

#[test]
fn duplicated_captions_are_never_drawn() {
    // Captions in groups: rows 0-5 one caption ("a red circle"), 6-9 another, 10-11 a third,
    // 12-15 each its own; the similarity matrix favours exactly the duplicates (as a trained
    // model's would: identical captions, near-identical features).
    let group = |j: i64| match j {
        0..=5 => 0,
        6..=9 => 1,
        10..=11 => 2,
        _ => j,
    };
    let captions: Vec<Vec<i64>> = (0..16)
        .map(|j| vec![49406, 300 + group(j), 49407])
        .collect();
    let same = Tensor::from_slice(
        &(0..256)
            .map(|k| f64::from(u8::from(group(k / 16) == group(k % 16))))
            .collect::<Vec<_>>(),
    )
    .view([16, 16]);
    for step in 0..50 {
        let (i2t, t2i) = (sims(step) + &same * 30.0, sims(1000 + step) + &same * 30.0);
        let picks = hard_negatives(&i2t, &t2i, 0, &captions, &mut rngs(3, step as u64, 0..16))
            .expect("picks");
        for (row, (text, image)) in picks.into_iter().enumerate() {
            let (text, image) = (text.expect("a text"), image.expect("an image"));
            let row = row as i64;
            assert_ne!(text, row, "step {step}: row {row} picked its own text");
            assert_ne!(image, row, "step {step}: row {row} picked its own image");
            assert_ne!(
                group(text),
                group(row),
                "step {step}: row {row} picked text {text}, its own caption"
            );
            assert_ne!(
                group(image),
                group(row),
                "step {step}: row {row} picked image {image}, whose caption is its own"
            );
        }
        // The same picks whichever rank holds the rows (rows 0..8 and 8..16).
        let whole = hard_negatives(&i2t, &t2i, 0, &captions, &mut rngs(3, step as u64, 0..16))
            .expect("picks");
        let mut halves = hard_negatives(
            &i2t.narrow(0, 0, 8),
            &t2i.narrow(0, 0, 8),
            0,
            &captions,
            &mut rngs(3, step as u64, 0..8),
        )
        .expect("rank 0");
        halves.extend(
            hard_negatives(
                &i2t.narrow(0, 8, 8),
                &t2i.narrow(0, 8, 8),
                8,
                &captions,
                &mut rngs(3, step as u64, 8..16),
            )
            .expect("rank 1"),
        );
        assert_eq!(whole, halves);
    }
    // Every caption the same: no negative at all, for any row.
    let one: Vec<Vec<i64>> = vec![vec![49406, 300, 49407]; 16];
    let picks = hard_negatives(&sims(1), &sims(2), 0, &one, &mut rngs(3, 0, 0..16)).expect("picks");
    assert!(picks.iter().all(|&p| p == (None, None)), "{picks:?}");
    // Among the allowed columns only; none allowed → none.
    let mut rng = row_rng(0, 0, 0, STREAM, 0);
    assert_eq!(
        sample_hard_negative_among(&[1.0, 9.0, 2.0], |j| j == 2, &mut rng),
        Some(2)
    );
    assert_eq!(
        sample_hard_negative_among(&[1.0, 9.0, 2.0], |_| false, &mut rng),
        None
    );
    // Caption keys stop at the end of text: what follows it (padding) does not count.
    let tokens = Tensor::from_slice(&[
        49406i64, 5, 49407, 0, 49406, 5, 49407, 7, 49406, 6, 49407, 0,
    ])
    .view([3, 4]);
    let keys = caption_keys(&tokens, &Tensor::from_slice(&[2i64, 2, 2])).expect("keys");
    assert_eq!(keys[0], keys[1]);
    assert_ne!(keys[0], keys[2]);
    assert_eq!(keys[0], vec![49406, 5, 49407]);
}

#[test]
fn frequencies_follow_the_softmax_of_the_similarities() {
    // Row 1 of a hand-built matrix: own column 1 (weight 0 whatever its score), the others
    // weighted e^s / Σ e^s: e^2, e^1, e^-1, e^0.5 → 0.5769, 0.2122, 0.0287, 0.1749 (and 0 for 1).
    let row = [2.0, 9.0, 1.0, -1.0, 0.5];
    let z: f64 = [2.0f64, 1.0, -1.0, 0.5].iter().map(|s| s.exp()).sum();
    let want: Vec<f64> = row
        .iter()
        .enumerate()
        .map(|(j, &s)| if j == 1 { 0.0 } else { f64::exp(s) / z })
        .collect();
    // One draw per (step, row) RNG, as training draws them: 40,000 draws, so each frequency's
    // standard deviation is at most sqrt(0.25 / 40000) = 0.0025; the tolerance is 5 of them.
    let n = 40_000u64;
    let mut counts = [0u64; 5];
    for step in 0..n {
        let mut rng = row_rng(42, step, 0, STREAM, 1);
        let j = sample_hard_negative(&row, 1, &mut rng).expect("a negative");
        counts[j] += 1;
    }
    assert_eq!(counts[1], 0, "the positive was never drawn");
    for j in 0..5 {
        let f = counts[j] as f64 / n as f64;
        assert!(
            (f - want[j]).abs() <= 0.0125,
            "column {j}: frequency {f:.4}, softmax weight {:.4}",
            want[j]
        );
    }
}

#[test]
fn fusion_presets_add_the_encoder_and_leave_the_others_unchanged() {
    use ferroclip_worker::model::{is_extra_key, Clip, Heads, ModelConfig};
    let base = ModelConfig::preset("ViT-B-16").expect("preset");
    assert_eq!(base.fusion_layers, 0);
    let fused = ModelConfig::preset("ViT-B-16-fusion").expect("preset");
    assert_eq!(fused.fusion_layers, 6);
    assert_eq!(
        ModelConfig {
            fusion_layers: 0,
            ..fused
        },
        base
    );
    assert_eq!(
        ModelConfig::preset("tiny-fusion")
            .expect("preset")
            .fusion_layers,
        2
    );
    assert!(ModelConfig::preset("ViT-B-99-fusion").is_err());
    // The new tensors are ferroclip's own keys, named as ARCHITECTURE.md documents.
    let mut c = ModelConfig::preset("tiny-fusion").expect("preset");
    c.fusion_layers = 1;
    let m = Clip::new(&c, Heads::default(), 0, Kind::Float).expect("model");
    let names: Vec<&str> = m
        .params
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| is_extra_key(n))
        .collect();
    for want in [
        "fusion.resblocks.0.attn.in_proj_weight",
        "fusion.resblocks.0.cross_attn.q_proj_weight",
        "fusion.resblocks.0.cross_attn.k_proj_weight",
        "fusion.resblocks.0.cross_attn.v_proj_weight",
        "fusion.resblocks.0.cross_attn.in_proj_bias",
        "fusion.resblocks.0.cross_attn.out_proj.weight",
        "fusion.resblocks.0.ln_cross.weight",
        "fusion.resblocks.0.mlp.c_proj.bias",
        "fusion.ln_final.weight",
        "itm_head.weight",
        "itm_head.bias",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(
        m.params
            .get("fusion.resblocks.0.cross_attn.k_proj_weight")
            .expect("k")
            .size(),
        [128, 128]
    );
    assert_eq!(
        m.params.get("itm_head.weight").expect("head").size(),
        [2, 128]
    );
    // Not counted as OpenCLIP's parameters.
    let plain = Clip::new(
        &ModelConfig::preset("tiny").expect("preset"),
        Heads::default(),
        0,
        Kind::Float,
    )
    .expect("model");
    assert_eq!(m.num_clip_params(), plain.num_clip_params());
}
