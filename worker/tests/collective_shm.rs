//! All-reduce through shared memory (ranks on one host), on real sockets and real /dev/shm:
//! sums against local answers for world sizes 1–5, bit-identity with the TCP ring, other
//! collectives in between, and a peer process SIGKILLed mid-operation.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferroclip_worker::collective::{
    Collective, CollectiveError, RingCollective, RingOptions, Transport,
};
use tch::Tensor;

fn opts(transport: Transport, shm_chunk_bytes: usize, generation: u64) -> RingOptions {
    RingOptions {
        timeout: Duration::from_secs(20),
        generation,
        transport,
        shm_chunk_bytes,
        ..RingOptions::default()
    }
}

/// Run `f` on every rank of a fresh ring of `n` threads; results in rank order.
fn with_ring<T: Send>(
    n: usize,
    opts: RingOptions,
    f: impl Fn(&mut RingCollective) -> T + Sync,
) -> Vec<T> {
    common::on_ring(n, opts, |_, ring| f(ring))
}

/// Integer-valued floats: sums are exact in any order.
fn int_data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
        .collect()
}

/// Sum over ranks `0..n` of `int_data(shift + rank, len)`.
fn int_sum(n: usize, shift: usize, len: usize) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for r in 0..n {
        for (s, x) in sum.iter_mut().zip(int_data(shift + r, len)) {
            *s += x;
        }
    }
    sum
}

/// Values whose f32 sums depend on the order of addition.
fn rough_data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (i as f32 * 0.37 + rank as f32 * 1.91).sin() * 10f32.powi((i % 7) as i32 - 3))
        .collect()
}

fn shm_files(generation: u64) -> Vec<String> {
    let tag = format!("-g{generation}-r");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ferroclip-ar-") && n.contains(&tag))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn shm_all_reduce_sums_for_world_sizes_1_to_5_and_uneven_lengths() {
    const GEN: u64 = 7_771;
    // Lengths not divisible by the world sizes, growing then shrinking (regions remap); with
    // 3-float chunks every segment spans many doorbells.
    let small = [0usize, 1, 2, 7, 13, 1_001, 4_099, 17];
    let large = [0usize, 1, 7, 1_001, 100_003, 17, 300_001];
    for n in 1..=5 {
        for (chunk_bytes, lens) in [(12, &small[..]), (4 << 10, &large[..])] {
            let got = with_ring(n, opts(Transport::Shm, chunk_bytes, GEN), |ring| {
                let rank = ring.rank();
                if n > 1 {
                    assert_eq!(ring.transport(), Transport::Shm);
                }
                lens.iter()
                    .map(|&len| {
                        let mut t = Tensor::from_slice(&int_data(rank, len));
                        ring.all_reduce_sum(&mut t).unwrap();
                        Vec::<f32>::try_from(t).unwrap()
                    })
                    .collect::<Vec<_>>()
            });
            for (i, &len) in lens.iter().enumerate() {
                let want = int_sum(n, 0, len);
                for (rank, per_rank) in got.iter().enumerate() {
                    assert_eq!(
                        per_rank[i], want,
                        "world {n}, len {len}, chunk {chunk_bytes}, rank {rank}"
                    );
                }
            }
        }
    }
    // The region files were unlinked once mapped.
    assert_eq!(shm_files(GEN), Vec::<String>::new());
}

#[test]
fn shm_results_are_bit_identical_to_the_tcp_ring_and_across_ranks() {
    for n in [2, 3, 5] {
        let len = 50_021;
        let run = |transport| {
            with_ring(n, opts(transport, 8 << 10, 1), |ring| {
                let mut t = Tensor::from_slice(&rough_data(ring.rank(), len));
                ring.all_reduce_sum(&mut t).unwrap();
                Vec::<f32>::try_from(t).unwrap()
            })
        };
        let (tcp, shm) = (run(Transport::Tcp), run(Transport::Auto));
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for rank in 0..n {
            assert_eq!(
                bits(&shm[rank]),
                bits(&shm[0]),
                "world {n}: rank {rank} differs"
            );
            assert_eq!(bits(&shm[rank]), bits(&tcp[rank]), "world {n}: shm vs tcp");
        }
        // Not vacuous: from 3 ranks on, this data's sum depends on the order of addition.
        if n >= 3 {
            let data: Vec<Vec<f32>> = (0..n).map(|r| rough_data(r, len)).collect();
            let reversed: Vec<f32> = (0..len)
                .map(|j| {
                    (0..n - 1)
                        .rev()
                        .fold(data[n - 1][j], |acc, r| acc + data[r][j])
                })
                .collect();
            assert_ne!(bits(&reversed), bits(&shm[0]), "world {n}");
        }
    }
}

#[test]
fn other_collectives_run_between_shm_all_reduces() {
    let got = with_ring(3, opts(Transport::Auto, 64 << 10, 2), |ring| {
        let rank = ring.rank();
        assert_eq!(ring.transport(), Transport::Shm);
        let mut out = Vec::new();
        for round in 0..3usize {
            let mut t = Tensor::from_slice(&int_data(rank + round, 10_007));
            ring.all_reduce_sum(&mut t).unwrap();
            out.push(Vec::<f32>::try_from(t).unwrap());
            let g = ring
                .all_gather(&Tensor::from_slice(&[rank as f32; 2]))
                .unwrap();
            out.push(Vec::<f32>::try_from(g).unwrap());
            let mut b = Tensor::from_slice(&[rank as f32 + 0.5]);
            ring.broadcast(&mut b, round).unwrap();
            out.push(Vec::<f32>::try_from(b).unwrap());
            ring.barrier().unwrap();
        }
        out
    });
    for round in 0..3usize {
        let want = int_sum(3, round, 10_007);
        for per_rank in &got {
            assert_eq!(per_rank[3 * round], want);
            assert_eq!(per_rank[3 * round + 1], vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(per_rank[3 * round + 2], vec![round as f32 + 0.5]);
        }
    }
}

#[test]
fn a_peer_that_never_joins_the_shm_all_reduce_times_out_naming_it() {
    let timeout = Duration::from_millis(700);
    let (ls, peers) = common::listeners(2);
    let peers = &peers;
    // Rank 1 stops taking part but keeps its sockets open until rank 0 has its error: the
    // outcome does not depend on how fast a loaded machine runs either thread.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let err = thread::scope(|s| {
        let mut it = ls.into_iter();
        let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
        let o = RingOptions {
            timeout,
            ..opts(Transport::Shm, 64 << 10, 3)
        };
        let o1 = o.clone();
        s.spawn(move || {
            let mut ring = RingCollective::connect(1, peers, l1, o1).unwrap();
            let mut t = Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
            ring.all_reduce_sum(&mut t).unwrap();
            let _ = done_rx.recv_timeout(Duration::from_secs(60));
        });
        let mut ring = RingCollective::connect(0, peers, l0, o).unwrap();
        let mut t = Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
        ring.all_reduce_sum(&mut t).unwrap();
        assert_eq!(t.double_value(&[5]), 2.0);
        let start = Instant::now();
        let err = ring.all_reduce_sum(&mut t).unwrap_err();
        let elapsed = start.elapsed();
        let _ = done_tx.send(());
        assert!(
            elapsed >= timeout.mul_f32(0.9),
            "gave up early: {elapsed:?}"
        );
        // No hang: bounded by the timeout plus scheduling slack on a loaded machine.
        assert!(
            elapsed < timeout + Duration::from_secs(5),
            "took {elapsed:?}"
        );
        err
    });
    assert!(
        matches!(err, CollectiveError::Timeout { peer: 1, .. }),
        "{err}"
    );
}

const CHILD_ENV: &str = "FERROCLIP_SHM_TEST_CHILD";

/// Rank 1 of `a_peer_process_killed_mid_all_reduce_...`, run as a child process: all-reduces
/// 16 MiB in a loop until it is killed.
#[test]
#[ignore = "helper process for the SIGKILL test"]
fn shm_child_rank() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let peers: Vec<String> = spec.split(',').map(str::to_string).collect();
    let listener = TcpListener::bind(&peers[1]).unwrap();
    let mut ring =
        RingCollective::connect(1, &peers, listener, opts(Transport::Shm, 512 << 10, 4_242))
            .unwrap();
    let mut t = Tensor::zeros([4 << 20], (tch::Kind::Float, tch::Device::Cpu));
    loop {
        ring.all_reduce_sum(&mut t).unwrap();
    }
}

#[test]
fn a_peer_process_killed_mid_all_reduce_gives_an_error_naming_it_not_a_hang() {
    let (mut ls, peers) = common::listeners(2);
    drop(ls.pop()); // the child binds rank 1's port
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "shm_child_rank", "--ignored", "--nocapture"])
        .env(CHILD_ENV, peers.join(","))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let o = RingOptions {
        timeout: Duration::from_secs(5),
        ..opts(Transport::Shm, 512 << 10, 4_242)
    };
    let mut ring = RingCollective::connect(0, &peers, ls.pop().unwrap(), o).unwrap();
    let mut t = Tensor::zeros([4 << 20], (tch::Kind::Float, tch::Device::Cpu));
    ring.all_reduce_sum(&mut t).unwrap();
    // Regions are mapped: the child's file must already be gone.
    let prefix = format!("ferroclip-ar-{child_pid}-");
    let leftover = || {
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    };
    assert!(!leftover(), "the child's region file is still in /dev/shm");
    // Kill it while both are busy in the loop (each 16 MiB all-reduce takes milliseconds), once
    // a few have completed: an event, not a sleep, so a slow machine changes nothing.
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let killed_at = thread::scope(|s| {
        let killer = s.spawn(|| {
            let start = Instant::now();
            while ok.load(std::sync::atomic::Ordering::SeqCst) < 3
                && start.elapsed() < Duration::from_secs(60)
            {
                thread::sleep(Duration::from_millis(5));
            }
            child.kill().unwrap();
            Instant::now()
        });
        let err = loop {
            match ring.all_reduce_sum(&mut t) {
                Ok(()) => {
                    ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => break e,
            }
        };
        let failed_at = Instant::now();
        let killed_at = killer.join().unwrap();
        assert!(
            ok.load(std::sync::atomic::Ordering::SeqCst) >= 3,
            "too few all-reduces completed before the kill"
        );
        assert_eq!(err.suspect(), Some(1), "{err}");
        // Well below the 5 s ring timeout: the closed sockets tell at once.
        assert!(
            failed_at.duration_since(killed_at) < Duration::from_secs(4),
            "the error came {:?} after the kill",
            failed_at.duration_since(killed_at)
        );
        killed_at
    });
    let _ = child.wait();
    let _ = killed_at;
    assert!(!leftover(), "a SIGKILLed rank left its region in /dev/shm");
    // The ring stays broken, promptly.
    let again = ring.all_reduce_sum(&mut t).unwrap_err();
    assert!(again.to_string().contains("unusable"), "{again}");
}

#[test]
fn default_options_with_regions_growing_like_gradient_buckets() {
    // Sizes around the 1 MiB growth step and the 2 MiB chunk, repeated back to back.
    let lens = [
        8_192usize, 8_192, 700_001, 1, 262_144, 700_001, 2_000_003, 5,
    ];
    for n in [2, 3] {
        let got = with_ring(n, RingOptions::default(), |ring| {
            assert_eq!(ring.transport(), Transport::Shm);
            let rank = ring.rank();
            lens.iter()
                .enumerate()
                .map(|(i, &len)| {
                    let mut t = Tensor::from_slice(&int_data(rank + i, len));
                    ring.all_reduce_sum(&mut t).unwrap();
                    Vec::<f32>::try_from(t).unwrap()
                })
                .collect::<Vec<_>>()
        });
        for (i, &len) in lens.iter().enumerate() {
            let want = int_sum(n, i, len);
            for (rank, per_rank) in got.iter().enumerate() {
                assert!(
                    per_rank[i] == want,
                    "world {n}, op {i} (len {len}), rank {rank}"
                );
            }
        }
    }
}
