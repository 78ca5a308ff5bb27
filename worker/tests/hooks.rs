//! The C++ grad-hook shim and the overlapped all-reduce on CPU tensors: hooks fire once per
//! parameter with a grad, buckets are laid out as `GradBuckets` lays them out, and over the TCP
//! ring the overlapped path gives bit-identical gradients to the plain one.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferroclip_worker::collective::ring::{RingCollective, RingOptions};
use ferroclip_worker::collective::{Collective, GradBuckets, Single};
use ferroclip_worker::overlap::hooks::GradHooks;
use ferroclip_worker::overlap::OverlappedReducer;
use tch::{Kind, Tensor};

/// Deterministic values (no global RNG: ranks are threads of one process).
fn det(shape: &[i64], salt: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618 + salt).sin() * 0.2) as f32)
        .collect();
    Tensor::from_slice(&v).view(shape)
}

/// An MLP `widths[0] → … → widths[last]`, as [w0, b0, w1, b1, …], plus one parameter the
/// loss never uses and one that does not require grad.
fn mlp(widths: &[i64]) -> Vec<Tensor> {
    let mut p = Vec::new();
    for (l, w) in widths.windows(2).enumerate() {
        p.push(det(&[w[1], w[0]], l as f64).set_requires_grad(true));
        p.push(det(&[w[1]], 10.0 + l as f64).set_requires_grad(true));
    }
    p.push(det(&[8], 99.0).set_requires_grad(true));
    p.push(det(&[4], 98.0));
    p
}

fn loss(p: &[Tensor], layers: usize, x: &Tensor) -> Tensor {
    let mut h = x.shallow_clone();
    for l in 0..layers {
        h = h.matmul(&p[2 * l].tr()) + &p[2 * l + 1];
        if l + 1 < layers {
            h = h.tanh();
        }
    }
    h.square().mean(Kind::Float)
}

fn grads(p: &[Tensor]) -> Vec<Option<Tensor>> {
    p.iter()
        .map(|t| {
            let g = t.grad();
            g.defined().then(|| g.copy())
        })
        .collect()
}

fn zero_grads(p: &[Tensor]) {
    for t in p {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

#[test]
fn hooks_fire_once_per_grad_in_backward_order_and_stop_when_dropped() {
    let p = mlp(&[32, 64, 16]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let hooks = GradHooks::new(&p, move |i| s.lock().expect("lock").push(i)).expect("hooks");
    assert_eq!(
        hooks.hooked(),
        vec![0, 1, 2, 3, 4],
        "no hook on a tensor without grad"
    );
    let x = det(&[5, 32], 3.0);
    loss(&p, 2, &x).backward();
    let got = seen.lock().expect("lock").clone();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![0, 1, 2, 3],
        "unused parameter 4 has no grad, no call"
    );
    let pos = |i| got.iter().position(|&x| x == i).expect("fired");
    assert!(
        pos(2) < pos(0) && pos(3) < pos(0),
        "last layer first: {got:?}"
    );
    // The grad is final when the hook runs: a second backward calls again, once each.
    loss(&p, 2, &x).backward();
    assert_eq!(seen.lock().expect("lock").len(), 8);
    drop(hooks);
    loss(&p, 2, &x).backward();
    assert_eq!(
        seen.lock().expect("lock").len(),
        8,
        "dropped hooks do not fire"
    );
    // A non-leaf cannot take one.
    let nonleaf = &p[0] * 2.0;
    let e = GradHooks::new(&[nonleaf], |_| {})
        .err()
        .expect("non-leaf refused");
    assert!(e.to_string().contains("leaf"), "{e}");
}

#[test]
fn buckets_match_grad_buckets_and_every_bucket_is_reduced_once() {
    let p = mlp(&[32, 64, 64, 16]);
    let bucket_bytes = 4 * 2500;
    let red = OverlappedReducer::new(&p, bucket_bytes).expect("reducer");
    let plain = GradBuckets::new(&p, bucket_bytes).expect("buckets");
    assert_eq!(red.bucket_sizes(), plain.bucket_sizes());
    assert!(red.bucket_sizes().len() >= 3, "{:?}", red.bucket_sizes());
    let x = det(&[7, 32], 1.0);
    // Reference grads from a plain backward.
    loss(&p, 3, &x).backward();
    let want = grads(&p);
    let fresh = mlp(&[32, 64, 64, 16]);
    let mut red2 = OverlappedReducer::new(&fresh, bucket_bytes).expect("reducer");
    for step in 0..2 {
        zero_grads(&fresh);
        let st = red2
            .backward(&loss(&fresh, 3, &x), &mut Single)
            .expect("overlapped backward");
        assert_eq!(st.fired, 6, "step {step}: six used parameters");
        // The unused parameter (index 6) is first in bucket order: that bucket waits for the flush.
        assert_eq!(st.flushed, vec![0], "step {step}");
        let mut all: Vec<usize> = st.ready_during_backward.clone();
        all.extend(&st.flushed);
        all.sort();
        assert_eq!(all, (0..red2.bucket_sizes().len()).collect::<Vec<_>>());
        let got = grads(&fresh);
        for i in 0..6 {
            let (a, b) = (
                want[i].as_ref().expect("grad"),
                got[i].as_ref().expect("grad"),
            );
            assert!(a.equal(b), "step {step} param {i}");
        }
        let unused = got[6].as_ref().expect("materialised grad");
        assert_eq!(unused.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(got[7].is_none(), "no grad for the frozen tensor");
    }
    drop(red);
}

fn two_ranks<T: Send>(f: impl Fn(usize, &mut RingCollective) -> T + Sync) -> Vec<T> {
    common::on_ring(2, RingOptions::default(), f)
}

/// Per rank: (overlapped grads, plain grads, overlapped seconds, plain seconds).
type RankResult = (Vec<Option<Tensor>>, Vec<Option<Tensor>>, f64, f64);

fn compare(widths: &[i64], batch: i64, bucket_bytes: usize, reps: usize) -> Vec<RankResult> {
    let layers = widths.len() - 1;
    two_ranks(|rank, ring: &mut RingCollective| {
        let p = mlp(widths);
        let x = det(&[batch, widths[0]], 7.0 + rank as f64);
        let mut red = OverlappedReducer::new(&p, bucket_bytes).expect("reducer");
        let mut plain = GradBuckets::new(&p, bucket_bytes).expect("buckets");
        let (mut t_over, mut t_plain) = (0.0, 0.0);
        let (mut over, mut base) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            zero_grads(&p);
            let t = Instant::now();
            red.backward(&loss(&p, layers, &x), ring)
                .expect("overlapped");
            t_over += t.elapsed().as_secs_f64();
            over = grads(&p);
            ring.barrier().expect("barrier");
            zero_grads(&p);
            let t = Instant::now();
            loss(&p, layers, &x).backward();
            plain.all_reduce_grads(ring).expect("plain");
            t_plain += t.elapsed().as_secs_f64();
            base = grads(&p);
            ring.barrier().expect("barrier");
        }
        (over, base, t_over / reps as f64, t_plain / reps as f64)
    })
}

#[test]
fn overlapped_over_tcp_ring_equals_plain_path() {
    let r = compare(&[32, 64, 64, 64, 16], 9, 4 * 3000, 2);
    for (rank, (over, base, _, _)) in r.iter().enumerate() {
        assert_eq!(over.len(), base.len());
        for (i, (a, b)) in over.iter().zip(base).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => assert!(a.equal(b), "rank {rank} param {i}"),
                (None, None) => {}
                _ => panic!("rank {rank} param {i}: grad on one path only"),
            }
        }
    }
    // Both ranks hold the global sum.
    for (a, b) in r[0].0.iter().zip(&r[1].0) {
        if let (Some(a), Some(b)) = (a, b) {
            assert!(a.equal(b));
        }
    }
    // The sum differs from each rank's own grad (the inputs differ): the ring did sum.
    let single = {
        let p = mlp(&[32, 64, 64, 64, 16]);
        loss(&p, 4, &det(&[9, 32], 7.0)).backward();
        p[0].grad().copy()
    };
    assert!(!single.equal(r[0].0[0].as_ref().expect("grad")));
}
