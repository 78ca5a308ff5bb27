//! The ring's authenticated handshake on real sockets: a host that reaches a worker's ring port
//! first with a correct-looking hello but without the run's key is refused, a silent connection
//! delays no one, and ranks holding different keys never form a ring.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::listeners;
use ferroclip_worker::collective::ring::{RingCollective, RingKey, RingOptions, Transport};
use ferroclip_worker::collective::Collective;
use tch::Tensor;

fn opts(key: RingKey, timeout: Duration) -> RingOptions {
    RingOptions {
        timeout,
        generation: 7,
        transport: Transport::Tcp,
        key,
        ..RingOptions::default()
    }
}

/// A hello as the real dialer of rank 0 would send it (48 bytes: magic, generation, rank,
/// world size, nonce), from a host that does not hold the key.
fn forged_hello() -> Vec<u8> {
    let mut b = b"FCRING02".to_vec();
    for x in [7u64, 0, 2] {
        b.extend(x.to_le_bytes());
    }
    b.extend([9u8; 16]);
    b
}

#[test]
fn a_forged_peer_first_and_a_silent_connection_neither_join_nor_delay_the_ring() {
    let (ls, peers) = listeners(2);
    let key = RingKey::from_token("the run's token");
    // Before the ranks start: a connection that never speaks, and a forger with the right
    // generation, rank and world size, both ahead of the real neighbour in rank 1's backlog.
    let _silent = TcpStream::connect(&peers[1]).expect("connect");
    let forger = {
        let addr = peers[1].clone();
        thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            s.write_all(&forged_hello()).expect("hello");
            let mut reply = [0u8; 80];
            s.read_exact(&mut reply).expect("reply");
            let verdict = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
            assert_eq!(verdict, 0, "the hello itself looks right");
            s.write_all(&[0u8; 32]).expect("a proof it cannot compute");
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).expect("ack");
            u64::from_le_bytes(ack)
        })
    };
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let sums: Vec<f32> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, o) = (peers.clone(), opts(key, Duration::from_secs(30)));
                s.spawn(move || {
                    let mut ring = RingCollective::connect(rank, &peers, l, o).expect("ring");
                    let mut t = Tensor::from_slice(&[rank as f32 + 1.0]);
                    ring.all_reduce_sum(&mut t).expect("all-reduce");
                    t.double_value(&[0]) as f32
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    let formed = start.elapsed();
    assert_eq!(sums, [3.0, 3.0], "the real neighbours formed the ring");
    // The handshake timeout is 5 s: formation did not wait on the silent connection.
    assert!(formed < Duration::from_secs(3), "formed after {formed:?}");
    assert_eq!(forger.join().expect("forger"), 5, "refused: bad proof");
}

#[test]
fn ranks_with_different_keys_never_form_a_ring() {
    let (ls, peers) = listeners(2);
    let timeout = Duration::from_secs(2);
    let results: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let key = RingKey::from_token(&format!("token of run {rank}"));
                let (peers, o) = (peers.clone(), opts(key, timeout));
                s.spawn(move || match RingCollective::connect(rank, &peers, l, o) {
                    Ok(_) => "formed".to_string(),
                    Err(e) => e.to_string(),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    for r in &results {
        assert!(r.contains("did not answer within"), "{results:?}");
    }
}
