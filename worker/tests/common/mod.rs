//! Helpers shared by the worker's integration tests: the tiny model every exactness test
//! trains, torch's generator lock, and rank threads joined by a real TCP ring.
#![allow(dead_code)] // each test binary uses its own subset

pub mod s3;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use ferroclip_proto::config::RunConfig;
use ferroclip_worker::collective::ring::{RingCollective, RingOptions};
use tch::{Device, Kind, Tensor};

/// A two-layer ViT on 16×16 images (4×4 patches) and a two-layer text tower over 8 tokens of a
/// 300-word vocabulary, with a one-layer MAE decoder: every code path, in milliseconds.
pub fn tiny_config() -> RunConfig {
    let mut c = RunConfig::default();
    let m = &mut c.model;
    m.preset = "custom".into();
    (m.embed_dim, m.image_size, m.patch_size) = (Some(16), Some(16), Some(4));
    (m.vision_width, m.vision_layers, m.vision_heads) = (Some(32), Some(2), Some(2));
    (m.context_length, m.vocab_size) = (Some(8), Some(300));
    (m.text_width, m.text_layers, m.text_heads) = (Some(32), Some(2), Some(2));
    (m.decoder_width, m.decoder_layers, m.decoder_heads) = (Some(16), Some(1), Some(2));
    c
}

/// Step `s`'s 16 samples for `tiny_config`'s model: random images, token rows
/// "sot w.. eot 0..".
pub fn global_batch(s: i64, kind: Kind) -> (Tensor, Tensor) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(100 + s);
    let images = Tensor::randn([16, 3, 16, 16], (Kind::Float, Device::Cpu)).to_kind(kind);
    let words = Tensor::randint_low(1, 298, [16, 8], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(8, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let t = words.where_self(&pos.ne(0), &Tensor::full_like(&words, 298));
    let t = t.where_self(&pos.ne(6), &Tensor::full_like(&t, 299));
    let t = t.where_self(&pos.lt(7), &Tensor::zeros_like(&t));
    (images, t)
}

/// torch's generator is global: rank threads seeding and drawing at once would interleave.
pub static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `n` listeners on loopback ports and their addresses (the ring's peer list).
pub fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    (listeners, peers)
}

/// Runs `f(rank, ring)` on `world` threads joined by a real TCP ring over loopback; returns the
/// results in rank order.
pub fn on_ring<T: Send>(
    world: usize,
    opts: RingOptions,
    f: impl Fn(usize, &mut RingCollective) -> T + Sync,
) -> Vec<T> {
    let (listeners, peers) = listeners(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, opts, f) = (peers.clone(), opts.clone(), &f);
                scope.spawn(move || {
                    let mut ring =
                        RingCollective::connect(rank, &peers, listener, opts).expect("ring");
                    f(rank, &mut ring)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// `ferroclip-worker embed ARGS`.
pub fn embed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferroclip-worker"))
        .arg("embed")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run embed")
}

/// Asserts the command succeeded, showing its output if not.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A NumPy v1 float32 C-order 2-D file → (rows, dim, values).
pub fn read_npy(path: &Path) -> (usize, usize, Vec<f32>) {
    let b = std::fs::read(path).expect("read npy");
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "header padded to 64 bytes");
    let header = std::str::from_utf8(&b[10..10 + hlen]).expect("ascii header");
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let dims: Vec<usize> = shape
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let values: Vec<f32> = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(values.len(), dims[0] * dims[1]);
    (dims[0], dims[1], values)
}
