//! Fuzz targets of the ring's wire (`ferroclip-fuzz`, `FERROCLIP_FUZZ_SECS` each), driven over
//! real loopback TCP sockets:
//!
//! - `fuzz_handshake_acceptor`: what anyone who reaches a ring port can send before
//!   authenticating (the hello, then a proof) to `handshake::answer`;
//! - `fuzz_handshake_dialer`: what a port squatter can answer to `handshake::dial`;
//! - `fuzz_ring_frames`: what an authenticated but broken or hostile left neighbour sends once
//!   the ring has formed (operation headers, all-gather row counts, payloads) to a real
//!   `RingCollective` running all-gather, broadcast, all-reduce (fp32, bf16) or barrier.
//!
//! No input may panic, hang or allocate beyond the documented bounds; none may authenticate
//! without the key. Regression inputs live in `worker/tests/fuzz_corpus/<target>/`.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use ferroclip_fuzz::{Fuzzer, LimitAlloc};

use super::handshake::{self, Hello, Reply, RingKey, Verdict};
use super::ring::{RingCollective, RingOptions, Transport, WireDtype};
use super::wire::{Header, Op};
use super::Collective;

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

const GENERATION: u64 = 7;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

fn key() -> RingKey {
    RingKey::from_token("fuzz token")
}

/// Connects, retrying a while: tens of thousands of loopback connections a minute can briefly
/// run out of ports, which is the test machine's limit, not a finding.
fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut tries = 0;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(_) if tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to {addr} on loopback: {e}"),
        }
    }
}

/// A connected (client, server) pair on loopback.
fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = connect(listener.local_addr().unwrap());
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Reads a stream until EOF or error (so the other end's writes never block).
fn drain(s: TcpStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut &s, &mut std::io::sink());
    })
}

#[test]
fn fuzz_handshake_acceptor() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // Rank 1 of 2 expects rank 0 at generation 7.
    let ours = Hello::new(GENERATION, 1, 2);
    let hello = Hello::new(GENERATION, 0, 2).encode();
    let mut with_proof = hello.to_vec();
    with_proof.extend_from_slice(&[0x5a; 32]);
    let seeds = vec![
        hello.to_vec(),
        with_proof,
        Hello::new(GENERATION - 1, 0, 2).encode().to_vec(),
        Hello::new(GENERATION, 0, 3).encode().to_vec(),
    ];
    Fuzzer::new("handshake_acceptor")
        .corpus_dir(corpus("handshake_acceptor"))
        .max_len(4096)
        .run(&seeds, |input| {
            let (client, server) = pair(&listener);
            (&client).write_all(input).unwrap_or(());
            let _ = client.shutdown(Shutdown::Write);
            let reader = drain(client);
            let out = handshake::answer(&server, ours, 0, &key(), Duration::from_secs(10));
            drop(server);
            reader.join().unwrap();
            // Without the key no input authenticates (the acceptor's nonce is fresh each time).
            assert!(!matches!(out, Ok(true)), "authenticated without the key");
            if let Err(e) = out {
                assert!(!e.to_string().is_empty());
            }
        });
}

#[test]
fn fuzz_handshake_dialer() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let reply = |verdict| Reply {
        verdict,
        generation: GENERATION,
        expected_rank: 0,
        world_size: 2,
        nonce: [3; 16],
        proof: [4; 32],
    };
    let mut accepted = reply(Verdict::Accepted).encode().to_vec();
    accepted.extend_from_slice(&0u64.to_le_bytes());
    let seeds = vec![
        accepted,
        reply(Verdict::WrongRank).encode().to_vec(),
        reply(Verdict::BadProof).encode().to_vec(),
    ];
    Fuzzer::new("handshake_dialer")
        .corpus_dir(corpus("handshake_dialer"))
        .max_len(4096)
        .run(&seeds, |input| {
            let (client, server) = pair(&listener);
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            (&server).write_all(input).unwrap_or(());
            let _ = server.shutdown(Shutdown::Write);
            let reader = drain(server);
            let out = handshake::dial(&client, Hello::new(GENERATION, 0, 2), &key());
            drop(client);
            reader.join().unwrap();
            match out {
                // A squatter without the key can refuse us but never be accepted.
                Ok(r) => assert_ne!(r.verdict, Verdict::Accepted, "accepted a keyless peer"),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        });
}

/// The operations rank 0 runs in `fuzz_ring_frames`, chosen by the input's first byte; the
/// rest is what rank 1 sends it.
const OPS: u8 = 6;
const GATHER_KEY: u64 = 0xfeed;
const ROW_BYTES: usize = 4;
const BCAST_LEN: usize = 96;
const REDUCE_LEN: usize = 40;

/// A 2-rank ring where rank 0 is a real `RingCollective` and rank 1 is this test: returns the
/// ring and rank 1's (to rank 0, from rank 0) streams.
fn form(dtype: WireDtype) -> (RingCollective, TcpStream, TcpStream) {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![
        l0.local_addr().unwrap().to_string(),
        l1.local_addr().unwrap().to_string(),
    ];
    let opts = RingOptions {
        timeout: Duration::from_secs(20),
        generation: GENERATION,
        transport: Transport::Tcp,
        dtype,
        key: key(),
        ..RingOptions::default()
    };
    let addr0 = l0.local_addr().unwrap();
    let rank0 = std::thread::spawn(move || RingCollective::connect(0, &peers, l0, opts));
    let ours = Hello::new(GENERATION, 1, 2);
    let acceptor = std::thread::spawn(move || {
        let (s, _) = l1.accept().unwrap();
        assert!(handshake::answer(&s, ours, 0, &key(), Duration::from_secs(20)).unwrap());
        s
    });
    let to0 = connect(addr0);
    let reply = handshake::dial(&to0, ours, &key()).unwrap();
    assert_eq!(reply.verdict, Verdict::Accepted);
    let from0 = acceptor.join().unwrap();
    (rank0.join().unwrap().unwrap(), to0, from0)
}

/// What a correct rank 1 sends for operation `op` (seq 0): the seeds.
fn transcript(op: u8) -> Vec<u8> {
    let mut b = vec![op];
    let header = |o, a, c| Header::new(o, 0, a, c).encode();
    match op {
        0 => {
            b.extend(header(Op::AllGather, GATHER_KEY, ROW_BYTES as u64));
            b.extend(3u64.to_le_bytes());
            b.extend([9u8; 3 * ROW_BYTES]);
        }
        1 | 2 => {
            b.extend(header(Op::Broadcast, BCAST_LEN as u64, u64::from(op - 1)));
            if op == 2 {
                b.extend([7u8; BCAST_LEN]);
            }
        }
        3 | 4 => {
            b.extend(header(Op::AllReduce, REDUCE_LEN as u64, u64::from(op - 3)));
            // Two segments (reduce-scatter, then all-gather) of 20 values each.
            let per = if op == 3 { 4 } else { 2 };
            b.extend(vec![0x3f; REDUCE_LEN * per]);
        }
        _ => b.extend(header(Op::Barrier, 0, 0)),
    }
    b
}

#[test]
fn fuzz_ring_frames() {
    let seeds: Vec<Vec<u8>> = (0..OPS).map(transcript).collect();
    let target = Fuzzer::new("ring_frames")
        .corpus_dir(corpus("ring_frames"))
        .max_len(64 * 1024)
        // Peer-sent row counts may ask for up to MAX_GATHER_BYTES (4 GiB, zeroed and lazily
        // mapped) before the short stream ends the operation; nothing may ask for more.
        .alloc_limit(super::ring::MAX_GATHER_BYTES + (1 << 20));
    target.run(&seeds, |input| {
        let Some((&op, frames)) = input.split_first() else {
            return;
        };
        let op = op % OPS;
        let dtype = if op == 4 {
            WireDtype::Bf16
        } else {
            WireDtype::Fp32
        };
        let (mut ring, to0, from0) = form(dtype);
        let reader = drain(from0);
        (&to0).write_all(frames).unwrap_or(());
        let _ = to0.shutdown(Shutdown::Write);
        let out = match op {
            0 => ring
                .all_gather_rows(&[1u8; 2 * ROW_BYTES], 2, ROW_BYTES, GATHER_KEY)
                .map(|(b, rows)| assert_eq!(b.len(), rows * ROW_BYTES)),
            1 | 2 => ring.broadcast_bytes(&mut [5u8; BCAST_LEN], usize::from(op - 1)),
            3 | 4 => ring.all_reduce_f32(&mut [1.0f32; REDUCE_LEN]),
            _ => ring.barrier(),
        };
        drop(ring);
        drop(to0);
        reader.join().unwrap();
        match out {
            Err(e) if seeds.iter().any(|s| s.as_slice() == input) => {
                panic!("a correct neighbour's frames failed: {e}")
            }
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(()) => {}
        }
    });
}
