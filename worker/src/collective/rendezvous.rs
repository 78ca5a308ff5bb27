//! Forming the ring: dial the right neighbour, accept the left one, both with a handshake
//! carrying (generation, rank, world size) so that stale or misplaced peers are refused.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::ring::invalid;
use super::wire::{self, Hello, Reply, Verdict};
use super::{CollectiveError, Result};

/// Socket buffer size asked of the kernel (capped by net.core.{r,w}mem_max).
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The (left, right) sockets of `rank`, configured (no delay, timeouts, buffers). Needs
/// `peers.len() >= 2`.
pub(crate) fn form(
    rank: usize,
    peers: &[String],
    listener: &TcpListener,
    generation: u64,
    timeout: Duration,
) -> Result<(TcpStream, TcpStream)> {
    const OP: &str = "connect";
    let world_size = peers.len();
    let left = (rank + world_size - 1) % world_size;
    let right = (rank + 1) % world_size;
    let right_addr = resolve(&peers[right], right)?;
    let hello = Hello {
        generation,
        rank: rank as u64,
        world_size: world_size as u64,
    };
    let deadline = Instant::now() + timeout;
    // Accepted sockets inherit the listener's receive buffer (it sizes the TCP window).
    let _ = socket2::SockRef::from(listener).set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let cancel = AtomicBool::new(false);
    let (right_stream, left_stream) = thread::scope(|s| {
        let acceptor = s.spawn(|| accept_left(listener, hello, left, deadline, timeout, &cancel));
        let connected = connect_right(right_addr, hello, right, deadline, timeout);
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
    right: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    const OP: &str = "connect";
    let mut last_err: Option<std::io::Error> = None;
    while let Some(left_time) = remaining(deadline) {
        match try_hello(addr, hello, left_time) {
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
    tracing::debug!(right, error = ?last_err, "could not reach the right neighbour");
    Err(CollectiveError::Timeout {
        peer: right,
        op: OP,
        timeout_s: timeout.as_secs_f64(),
    })
}

fn try_hello(
    addr: SocketAddr,
    hello: Hello,
    time: Duration,
) -> std::io::Result<(TcpStream, Reply)> {
    let stream = TcpStream::connect_timeout(&addr, time)?;
    let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(time))?;
    stream.set_write_timeout(Some(time))?;
    wire::write_all(&stream, &hello.encode())?;
    let mut b = [0u8; Reply::LEN];
    wire::read_exact(&stream, &mut b)?;
    let reply = Reply::decode(&b).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed handshake reply")
    })?;
    Ok((stream, reply))
}

/// Accept connections until one carries the expected hello; refuse (and keep waiting past)
/// stale generations, wrong ranks and strangers.
fn accept_left(
    listener: &TcpListener,
    ours: Hello,
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
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(timed_out());
        }
        let Some(left_time) = remaining(deadline) else {
            return Err(timed_out());
        };
        match listener.accept() {
            Ok((stream, from)) => match greet(&stream, ours, left, left_time) {
                Ok(true) => return Ok(stream),
                Ok(false) => tracing::warn!(%from, "refused a ring connection"),
                Err(e) => tracing::warn!(%from, error = %e, "bad ring handshake"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(wire::link_error(e, left, OP, timeout)),
        }
    }
}

/// Read a hello, answer it; true if accepted.
fn greet(stream: &TcpStream, ours: Hello, left: usize, time: Duration) -> std::io::Result<bool> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(time))?;
    stream.set_write_timeout(Some(time))?;
    let mut b = [0u8; Hello::LEN];
    wire::read_exact(stream, &mut b)?;
    let reply = wire::judge(Hello::decode(&b), ours, left as u64);
    wire::write_all(stream, &reply.encode())?;
    Ok(reply.verdict == Verdict::Accepted)
}
