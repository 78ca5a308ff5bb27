//! Data-parallel exactness: 2 ranks × batch 8 over the real TCP ring must update the parameters
//! exactly as 1 process × batch 16 on the same samples (contrastive over the global batch with
//! gathered features and summed-back gradients, plus bucketed gradient all-reduce, overlapped
//! with backward by default).

use std::net::TcpListener;

use ferroclip_proto::config::RunConfig;
use ferroclip_worker::collective::ring::{RingCollective, RingOptions};
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::Trainer;
use tch::{Device, Kind, Tensor};

fn config() -> RunConfig {
    let mut c = RunConfig::default();
    let m = &mut c.model;
    m.preset = "custom".into();
    (m.embed_dim, m.image_size, m.patch_size) = (Some(16), Some(16), Some(4));
    (m.vision_width, m.vision_layers, m.vision_heads) = (Some(32), Some(2), Some(2));
    (m.context_length, m.vocab_size) = (Some(8), Some(300));
    (m.text_width, m.text_layers, m.text_heads) = (Some(32), Some(2), Some(2));
    (m.decoder_width, m.decoder_layers, m.decoder_heads) = (Some(16), Some(1), Some(2));
    c.optim.lr = 2e-3;
    c.optim.warmup_steps = 1;
    c.cluster.bucket_mb = 0.05; // several buckets even for this tiny model
    c
}

/// torch's generator is global: rank threads seeding and drawing at once would interleave.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A trainer built under the generator lock (model init draws from torch's global generator).
fn trainer(cfg: &RunConfig) -> Trainer {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    Trainer::new(cfg, 10).expect("trainer")
}

/// Step `s`'s 16 samples: random images, token rows "sot w.. eot 0..".
fn global_batch(s: i64) -> (Tensor, Tensor) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(100 + s);
    let images = Tensor::randn([16, 3, 16, 16], (Kind::Float, Device::Cpu));
    let words = Tensor::randint_low(1, 298, [16, 8], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(8, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let t = words.where_self(&pos.ne(0), &Tensor::full_like(&words, 298));
    let t = t.where_self(&pos.ne(6), &Tensor::full_like(&t, 299));
    let t = t.where_self(&pos.lt(7), &Tensor::zeros_like(&t));
    (images, t)
}

fn params(t: &Trainer) -> Vec<(String, Tensor)> {
    t.model
        .params
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy()))
        .collect()
}

fn single(cfg: &RunConfig, steps: i64) -> Vec<(String, Tensor)> {
    let mut t = trainer(cfg);
    for s in 0..steps {
        let (img, tok) = global_batch(s);
        t.compute_grads_tensors(&img, &tok, 16, &mut Single)
            .expect("grads");
        t.apply_update().expect("update");
    }
    params(&t)
}

fn two_ranks(cfg: &RunConfig, steps: i64) -> Vec<Vec<(String, Tensor)>> {
    two_ranks_split(cfg, steps, 8)
}

/// Rank 0 takes the first `split` samples of each step, rank 1 the rest.
fn two_ranks_split(cfg: &RunConfig, steps: i64, split: i64) -> Vec<Vec<(String, Tensor)>> {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                scope.spawn(move || {
                    let mut ring =
                        RingCollective::connect(rank, &peers, listener, RingOptions::default())
                            .expect("ring");
                    let mut t = trainer(cfg);
                    for s in 0..steps {
                        let (img, tok) = global_batch(s);
                        let (from, len) = if rank == 0 {
                            (0, split)
                        } else {
                            (split, 16 - split)
                        };
                        let (img, tok) = (img.narrow(0, from, len), tok.narrow(0, from, len));
                        t.compute_grads_tensors(&img, &tok, 16, &mut ring)
                            .expect("grads");
                        t.apply_update().expect("update");
                    }
                    params(&t)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn assert_close(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{what}: {na} differs by {diff}");
    }
}

#[test]
fn two_ranks_of_8_equal_one_process_of_16_contrastive() {
    let cfg = config();
    let reference = single(&cfg, 3);
    let ranks = two_ranks(&cfg, 3);
    assert_close(&ranks[0], &ranks[1], "rank 0 vs rank 1");
    assert_close(&ranks[0], &reference, "2×8 vs 1×16");
    // The test can fail: the parameters did move.
    let init = params(&trainer(&cfg));
    let moved = init
        .iter()
        .zip(&reference)
        .any(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]) > 1e-4);
    assert!(moved, "training did not change the parameters");
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
    let init = params(&trainer(&cfg));
    for name in ["mlm.", "mae."] {
        let moved = init.iter().zip(&reference).any(|((n, a), (_, b))| {
            n.contains(name) && (a - b).abs().max().double_value(&[]) > 1e-5
        });
        assert!(moved, "no {name} parameter moved");
    }
}

#[test]
fn overlapped_all_reduce_updates_exactly_as_the_plain_path() {
    // cluster.overlap_allreduce = "on" (the default on GPUs) all-reduces buckets during the model
    // backward; the plain path after it. Same buckets, same order: the same sums.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.mlm, o.mae, o.patch_dropout) = (1.0, 0.5, 0.5, 0.25);
    cfg.cluster.overlap_allreduce = "on".into();
    let overlapped = two_ranks(&cfg, 3);
    cfg.cluster.overlap_allreduce = "off".into();
    let plain = two_ranks(&cfg, 3);
    assert_close(&overlapped[0], &plain[0], "overlapped vs plain, rank 0");
    assert_close(&overlapped[1], &plain[1], "overlapped vs plain, rank 1");
}

#[test]
fn a_rank_with_no_samples_takes_part_and_changes_nothing() {
    // The last step of a run can leave a rank empty-handed: it must still join every collective.
    let mut cfg = config();
    let o = &mut cfg.objectives;
    (o.contrastive, o.mlm, o.mae) = (1.0, 0.5, 0.5);
    // The full rank overlaps its all-reduce with backward; the empty one has no backward and
    // takes the plain path: the two must still issue the same all-reduces.
    cfg.cluster.overlap_allreduce = "on".into();
    let reference = single(&cfg, 2);
    let ranks = two_ranks_split(&cfg, 2, 16);
    assert_close(&ranks[1], &ranks[0], "empty rank vs full rank");
    assert_close(&ranks[0], &reference, "16+0 vs 1×16");
}
