//! Failures on the TCP ring: dead and silent peers are named within the timeout (never a hang),
//! a broken ring stays broken and drops promptly, and stale generations are refused.

mod common;

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use ferroclip_worker::collective::{
    Collective, CollectiveError, RingCollective, RingOptions, Transport, WireDtype,
};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_millis(600);

/// What "in time, no hang" allows beyond the timeout: a loaded 2-core CI machine can delay a
/// thread's wake-up by far more than the timeout itself, and the point of these bounds is that
/// nothing waits for the kernel's own (minutes-long) TCP timeouts.
const SLACK: Duration = Duration::from_secs(5);

fn opts(generation: u64) -> RingOptions {
    RingOptions {
        timeout: TIMEOUT,
        chunk_bytes: 64 * 1024,
        dtype: WireDtype::Fp32,
        generation,
        transport: Transport::Tcp,
        ..RingOptions::default()
    }
}

/// 16 MiB: larger than the socket buffers, so writers block on a peer that stops reading.
fn big() -> Tensor {
    Tensor::ones([4 << 20], (Kind::Float, tch::Device::Cpu))
}

#[test]
fn a_closed_peer_socket_gives_io_naming_it_and_the_ring_stays_broken() {
    let (ls, peers) = common::listeners(2);
    let peers = &peers;
    let (err, elapsed, after, drop_time) = thread::scope(|s| {
        let mut it = ls.into_iter();
        let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
        let dead = s.spawn(move || {
            let mut ring = RingCollective::connect(1, peers, l1, opts(1)).unwrap();
            ring.barrier().unwrap();
            drop(ring); // the process "dies": its sockets close
        });
        let mut ring = RingCollective::connect(0, peers, l0, opts(1)).unwrap();
        ring.barrier().unwrap();
        dead.join().unwrap();
        let start = Instant::now();
        let err = ring.all_reduce_sum(&mut big()).unwrap_err();
        let elapsed = start.elapsed();
        let after = ring.all_reduce_sum(&mut big()).unwrap_err();
        let t = Instant::now();
        drop(ring);
        (err, elapsed, after, t.elapsed())
    });
    assert!(matches!(err, CollectiveError::Io { peer: 1, .. }), "{err}");
    assert_eq!(err.suspect(), Some(1));
    assert!(elapsed < TIMEOUT + SLACK, "the error took {elapsed:?}");
    assert!(
        matches!(after, CollectiveError::Invalid { .. }) && after.to_string().contains("unusable"),
        "{after}"
    );
    assert!(drop_time < SLACK, "drop took {drop_time:?}");
}

#[test]
fn a_silent_peer_times_out_naming_it_on_every_rank_in_time() {
    // Rank 2 stays connected but never calls the collective.
    let (ls, peers) = common::listeners(3);
    let peers = &peers;
    // The silent rank keeps its sockets open until both others have failed (a timing-free end:
    // if it closed them first, the others would see a closed socket instead of silence).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let done_rx = std::sync::Mutex::new(done_rx);
    let done_rx = &done_rx;
    let results = thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let done_tx = done_tx.clone();
                s.spawn(move || {
                    let mut ring = RingCollective::connect(rank, peers, l, opts(2)).unwrap();
                    ring.barrier().unwrap();
                    if rank == 2 {
                        let rx = done_rx.lock().unwrap();
                        for _ in 0..2 {
                            let _ = rx.recv_timeout(Duration::from_secs(60));
                        }
                        return None;
                    }
                    let start = Instant::now();
                    let err = ring.all_reduce_sum(&mut big()).unwrap_err();
                    let elapsed = start.elapsed();
                    let t = Instant::now();
                    drop(ring);
                    let _ = done_tx.send(());
                    Some((err, elapsed, t.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    // Rank 0 reads from rank 2: it must name rank 2.
    let (err0, elapsed0, drop0) = results[0].as_ref().unwrap();
    assert!(
        matches!(err0, CollectiveError::Timeout { peer: 2, .. }),
        "rank 0: {err0}"
    );
    assert!(
        *elapsed0 >= TIMEOUT.mul_f32(0.9),
        "rank 0 gave up early: {elapsed0:?}"
    );
    assert!(*elapsed0 < TIMEOUT + SLACK, "rank 0 took {elapsed0:?}");
    assert!(*drop0 < SLACK, "rank 0's drop took {drop0:?}");
    // Rank 1 writes to rank 2 and reads from rank 0: whichever breaks first, it fails in time.
    let (err1, elapsed1, drop1) = results[1].as_ref().unwrap();
    assert!(err1.suspect().is_some(), "rank 1: {err1}");
    assert!(*elapsed1 < TIMEOUT + SLACK, "rank 1 took {elapsed1:?}");
    assert!(*drop1 < SLACK, "rank 1's drop took {drop1:?}");
}

#[test]
fn a_peer_that_never_shows_up_times_out_the_connect() {
    let (mut ls, peers) = common::listeners(2);
    // Rank 1's port is bound (the kernel even completes TCP handshakes) but nobody runs it.
    let _absent = ls.pop().unwrap();
    let start = Instant::now();
    let err = RingCollective::connect(0, &peers, ls.pop().unwrap(), opts(1)).unwrap_err();
    let elapsed = start.elapsed();
    assert!(
        matches!(
            err,
            CollectiveError::Timeout {
                peer: 1,
                op: "connect",
                ..
            }
        ),
        "{err}"
    );
    assert!(elapsed < TIMEOUT + SLACK, "took {elapsed:?}");
}

#[test]
fn a_stale_generation_is_refused_and_the_current_one_still_forms() {
    let (ls, peers) = common::listeners(2);
    let peers = &peers;
    let mut it = ls.into_iter();
    let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
    let long = |generation| RingOptions {
        timeout: Duration::from_secs(10),
        ..opts(generation)
    };
    let sum = thread::scope(|s| {
        let current = s.spawn(move || {
            let mut ring = RingCollective::connect(1, peers, l1, long(5)).unwrap();
            let mut t = Tensor::from_slice(&[10f32, 20.0]);
            ring.all_reduce_sum(&mut t).unwrap();
            Vec::<f32>::try_from(t).unwrap()
        });
        // A rank 0 left over from generation 4 dials rank 1 first: refused, at once.
        let stale_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let start = Instant::now();
        let err = RingCollective::connect(0, peers, stale_listener, long(4)).unwrap_err();
        // At once: well before the 10 s the current generation's rank waits.
        assert!(
            start.elapsed() < SLACK,
            "refusal took {:?}",
            start.elapsed()
        );
        assert!(
            matches!(err, CollectiveError::Invalid { op: "connect", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("generation 5"), "{err}");
        assert_eq!(err.suspect(), None);
        // The generation-5 rank 0 is accepted by the rank 1 that refused the stale one.
        let mut ring = RingCollective::connect(0, peers, l0, long(5)).unwrap();
        let mut t = Tensor::from_slice(&[1f32, 2.0]);
        ring.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f32>::try_from(t).unwrap(), vec![11.0, 22.0]);
        current.join().unwrap()
    });
    assert_eq!(sum, vec![11.0, 22.0]);
}

#[test]
fn a_connection_claiming_the_wrong_rank_is_refused() {
    // World of 3: rank 2's left neighbour is rank 1, so rank 0 dialling it (as if rank 2 were
    // its right neighbour) must be refused.
    let (mut ls, peers) = common::listeners(3);
    let l2 = ls.pop().unwrap();
    let _l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let swapped = vec![peers[0].clone(), peers[2].clone(), peers[1].clone()];
    let waiting = thread::spawn({
        let peers = peers.clone();
        move || RingCollective::connect(2, &peers, l2, opts(1)).unwrap_err()
    });
    let err = RingCollective::connect(0, &swapped, l0, opts(1)).unwrap_err();
    assert!(err.to_string().contains("WrongRank"), "{err}");
    // Rank 2 never gets its real left neighbour: a timeout naming rank 1 (left) or 0 (right).
    let err2 = waiting.join().unwrap();
    assert!(matches!(err2, CollectiveError::Timeout { .. }), "{err2}");
}
