//! The ring's connection handshake. The dialer sends a hello (generation, rank, world size, a
//! nonce); the acceptor answers with its verdict, its own nonce and a proof; the dialer checks the
//! proof and sends its own; the acceptor checks it and acknowledges. A proof is HMAC-SHA256, under
//! a key derived from the run token, of the hello and the acceptor's nonce: each end shows it
//! holds the run's secret for this generation, rank and connection, so a host that reaches a
//! ring port first cannot take a neighbour's place, and a replayed handshake proves nothing.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::wire::{read_exact, write_all};

/// The ring's secret: all ranks of a run must hold the same one.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct RingKey([u8; 32]);

impl RingKey {
    /// The key of a run, derived from its token (workers present the token at Join).
    pub fn from_token(token: &str) -> RingKey {
        let mut h = Sha256::new();
        h.update(b"ferroclip ring key v1\0");
        h.update(token.as_bytes());
        RingKey(h.finalize().into())
    }
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

/// First bytes of every connection: refuses strangers (a port reused by something else).
const MAGIC: [u8; 8] = *b"FCRING02";

/// Sent by the connecting rank to its right neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub generation: u64,
    pub rank: u64,
    pub world_size: u64,
    pub nonce: [u8; 16],
}

impl Hello {
    pub const LEN: usize = 48;

    pub fn new(generation: u64, rank: u64, world_size: u64) -> Self {
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        Hello {
            generation,
            rank,
            world_size,
            nonce,
        }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.rank.to_le_bytes());
        b[24..32].copy_from_slice(&self.world_size.to_le_bytes());
        b[32..48].copy_from_slice(&self.nonce);
        b
    }

    /// `None` when the magic is wrong.
    pub fn decode(b: &[u8; Self::LEN]) -> Option<Self> {
        if b[..8] != MAGIC {
            return None;
        }
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[32..48]);
        Some(Hello {
            generation: u64_at(b, 8),
            rank: u64_at(b, 16),
            world_size: u64_at(b, 24),
            nonce,
        })
    }
}

/// The acceptor's answer to a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accepted,
    WrongGeneration,
    WrongRank,
    WrongWorldSize,
    BadMagic,
    /// A proof did not check out: the other end does not hold this run's key.
    BadProof,
}

impl Verdict {
    fn code(self) -> u64 {
        match self {
            Verdict::Accepted => 0,
            Verdict::WrongGeneration => 1,
            Verdict::WrongRank => 2,
            Verdict::WrongWorldSize => 3,
            Verdict::BadMagic => 4,
            Verdict::BadProof => 5,
        }
    }

    fn from_code(c: u64) -> Option<Self> {
        Some(match c {
            0 => Verdict::Accepted,
            1 => Verdict::WrongGeneration,
            2 => Verdict::WrongRank,
            3 => Verdict::WrongWorldSize,
            4 => Verdict::BadMagic,
            5 => Verdict::BadProof,
            _ => return None,
        })
    }
}

/// Verdict plus the acceptor's own (generation, expected rank, world size) for the error
/// message, its nonce and its proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply {
    pub verdict: Verdict,
    pub generation: u64,
    pub expected_rank: u64,
    pub world_size: u64,
    pub nonce: [u8; 16],
    pub proof: [u8; 32],
}

impl Reply {
    pub const LEN: usize = 80;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.verdict.code().to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.expected_rank.to_le_bytes());
        b[24..32].copy_from_slice(&self.world_size.to_le_bytes());
        b[32..48].copy_from_slice(&self.nonce);
        b[48..80].copy_from_slice(&self.proof);
        b
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Option<Self> {
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[32..48]);
        let mut proof = [0u8; 32];
        proof.copy_from_slice(&b[48..80]);
        Some(Reply {
            verdict: Verdict::from_code(u64_at(b, 0))?,
            generation: u64_at(b, 8),
            expected_rank: u64_at(b, 16),
            world_size: u64_at(b, 24),
            nonce,
            proof,
        })
    }
}

/// Judge a connecting neighbour's hello against what this rank expects.
pub(crate) fn judge(hello: Option<Hello>, ours: Hello, expected_left: u64) -> Verdict {
    match hello {
        None => Verdict::BadMagic,
        Some(h) if h.generation != ours.generation => Verdict::WrongGeneration,
        Some(h) if h.world_size != ours.world_size => Verdict::WrongWorldSize,
        Some(h) if h.rank != expected_left => Verdict::WrongRank,
        Some(_) => Verdict::Accepted,
    }
}

/// The proof of `role`: HMAC of the hello and the acceptor's nonce.
fn proof(key: &RingKey, role: &[u8], hello: &[u8; Hello::LEN], nonce: &[u8; 16]) -> [u8; 32] {
    hmac(&key.0, &[role, hello, nonce])
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts` under a 32-byte key.
fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut pad = [0u8; 64];
    pad[..32].copy_from_slice(key);
    let keyed = |x: u8| pad.map(|b| b ^ x);
    let mut inner = Sha256::new().chain_update(keyed(0x36));
    for p in parts {
        inner.update(p);
    }
    Sha256::new()
        .chain_update(keyed(0x5c))
        .chain_update(inner.finalize())
        .finalize()
        .into()
}

/// Equal in time independent of where the first difference is.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn invalid_data(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

/// The dialer's side on a connected stream. Returns the acceptor's reply: `Accepted` only when
/// both proofs checked out; an acceptor without the key is an error (not a refusal), so the
/// caller retries until the real neighbour answers or the deadline passes.
pub(crate) fn dial(stream: &TcpStream, hello: Hello, key: &RingKey) -> io::Result<Reply> {
    let sent = hello.encode();
    write_all(stream, &sent)?;
    let mut b = [0u8; Reply::LEN];
    read_exact(stream, &mut b)?;
    let mut reply = Reply::decode(&b).ok_or_else(|| invalid_data("malformed handshake reply"))?;
    if reply.verdict != Verdict::Accepted {
        return Ok(reply);
    }
    if !same(&reply.proof, &proof(key, b"acceptor", &sent, &reply.nonce)) {
        return Err(invalid_data(
            "the right neighbour's handshake proof is wrong: it does not hold this run's key",
        ));
    }
    write_all(stream, &proof(key, b"dialer", &sent, &reply.nonce))?;
    let mut ack = [0u8; 8];
    read_exact(stream, &mut ack)?;
    reply.verdict = Verdict::from_code(u64_at(&ack, 0)).unwrap_or(Verdict::BadProof);
    Ok(reply)
}

/// The acceptor's side: read a hello, answer, check the dialer's proof. True if the dialer is
/// the expected left neighbour and holds the key. `time` bounds the whole handshake.
pub(crate) fn answer(
    stream: &TcpStream,
    ours: Hello,
    left: u64,
    key: &RingKey,
    time: Duration,
) -> io::Result<bool> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(time))?;
    stream.set_write_timeout(Some(time))?;
    let mut b = [0u8; Hello::LEN];
    read_exact(stream, &mut b)?;
    let verdict = judge(Hello::decode(&b), ours, left);
    let mut nonce = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut nonce);
    let reply = Reply {
        verdict,
        generation: ours.generation,
        expected_rank: left,
        world_size: ours.world_size,
        nonce,
        proof: proof(key, b"acceptor", &b, &nonce),
    };
    write_all(stream, &reply.encode())?;
    if verdict != Verdict::Accepted {
        return Ok(false);
    }
    let mut theirs = [0u8; 32];
    read_exact(stream, &mut theirs)?;
    let ok = same(&theirs, &proof(key, b"dialer", &b, &nonce));
    let ack = if ok {
        Verdict::Accepted
    } else {
        Verdict::BadProof
    };
    write_all(stream, &ack.code().to_le_bytes())?;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_rfc_4231s_test_case_2() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac(&key, &[b"what do ya ", b"want for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn proofs_are_bound_to_key_role_and_nonce() {
        // Different tokens, different keys; the same token, the same key.
        assert_eq!(RingKey::from_token("a"), RingKey::from_token("a"));
        assert_ne!(RingKey::from_token("a"), RingKey::from_token("b"));
        let hello = Hello::new(3, 1, 4).encode();
        let nonce = [7u8; 16];
        let k = RingKey::from_token("t");
        let p = proof(&k, b"dialer", &hello, &nonce);
        assert_eq!(p, proof(&k, b"dialer", &hello, &nonce));
        assert_ne!(p, proof(&k, b"acceptor", &hello, &nonce), "roles differ");
        assert_ne!(
            p,
            proof(&RingKey::from_token("u"), b"dialer", &hello, &nonce)
        );
        assert_ne!(
            p,
            proof(&k, b"dialer", &hello, &[8u8; 16]),
            "bound to the nonce"
        );
        assert!(format!("{k:?}").contains(".."), "the key is never printed");
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let h = Hello::new(9, 2, 5);
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        assert_eq!(Hello::decode(&[0u8; Hello::LEN]), None);
        // The acceptor of rank 3 expects rank 2 of 5 at generation 9.
        let ours = Hello::new(9, 3, 5);
        assert_eq!(judge(Some(h), ours, 2), Verdict::Accepted);
        let stale = Hello { generation: 8, ..h };
        assert_eq!(judge(Some(stale), ours, 2), Verdict::WrongGeneration);
        assert_eq!(judge(Some(h), ours, 1), Verdict::WrongRank);
        let other = Hello { world_size: 4, ..h };
        assert_eq!(judge(Some(other), ours, 2), Verdict::WrongWorldSize);
        assert_eq!(judge(None, ours, 2), Verdict::BadMagic);
        let r = Reply {
            verdict: Verdict::BadProof,
            generation: 1,
            expected_rank: 2,
            world_size: 3,
            nonce: [1; 16],
            proof: [2; 32],
        };
        assert_eq!(Reply::decode(&r.encode()), Some(r));
        let mut junk = r.encode();
        junk[0] = 99;
        assert_eq!(Reply::decode(&junk), None);
    }
}
