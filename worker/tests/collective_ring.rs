//! The TCP ring on real sockets (127.0.0.1), one thread per rank: results against locally
//! computed answers, for world sizes 1–5 and lengths that do not divide evenly.

mod common;

use std::net::TcpListener;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use ferroclip_worker::collective::{
    Collective, CollectiveError, GradBuckets, RingCollective, RingOptions, Transport, WireDtype,
};
use tch::{nn, nn::Module, Kind, Tensor};

fn opts(chunk_bytes: usize, dtype: WireDtype) -> RingOptions {
    RingOptions {
        timeout: Duration::from_secs(20),
        chunk_bytes,
        dtype,
        generation: 3,
        transport: Transport::Tcp,
        ..RingOptions::default()
    }
}

/// Run `f` on every rank of a fresh ring of `n` threads; results in rank order.
fn with_ring<T: Send>(
    n: usize,
    opts: RingOptions,
    f: impl Fn(&mut RingCollective) -> T + Sync,
) -> Vec<T> {
    common::on_ring(n, opts, |rank, ring| {
        assert_eq!((ring.rank(), ring.world_size()), (rank, n));
        f(ring)
    })
}

/// Integer-valued floats: sums are exact in any order.
fn int_data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
        .collect()
}

/// Sum over ranks of `int_data`.
fn int_sum(n: usize, len: usize) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for r in 0..n {
        for (s, v) in sum.iter_mut().zip(int_data(r, len)) {
            *s += v;
        }
    }
    sum
}

/// Equality that reports the first difference instead of printing whole vectors.
#[track_caller]
fn assert_same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: element {i} is {:?}, want {:?}", got[i], want[i]);
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

const LENGTHS: [usize; 7] = [0, 1, 3, 7, 1000, 16_411, 100_003];

#[test]
fn all_reduce_fp32_is_exact_for_world_sizes_1_to_5() {
    for n in 1..=5 {
        // 1 KiB chunks: many chunks per segment; the longest lengths use the sender thread.
        let got = with_ring(n, opts(1024, WireDtype::Fp32), |ring| {
            LENGTHS
                .iter()
                .map(|&len| {
                    let mut t = Tensor::from_slice(&int_data(ring.rank(), len));
                    ring.all_reduce_sum(&mut t).unwrap();
                    to_vec(&t)
                })
                .collect::<Vec<_>>()
        });
        for (k, &len) in LENGTHS.iter().enumerate() {
            let want = int_sum(n, len);
            for (rank, per_rank) in got.iter().enumerate() {
                assert_same(
                    &per_rank[k],
                    &want,
                    &format!("world {n}, rank {rank}, length {len}"),
                );
            }
        }
    }
}

#[test]
fn all_reduce_bf16_is_close_and_identical_on_every_rank() {
    let len = 50_001;
    let value = |rank: usize, i: usize| ((i as f32) * 0.37 + rank as f32).sin();
    for n in [2, 3, 5] {
        let got = with_ring(n, opts(8192, WireDtype::Bf16), |ring| {
            let data: Vec<f32> = (0..len).map(|i| value(ring.rank(), i)).collect();
            let mut t = Tensor::from_slice(&data).view([7, -1]);
            ring.all_reduce_sum(&mut t).unwrap();
            to_vec(&t)
        });
        // Each of the ≤ 2n roundings loses at most 2^-9 of a partial sum bounded by n.
        let tol = (2 * n * n) as f32 / 512.0;
        let mut worst = 0f32;
        for (i, g) in got[0].iter().enumerate() {
            let want: f32 = (0..n).map(|r| value(r, i)).sum();
            let err = (g - want).abs();
            worst = worst.max(err);
            assert!(err <= tol, "world {n}, element {i}: {g} vs {want}");
        }
        assert!(worst > 0.0, "bf16 on the wire should round something");
        for (rank, g) in got.iter().enumerate() {
            assert!(
                g.iter()
                    .zip(&got[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "world {n}: rank {rank} differs from rank 0"
            );
        }
    }
}

#[test]
fn all_reduce_f64_sums_in_rank_order_identically_on_every_rank() {
    // f64 (gradient checks, exactness tests) is summed from the gathered buffers in rank order:
    // every rank gets the same bits, and the sum is the rank-order sum computed locally.
    for n in [1usize, 2, 3, 5] {
        let len = 1003;
        let data = |r: usize| -> Vec<f64> {
            (0..len)
                .map(|i| ((i as f64 + 1.0) * 0.1 + r as f64 / 3.0).sin() * 1e3)
                .collect()
        };
        let got = with_ring(n, opts(4096, WireDtype::Fp32), |ring| {
            let mut t = Tensor::from_slice(&data(ring.rank())).view([17, 59]);
            ring.all_reduce_sum(&mut t).unwrap();
            assert_eq!(t.kind(), Kind::Double);
            Vec::<f64>::try_from(t.reshape([-1])).unwrap()
        });
        let mut want = data(0);
        for r in 1..n {
            for (w, v) in want.iter_mut().zip(data(r)) {
                *w += v;
            }
        }
        for (rank, g) in got.iter().enumerate() {
            assert_same(g, &want, &format!("world {n} rank {rank}"));
        }
    }
}

#[test]
fn all_reduce_handles_non_contiguous_tensors() {
    let got = with_ring(3, opts(256, WireDtype::Fp32), |ring| {
        let base = Tensor::from_slice(&int_data(ring.rank(), 40)).view([5, 8]);
        let mut t = base.transpose(0, 1); // a strided view
        ring.all_reduce_sum(&mut t).unwrap();
        (to_vec(&t), to_vec(&base))
    });
    let want = int_sum(3, 40);
    let want_t = to_vec(&Tensor::from_slice(&want).view([5, 8]).transpose(0, 1));
    for (t, base) in got {
        assert_eq!(t, want_t);
        assert_eq!(base, want, "the caller's storage holds the sum");
    }
}

#[test]
fn all_gather_concatenates_equal_and_unequal_lengths_in_rank_order() {
    // Rows per rank: equal, unequal with an empty rank, and large enough for the sender thread.
    let row_counts: [fn(usize) -> i64; 3] = [|_| 4, |r| ((r * 5) % 7) as i64, |r| 9_000 + r as i64];
    for n in 1..=5 {
        let got = with_ring(n, opts(4096, WireDtype::Fp32), |ring| {
            row_counts
                .iter()
                .map(|rows| {
                    let r = ring.rank();
                    let rows = rows(r);
                    let t = Tensor::arange(rows * 3, (Kind::Int64, tch::Device::Cpu))
                        .view([rows, 3])
                        + (r as i64) * 1_000_000;
                    let g = ring.all_gather(&t).unwrap();
                    assert_eq!(g.kind(), Kind::Int64);
                    (g.size(), Vec::<i64>::try_from(g.flatten(0, -1)).unwrap())
                })
                .collect::<Vec<_>>()
        });
        for (k, rows) in row_counts.iter().enumerate() {
            let mut want = Vec::new();
            for r in 0..n {
                want.extend((0..rows(r) * 3).map(|v| v + r as i64 * 1_000_000));
            }
            let total: i64 = (0..n).map(rows).sum();
            for (rank, per_rank) in got.iter().enumerate() {
                assert_eq!(
                    per_rank[k].0,
                    vec![total, 3],
                    "world {n} rank {rank} case {k}"
                );
                assert_same(
                    &per_rank[k].1,
                    &want,
                    &format!("world {n} rank {rank} case {k}"),
                );
            }
        }
    }
}

#[test]
fn all_gather_of_f32_features_keeps_trailing_dims() {
    let got = with_ring(3, opts(1 << 16, WireDtype::Bf16), |ring| {
        let r = ring.rank() as f32;
        let t = Tensor::full(
            [2, 4, 5],
            f64::from(r + 0.1),
            (Kind::Float, tch::Device::Cpu),
        );
        ring.all_gather(&t).unwrap()
    });
    for g in got {
        assert_eq!(g.size(), vec![6, 4, 5]);
        // bf16 is for all-reduce only: gathered features stay exact.
        for r in 0..3 {
            let rows = g.narrow(0, 2 * r, 2);
            assert!(to_vec(&rows).iter().all(|v| *v == r as f32 + 0.1));
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for n in 1..=5 {
        let got = with_ring(n, opts(2048, WireDtype::Fp32), |ring| {
            (0..n)
                .map(|root| {
                    let len = 30_011 + root as i64;
                    let mut t = if ring.rank() == root {
                        Tensor::arange(len, (Kind::Float, tch::Device::Cpu)) * (root + 1) as f64
                    } else {
                        Tensor::zeros([len], (Kind::Float, tch::Device::Cpu))
                    };
                    ring.broadcast(&mut t, root).unwrap();
                    let mut small = Tensor::from_slice(&[ring.rank() as i64; 3]);
                    ring.broadcast(&mut small, root).unwrap();
                    (to_vec(&t), Vec::<i64>::try_from(small).unwrap())
                })
                .collect::<Vec<_>>()
        });
        for per_rank in &got {
            for (root, (big, small)) in per_rank.iter().enumerate() {
                let want: Vec<f32> = (0..30_011 + root)
                    .map(|i| (i * (root + 1)) as f32)
                    .collect();
                assert_same(big, &want, &format!("world {n} root {root}"));
                assert_eq!(small, &vec![root as i64; 3], "world {n} root {root}");
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    for n in [1, 2, 4, 5] {
        let last_entered: Mutex<Option<Instant>> = Mutex::new(None);
        let exits = with_ring(n, opts(4096, WireDtype::Fp32), |ring| {
            if ring.rank() == n - 1 {
                thread::sleep(Duration::from_millis(200));
                *last_entered.lock().unwrap() = Some(Instant::now());
            }
            ring.barrier().unwrap();
            let exit = Instant::now();
            ring.barrier().unwrap(); // a second one in a row also completes
            exit
        });
        let entered = last_entered.lock().unwrap().unwrap();
        for (rank, exit) in exits.iter().enumerate() {
            assert!(
                *exit >= entered,
                "world {n}: rank {rank} left before rank {} arrived",
                n - 1
            );
        }
    }
}

#[test]
fn ranks_out_of_step_fail_with_a_clear_error() {
    let got = with_ring(2, opts(4096, WireDtype::Fp32), |ring| {
        let len = 10 + ring.rank() as i64;
        let mut t = Tensor::zeros([len], (Kind::Float, tch::Device::Cpu));
        let first = ring.all_reduce_sum(&mut t).unwrap_err();
        let second = ring.barrier().unwrap_err();
        (first, second)
    });
    for (first, second) in got {
        assert!(
            matches!(
                first,
                CollectiveError::Invalid {
                    op: "all_reduce",
                    ..
                }
            ),
            "{first}"
        );
        assert!(first.to_string().contains("out of step"), "{first}");
        assert!(second.to_string().contains("unusable"), "{second}");
    }
}

#[test]
fn bad_tensors_are_refused_before_any_traffic() {
    let mut ring = RingCollective::connect(
        0,
        &["127.0.0.1:1".to_string()],
        TcpListener::bind("127.0.0.1:0").unwrap(),
        RingOptions::default(),
    )
    .unwrap();
    let mut ints = Tensor::from_slice(&[1i64, 2]);
    let e = ring.all_reduce_sum(&mut ints).unwrap_err();
    assert!(e.to_string().contains("f32"), "{e}");
    let scalar = Tensor::from(1.0f32);
    let e = ring.all_gather(&scalar).unwrap_err();
    assert!(e.to_string().contains("dimension"), "{e}");
    let mut t = Tensor::from_slice(&[1f32]);
    let e = ring.broadcast(&mut t, 1).unwrap_err();
    assert!(e.to_string().contains("root 1"), "{e}");
    // World size 1: the ring is local and the values are untouched.
    let mut t = Tensor::from_slice(&[1f32, 2.0]);
    ring.all_reduce_sum(&mut t).unwrap();
    assert_eq!(to_vec(&t), vec![1.0, 2.0]);
}

/// A small MLP plus a parameter that only rank 0 uses (the others have no grad for it).
struct Model {
    _vs: nn::VarStore,
    net: nn::Sequential,
    extra: Tensor,
    params: Vec<Tensor>,
}

fn model(seed: i64) -> Model {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "l1", 6, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "l2", 16, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "l3", 16, 3, Default::default()));
    let extra = root.randn_standard("extra", &[5]);
    let mut params = Vec::new();
    for name in [
        "l1.weight",
        "l1.bias",
        "l2.weight",
        "l2.bias",
        "l3.weight",
        "l3.bias",
        "extra",
    ] {
        params.push(vs.variables()[name].shallow_clone());
    }
    Model {
        _vs: vs,
        net,
        extra,
        params,
    }
}

#[test]
fn grad_buckets_sum_the_grads_of_a_real_model_across_ranks() {
    for n in [2, 3] {
        // Forward and backward per rank on different data (same initial weights).
        let models: Vec<Model> = (0..n).map(|_| model(7)).collect();
        let mut local: Vec<Vec<Option<Vec<f32>>>> = Vec::new();
        for (rank, m) in models.iter().enumerate() {
            tch::manual_seed(100 + rank as i64);
            let x = Tensor::randn([4, 6], (Kind::Float, tch::Device::Cpu));
            let mut loss = m.net.forward(&x).square().sum(Kind::Float);
            if rank == 0 {
                loss += (&m.extra * 3.0).sum(Kind::Float);
            }
            loss.backward();
            local.push(
                m.params
                    .iter()
                    .map(|p| p.grad().defined().then(|| to_vec(&p.grad())))
                    .collect(),
            );
        }
        assert!(
            local[1][6].is_none(),
            "rank 1 must have no grad for `extra`"
        );
        let want: Vec<Vec<f32>> = (0..7)
            .map(|k| {
                let len = models[0].params[k].numel();
                (0..len)
                    .map(|i| {
                        local
                            .iter()
                            .map(|g| g[k].as_ref().map_or(0.0, |v| v[i]))
                            .sum()
                    })
                    .collect()
            })
            .collect();

        let params: Vec<Vec<Tensor>> = models
            .iter()
            .map(|m| m.params.iter().map(|p| p.shallow_clone()).collect())
            .collect();
        let params = Mutex::new(params.into_iter().map(Some).collect::<Vec<_>>());
        let got = with_ring(n, opts(512, WireDtype::Fp32), |ring| {
            let mine = params.lock().unwrap()[ring.rank()].take().unwrap();
            // 400-byte buckets: several buckets, the l3 (last) parameters first.
            let mut buckets = GradBuckets::new(&mine, 400).unwrap();
            let sizes = buckets.bucket_sizes();
            buckets.all_reduce_grads(ring).unwrap();
            let once: Vec<Vec<f32>> = mine.iter().map(|p| to_vec(&p.grad())).collect();
            // The flat buffers are reused: a second round sums the (now equal) grads again.
            buckets.all_reduce_grads(ring).unwrap();
            let twice: Vec<Vec<f32>> = mine.iter().map(|p| to_vec(&p.grad())).collect();
            (sizes, once, twice)
        });
        for (rank, (sizes, once, twice)) in got.iter().enumerate() {
            // Reverse registration order, ≤ 100 floats per bucket unless one parameter is
            // larger: [extra, l3.bias, l3.weight, l2.bias], [l2.weight], [l1.bias], [l1.weight].
            assert_eq!(sizes, &vec![5 + 3 + 48 + 16, 256, 16, 96]);
            for k in 0..7 {
                for (i, w) in want[k].iter().enumerate() {
                    let tol = 1e-5 * w.abs().max(1.0);
                    assert!(
                        (once[k][i] - w).abs() <= tol,
                        "world {n} rank {rank} param {k}[{i}]: {} vs {w}",
                        once[k][i]
                    );
                    assert!((twice[k][i] - n as f32 * once[k][i]).abs() <= n as f32 * tol);
                }
            }
        }
        // Every rank ends with identical grads.
        for g in &got[1..] {
            assert!(g.1 == got[0].1, "grads differ between ranks");
        }
    }
}
