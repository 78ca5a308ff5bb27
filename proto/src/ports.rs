//! Loopback ports for the processes a test or a benchmark starts on one machine. Asking the
//! kernel for port 0 and closing it hands out a port from the ephemeral range: the kernel may
//! give the same one to the next ask (a coordinator once got one port for gRPC and HTTP) or
//! to any outgoing connection before the child binds it. These ports come from below that
//! range instead, each process walking its own stretch from a start drawn from its pid and
//! clock, so they are neither repeated within a process nor taken by a client's socket.

use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The lowest port handed out; below the ephemeral range (32768 on Linux by default).
const FIRST: u32 = 20_000;

static NEXT: Mutex<Option<u32>> = Mutex::new(None);

/// A loopback TCP port nobody is listening on, not handed out before by this process.
pub fn spare_loopback_port() -> std::io::Result<u16> {
    let end = ephemeral_start()
        .unwrap_or(32_768)
        .clamp(FIRST + 1_000, 65_535);
    let span = end - FIRST;
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let cursor = next.get_or_insert_with(|| seed() % span);
    for _ in 0..span {
        let port = FIRST + *cursor % span;
        *cursor = (*cursor + 1) % span;
        let port = u16::try_from(port).map_err(std::io::Error::other)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Every port below the ephemeral range is taken: let the kernel choose.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ephemeral_start() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Spreads concurrent processes' stretches apart: pid times a large odd number, plus the clock.
fn seed() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    // One test: the cursor is process-wide, and parallel test threads would move it.
    #[test]
    fn ports_are_free_distinct_below_the_ephemeral_range_and_skip_held_ones() {
        let end = ephemeral_start().unwrap_or(32_768);
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let port = spare_loopback_port().expect("port");
            assert!(seen.insert(port), "port {port} handed out twice");
            if end > FIRST + 1_000 {
                assert!(
                    (FIRST..end).contains(&u32::from(port)),
                    "{port} not below {end}"
                );
            }
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
        // The port this process would hand out next, taken by another listener first.
        let upcoming = spare_loopback_port().expect("port") + 1;
        if let Ok(_held) = TcpListener::bind(("127.0.0.1", upcoming)) {
            assert_ne!(spare_loopback_port().expect("port"), upcoming);
        }
    }
}
