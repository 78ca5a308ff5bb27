//! What travels on a ring link once formed (the handshake is `handshake.rs`): the per-operation
//! header and the f32 ⇄ bf16 codec. All integers are little-endian.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::CollectiveError;

#[cfg(target_endian = "big")]
compile_error!("the ring reinterprets f32 buffers as little-endian bytes");

/// Operations, so that two ranks calling different collectives fail loudly instead of
/// exchanging garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// Sent to the right neighbour at the start of every operation; the receiver checks it equals
/// its own (same op, same sequence number, same arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub op: u32,
    pub seq: u32,
    pub a: u64,
    pub b: u64,
}

impl Header {
    pub const LEN: usize = 24;

    pub fn new(op: Op, seq: u32, a: u64, b: u64) -> Self {
        Header {
            op: op as u32,
            seq,
            a,
            b,
        }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.a.to_le_bytes());
        b[16..24].copy_from_slice(&self.b.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Self {
        let mut op = [0u8; 4];
        op.copy_from_slice(&b[..4]);
        let mut seq = [0u8; 4];
        seq.copy_from_slice(&b[4..8]);
        Header {
            op: u32::from_le_bytes(op),
            seq: u32::from_le_bytes(seq),
            a: u64_at(b, 8),
            b: u64_at(b, 16),
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Turn an I/O error on the link to `peer` into the collective error that names it.
pub(crate) fn link_error(
    e: io::Error,
    peer: usize,
    op: &'static str,
    timeout: Duration,
) -> CollectiveError {
    match e.kind() {
        // SO_RCVTIMEO / SO_SNDTIMEO expiry shows up as EAGAIN (WouldBlock) on Linux.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
            peer,
            op,
            timeout_s: timeout.as_secs_f64(),
        },
        _ => CollectiveError::Io {
            peer,
            op,
            source: e,
        },
    }
}

pub(crate) fn write_all(mut s: &TcpStream, b: &[u8]) -> io::Result<()> {
    s.write_all(b)
}

pub(crate) fn read_exact(mut s: &TcpStream, b: &mut [u8]) -> io::Result<()> {
    s.read_exact(b)
}

/// f32 → bf16 bits, round to nearest even (what torch does).
pub(crate) fn encode_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(*s);
    }
}

/// `half::bf16::from_f32(x).to_bits()` without branches, so loops over it vectorise (the
/// sender's conversion was the bf16 path's bottleneck).
#[inline]
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    // NaN: keep sign and payload's top bits, force quiet (as `half` does).
    let quiet_nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// bf16 bits → f32 is exact: the bits are the high half of an f32.
#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

pub(crate) fn add_bf16(dst: &mut [f32], src: &[u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += bf16_to_f32(*s);
    }
}

pub(crate) fn store_bf16(dst: &mut [f32], src: &[u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(*s);
    }
}

pub(crate) fn add_f32(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Round in place to what a bf16 round trip gives, so the owner of a segment ends with the
/// same values the other ranks decode from the wire.
pub(crate) fn round_to_bf16(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = bf16_to_f32(f32_to_bf16(*v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branchless_bf16_matches_half_bit_for_bit() {
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFC0_1234),
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x7F7F_8000), // rounds up to infinity
            f32::from_bits(0x3F80_8000), // tie, even stays
            f32::from_bits(0x3F81_8000), // tie, odd rounds up
        ];
        // Plus a stride through every exponent and mantissa pattern.
        let stride = (0..=u32::MAX).step_by(65_521).map(f32::from_bits);
        for x in specials.into_iter().chain(stride) {
            assert_eq!(
                f32_to_bf16(x),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn bf16_codec_rounds_to_nearest_and_decodes_exactly() {
        let src = [1.0f32, -2.5, 1.0 + 1.0 / 256.0, 3.0e-3, 65504.0];
        let mut bits = [0u16; 5];
        encode_bf16(&src, &mut bits);
        let mut back = [0f32; 5];
        store_bf16(&mut back, &bits);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: ties go to even (1.0).
        assert_eq!(back[2], 1.0);
        for (a, b) in src.iter().zip(back) {
            assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
        }
        let mut rounded = src;
        round_to_bf16(&mut rounded);
        assert_eq!(rounded, back);
        let mut acc = [1.0f32; 5];
        add_bf16(&mut acc, &bits);
        assert_eq!(acc[0], 2.0);
    }
}
