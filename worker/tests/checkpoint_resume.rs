//! Checkpoint round trip, exact resume, and incomplete checkpoints never being loaded.

mod common;

use ferroclip_proto::config::RunConfig;
use ferroclip_shards::StoreOptions;
use ferroclip_worker::checkpoint::{self, TrainerState};
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::Trainer;
use tch::{Device, Kind, Tensor};

fn config() -> RunConfig {
    let mut c = common::tiny_config();
    c.objectives.mlm = 0.5;
    c.objectives.mae = 0.5;
    c.objectives.patch_dropout = 0.25;
    c.optim.lr = 1e-3;
    c.optim.warmup_steps = 2;
    c
}

/// The batch of step `s`: a pure function of s.
fn batch(s: u64) -> (Tensor, Tensor) {
    tch::manual_seed(1000 + s as i64);
    let images = Tensor::randn([6, 3, 16, 16], (Kind::Float, Device::Cpu));
    let words = Tensor::randint_low(1, 298, [6, 8], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(8, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let t = words.where_self(&pos.ne(0), &Tensor::full_like(&words, 298));
    let t = t.where_self(&pos.ne(6), &Tensor::full_like(&t, 299));
    (images, t.where_self(&pos.lt(7), &Tensor::zeros_like(&t)))
}

fn step(tr: &mut Trainer) -> f64 {
    let (images, tokens) = batch(tr.step());
    let l = tr
        .compute_grads_tensors(&images, &tokens, 6, &mut Single)
        .expect("grads");
    tr.apply_update().expect("update");
    l.total
}

fn state(tr: &Trainer, cfg: &RunConfig) -> TrainerState {
    TrainerState {
        step: tr.step(),
        epoch: 0,
        seed: cfg.run.seed,
        model: tr.model.config.clone(),
        config: cfg.to_toml(),
        data: None,
    }
}

fn opts() -> StoreOptions {
    StoreOptions::default()
}

fn url(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn resume_gives_the_same_next_five_losses() {
    let cfg = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Trainer::new(&cfg, 20).expect("trainer");
    for _ in 0..3 {
        step(&mut a);
    }
    let path = checkpoint::save(&url(dir.path()), &opts(), &a, &state(&a, &cfg), 2).expect("save");
    // For worker/tests/data/check_openclip_load.py (manual interop check with open_clip).
    if let Ok(keep) = std::env::var("FERROCLIP_KEEP_CHECKPOINT") {
        checkpoint::save(&keep, &opts(), &a, &state(&a, &cfg), 1).expect("save copy");
    }
    let uninterrupted: Vec<f64> = (0..5).map(|_| step(&mut a)).collect();

    // A fresh process: different init seed, then the checkpoint.
    let mut other = cfg.clone();
    other.run.seed = 99;
    let mut b = Trainer::new(&other, 20).expect("trainer");
    let st = checkpoint::load(&path, &opts(), &mut b).expect("load");
    assert_eq!(st.step, 3);
    // The mask RNG follows the run's seed, which the state carries.
    let mut b2 = Trainer::new(&cfg, 20).expect("trainer");
    checkpoint::load(&path, &opts(), &mut b2).expect("load");
    let resumed: Vec<f64> = (0..5).map(|_| step(&mut b2)).collect();
    for (x, y) in uninterrupted.iter().zip(&resumed) {
        assert!(
            (x - y).abs() < 1e-5,
            "uninterrupted {uninterrupted:?} vs resumed {resumed:?}"
        );
    }
    // Round trip: parameters and moments equal after loading.
    for (x, y) in a.state_tensors().iter().zip(b2.state_tensors()) {
        assert!(x.equal(&y));
    }
}

#[test]
fn an_interrupted_checkpoint_is_never_loaded_and_old_ones_are_pruned() {
    let cfg = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tr = Trainer::new(&cfg, 20).expect("trainer");
    for _ in 0..3 {
        step(&mut tr);
        checkpoint::save(&url(dir.path()), &opts(), &tr, &state(&tr, &cfg), 2).expect("save");
    }
    let steps: Vec<u64> = checkpoint::committed(&url(dir.path()), &opts())
        .expect("list")
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![2, 3]);
    // A writer that died after the rename but before COMMIT, with a torn file.
    let torn = dir.path().join("step-00000009");
    std::fs::create_dir_all(&torn).expect("mkdir");
    std::fs::write(torn.join("trainer.json"), b"{\"step\": 9").expect("write");
    std::fs::write(torn.join("model.safetensors"), b"half").expect("write");
    // And one that died in its temporary directory.
    std::fs::create_dir_all(dir.path().join(".tmp-step-00000010-1")).expect("mkdir");
    let latest = checkpoint::latest(&url(dir.path()), &opts())
        .expect("latest")
        .expect("one");
    assert!(latest.ends_with("step-00000003"), "{latest}");
    let err = checkpoint::load(&url(&torn), &opts(), &mut tr)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("COMMIT") && err.contains("step-00000009"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_of_another_shape_is_refused() {
    let cfg = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let tr = Trainer::new(&cfg, 20).expect("trainer");
    let path =
        checkpoint::save(&url(dir.path()), &opts(), &tr, &state(&tr, &cfg), 0).expect("save");
    let mut other = cfg.clone();
    other.model.text_layers = Some(1);
    let mut small = Trainer::new(&other, 20).expect("trainer");
    let err = checkpoint::load(&path, &opts(), &mut small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model shape"), "{err}");
}
