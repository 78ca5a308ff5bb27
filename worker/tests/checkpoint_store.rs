//! Checkpoints at object-store URLs: a real S3-compatible server (s3s-fs on 127.0.0.1, started
//! per test), plain paths and file:// URLs. Round trip and exact resume, pruning, and a
//! checkpoint without COMMIT (or with a file that does not match COMMIT) never being loaded.

mod common;

use std::process::Command;

use common::s3::{credentials, S3Server, BUCKET};
use ferroclip_plan::DataState;
use ferroclip_proto::config::RunConfig;
use ferroclip_shards::store::Location;
use ferroclip_shards::StoreOptions;
use ferroclip_worker::checkpoint::{self, TrainerState};
use ferroclip_worker::collective::Single;
use ferroclip_worker::train::Trainer;
use object_store::{ObjectStoreExt, PutPayload};
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
    tch::manual_seed(2000 + s as i64);
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
        epoch: 1,
        seed: cfg.run.seed,
        model: tr.model.config.clone(),
        config: cfg.to_toml(),
        data: Some(DataState {
            epoch: 1,
            consumed: tr.step() * 6,
            ..DataState::default()
        }),
    }
}

fn steps_of(list: &[(u64, String)]) -> Vec<u64> {
    list.iter().map(|c| c.0).collect()
}

/// Save after each of 3 steps (keep 2), then resume from the newest in a fresh trainer: the
/// next five losses and the final state equal the uninterrupted run's.
fn round_trip(root: &str, opts: &StoreOptions) {
    let cfg = config();
    let mut a = Trainer::new(&cfg, 20).expect("trainer");
    for _ in 0..3 {
        step(&mut a);
        checkpoint::save(root, opts, &a, &state(&a, &cfg), 2).expect("save");
    }
    let committed = checkpoint::committed(root, opts).expect("list");
    assert_eq!(steps_of(&committed), vec![2, 3], "{committed:?}");
    let latest = checkpoint::latest(root, opts)
        .expect("latest")
        .expect("one");
    assert!(latest.ends_with("/step-00000003"), "{latest}");
    assert_eq!(checkpoint::resolve(root, opts).expect("resolve"), latest);
    assert_eq!(checkpoint::resolve(&latest, opts).expect("resolve"), latest);
    let uninterrupted: Vec<f64> = (0..5).map(|_| step(&mut a)).collect();

    // Different parameters before loading: everything must come from the checkpoint.
    let mut b = Trainer::new(&cfg, 20).expect("trainer");
    for (_, p) in b.model.params.iter() {
        let _ = p.detach().fill_(0.5);
    }
    let st = checkpoint::load(&latest, opts, &mut b).expect("load");
    assert_eq!((st.step, st.epoch), (3, 1));
    assert_eq!(
        st.data.map(|d| d.consumed),
        Some(18),
        "the data position round-trips"
    );
    assert_eq!(b.step(), 3);
    let resumed: Vec<f64> = (0..5).map(|_| step(&mut b)).collect();
    for (x, y) in uninterrupted.iter().zip(&resumed) {
        assert!(
            (x - y).abs() < 1e-5,
            "uninterrupted {uninterrupted:?} vs resumed {resumed:?}"
        );
    }
    for (x, y) in a.state_tensors().iter().zip(b.state_tensors()) {
        assert!(x.equal(&y));
    }
}

/// A writer that died before COMMIT (files of step 9, one torn) and a committed checkpoint
/// whose file was later truncated: neither is ever loaded; the newest good one is chosen.
fn torn_checkpoints_are_ignored(root: &str, opts: &StoreOptions) {
    let cfg = config();
    let mut tr = Trainer::new(&cfg, 20).expect("trainer");
    step(&mut tr);
    checkpoint::save(root, opts, &tr, &state(&tr, &cfg), 0).expect("save");
    step(&mut tr);
    let good = checkpoint::save(root, opts, &tr, &state(&tr, &cfg), 0).expect("save");

    let base = Location::open(root, opts).expect("open");
    let put = |rel: &str, bytes: &[u8]| {
        let loc = base.join(rel);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(loc.store.put(&loc.path, PutPayload::from(bytes.to_vec())))
            .expect("put");
    };
    put("step-00000009/trainer.json", b"{\"step\": 9");
    put("step-00000009/model.safetensors", b"half");
    let committed = checkpoint::committed(root, opts).expect("list");
    assert_eq!(steps_of(&committed), vec![1, 2]);
    assert_eq!(
        checkpoint::latest(root, opts).expect("latest").as_deref(),
        Some(good.as_str())
    );
    let torn = format!("{}/step-00000009", root.trim_end_matches('/'));
    let err = checkpoint::load(&torn, opts, &mut tr)
        .expect_err("a torn checkpoint must not load")
        .to_string();
    assert!(
        err.contains("COMMIT") && err.contains("step-00000009"),
        "{err}"
    );

    // Step 1's model file replaced after its COMMIT: the sizes no longer match.
    put(
        "step-00000001/model.safetensors",
        b"not the committed bytes",
    );
    let first = format!("{}/step-00000001", root.trim_end_matches('/'));
    let err = checkpoint::load(&first, opts, &mut tr)
        .expect_err("a mismatching file must not load")
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("COMMIT"),
        "{err}"
    );
    // The good one still loads.
    checkpoint::load(&good, opts, &mut tr).expect("load the committed one");
}

#[test]
fn s3_checkpoints_round_trip_and_resume_exactly() {
    credentials();
    let server = S3Server::start();
    round_trip(
        &format!("s3://{BUCKET}/runs/a/checkpoints"),
        &server.options(),
    );
}

#[test]
fn s3_checkpoints_without_commit_are_never_loaded() {
    credentials();
    let server = S3Server::start();
    let opts = server.options();
    let root = format!("s3://{BUCKET}/runs/b/checkpoints");
    torn_checkpoints_are_ignored(&root, &opts);
    // Nothing at all under a root: no checkpoint, and a clear error when one is asked for.
    let empty = format!("s3://{BUCKET}/runs/none");
    assert_eq!(checkpoint::latest(&empty, &opts).expect("latest"), None);
    assert!(checkpoint::resolve(&empty, &opts).is_err());
}

#[test]
fn s3_refuses_wrong_credentials() {
    credentials();
    let server = S3Server::start();
    // Another client process with the wrong secret: the bin's error names the store.
    let out = Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .args(["embed", "--checkpoint", &format!("s3://{BUCKET}/runs/x")])
        .args(["--texts", "/dev/null", "--out", "/tmp/never.npy"])
        .args(["--s3-endpoint", &server.endpoint, "--allow-http"])
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("s3://{BUCKET}/runs/x")), "{err}");
}

#[test]
fn local_paths_and_file_urls_interoperate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = StoreOptions::default();
    let plain = dir.path().join("plain").display().to_string();
    round_trip(&plain, &opts);
    torn_checkpoints_are_ignored(
        &format!("file://{}", dir.path().join("file").display()),
        &opts,
    );

    // A checkpoint written under a plain path loads through a file:// URL and vice versa.
    let cfg = config();
    let mut tr = Trainer::new(&cfg, 20).expect("trainer");
    step(&mut tr);
    let root = dir.path().join("mixed").display().to_string();
    let url = checkpoint::save(&root, &opts, &tr, &state(&tr, &cfg), 0).expect("save");
    let mut b = Trainer::new(&cfg, 20).expect("trainer");
    checkpoint::load(&format!("file://{url}"), &opts, &mut b)
        .expect("file:// load of a path checkpoint");
    step(&mut tr);
    let url = checkpoint::save(&format!("file://{root}"), &opts, &tr, &state(&tr, &cfg), 0)
        .expect("save");
    assert!(url.starts_with('/'), "{url}");
    let mut c = Trainer::new(&cfg, 20).expect("trainer");
    let st = checkpoint::load(&url, &opts, &mut c).expect("path load of a file:// checkpoint");
    assert_eq!(st.step, 2);
    for (x, y) in tr.state_tensors().iter().zip(c.state_tensors()) {
        assert!(x.equal(&y));
    }
}
