//! Forming the ring: dial the right neighbour, accept the left one, both with the handshake of
//! `handshake.rs` (generation, rank and world size, proven with the run's key), so that stale,
//! misplaced or foreign peers are refused. Incoming connections are greeted concurrently, each
//! within `HANDSHAKE_TIMEOUT`: a silent or hostile connection delays no one.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use super::handshake::{self, Hello, RingKey, Verdict};
use super::ring::invalid;
use super::wire;
use super::{CollectiveError, Result};

/// Socket buffer size asked of the kernel (capped by net.core.{r,w}mem_max).
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// How long one incoming connection may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in flight at once; connections beyond this are closed at once.
const MAX_GREETERS: usize = 64;

/// The (left, right) sockets of `rank`, configured (no delay, timeouts, buffers). Needs
/// `peers.len() >= 2`.
pub(crate) fn form(
    rank: usize,
    peers: &[String],
    listener: &TcpListener,
    generation: u64,
    key: RingKey,
    timeout: Duration,
) -> Result<(TcpStream, TcpStream)> {
    const OP: &str = "connect";
    let world_size = peers.len();
    let left = (rank + world_size - 1) % world_size;
    let right = (rank + 1) % world_size;
    let right_addr = resolve(&peers[right], right)?;
    let hello = Hello::new(generation, rank as u64, world_size as u64);
    let deadline = Instant::now() + timeout;
    // Accepted sockets inherit the listener's receive buffer (it sizes the TCP window).
    let _ = socket2::SockRef::from(listener).set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let cancel = AtomicBool::new(false);
    let (right_stream, left_stream) = thread::scope(|s| {
        let acceptor =
            s.spawn(|| accept_left(listener, hello, key, left, deadline, timeout, &cancel));
        let connected = connect_right(right_addr, hello, key, right, deadline, timeout);
        if connected.is_err() {
            cancel.store(true, Ordering::SeqCst);
        }
        let accepted = acceptor
            .join()
            .unwrap_or_else(|_| Err(invalid(OP, "the accept thread panicked")));
        (connected, accepted)
    });
    let right_stream = right_stream?;
    let left_stream = left_stream?;
    for (s, peer) in [(&left_stream, left), (&right_stream, right)] {
        configure(s, timeout).map_err(|e| wire::link_error(e, peer, OP, timeout))?;
    }
    Ok((left_stream, right_stream))
}

fn resolve(addr: &str, rank: usize) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            invalid(
                "connect",
                format!("peer rank {rank}: cannot resolve {addr:?}"),
            )
        })
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let sock = socket2::SockRef::from(s);
    // Best effort: the kernel caps these; failing to raise them is not an error.
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    Ok(())
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Dial the right neighbour until it answers our hello or the deadline passes. Connection
/// refusals are retried: the neighbour may still be starting.
fn connect_right(
    addr: SocketAddr,
    hello: Hello,
    key: RingKey,
    right: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    const OP: &str = "connect";
    let mut last_err: Option<std::io::Error> = None;
    while let Some(left_time) = remaining(deadline) {
        match try_hello(addr, hello, &key, left_time) {
            Ok((stream, reply)) => {
                if reply.verdict == Verdict::Accepted {
                    return Ok(stream);
                }
                return Err(invalid(
                    OP,
                    format!(
                        "rank {right} at {addr} refused this rank ({:?}): it is at generation {} expecting rank {} of {}, this rank is {} of {} at generation {}",
                        reply.verdict,
                        reply.generation,
                        reply.expected_rank,
                        reply.world_size,
                        hello.rank,
                        hello.world_size,
                        hello.generation
                    ),
                ));
            }
            Err(e) => {
                last_err = Some(e);
                thread::sleep(
                    Duration::from_millis(20).min(remaining(deadline).unwrap_or_default()),
                );
            }
        }
    }
    tracing::warn!(right, error = ?last_err, "could not reach the right neighbour");
    Err(CollectiveError::Timeout {
        peer: right,
        op: OP,
        timeout_s: timeout.as_secs_f64(),
    })
}

fn try_hello(
    addr: SocketAddr,
    hello: Hello,
    key: &RingKey,
    time: Duration,
) -> std::io::Result<(TcpStream, handshake::Reply)> {
    let stream = TcpStream::connect_timeout(&addr, time)?;
    let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(time))?;
    stream.set_write_timeout(Some(time))?;
    let reply = handshake::dial(&stream, hello, key)?;
    Ok((stream, reply))
}

/// Accept connections until one proves to be the expected left neighbour; refuse (and keep
/// waiting past) stale generations, wrong ranks, strangers and peers without the key. Each
/// connection is greeted on its own thread, so none can hold up the real neighbour.
fn accept_left(
    listener: &TcpListener,
    ours: Hello,
    key: RingKey,
    left: usize,
    deadline: Instant,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<TcpStream> {
    const OP: &str = "connect";
    let timed_out = || CollectiveError::Timeout {
        peer: left,
        op: OP,
        timeout_s: timeout.as_secs_f64(),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| wire::link_error(e, left, OP, timeout))?;
    let (tx, rx) = mpsc::channel::<TcpStream>();
    let greeting = Arc::new(AtomicUsize::new(0));
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(timed_out());
        }
        let Some(left_time) = remaining(deadline) else {
            return Err(timed_out());
        };
        if let Ok(stream) = rx.try_recv() {
            return Ok(stream);
        }
        match listener.accept() {
            Ok((stream, from)) => {
                if greeting.load(Ordering::SeqCst) >= MAX_GREETERS {
                    tracing::warn!(%from, "too many ring handshakes in flight: connection closed");
                    continue;
                }
                greeting.fetch_add(1, Ordering::SeqCst);
                let (tx, greeting) = (tx.clone(), greeting.clone());
                let time = HANDSHAKE_TIMEOUT.min(left_time);
                thread::spawn(move || {
                    match handshake::answer(&stream, ours, left as u64, &key, time) {
                        Ok(true) => {
                            let _ = tx.send(stream);
                        }
                        Ok(false) => tracing::warn!(%from, "refused a ring connection"),
                        Err(e) => tracing::warn!(%from, error = %e, "bad ring handshake"),
                    }
                    greeting.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(wire::link_error(e, left, OP, timeout)),
        }
    }
}
