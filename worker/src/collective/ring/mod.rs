//! The TCP ring: every rank sends to its right neighbour and receives from its left one.
//!
//! All-reduce is the bandwidth-optimal ring (reduce-scatter, then all-gather), each rank sending
//! 2(n−1)/n of the buffer; all-gather and broadcast stream around the same ring. Blocking
//! std::net sockets with SO_RCVTIMEO/SO_SNDTIMEO give the timeouts; see `pipe` for the engine.
//! When every rank is on this host, all-reduce moves its data through shared memory instead
//! (`shm`), the TCP links only carrying doorbells.
//!
//! This file forms the ring and runs one operation (`operate`: headers, poisoning on error);
//! `all_reduce` and `gather` (all-gather, broadcast) are the algorithms.

mod all_reduce;
mod gather;

#[cfg(test)]
pub(crate) use gather::MAX_GATHER_BYTES;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use tch::{Kind, Tensor};

pub use super::handshake::RingKey;
use super::host::{check_cpu, f32_data, row_key, tensor_bytes};
use super::pipe::Link;
use super::rendezvous;
use super::shm::{self, Shm};
use super::wire::{self, Header, Op};
use super::{Collective, CollectiveError, Result};

/// Number format of all-reduce payloads on the wire (`cluster.allreduce_dtype`; accumulation is
/// always f32): with bf16, half the bytes; values are rounded to bf16 at every hop and all ranks
/// end bit-identical. And how payloads move between ranks (`cluster.transport`): shared memory
/// when every rank is on this host (`Auto`), TCP, or shared memory or fail (`Shm`).
pub use ferroclip_proto::config::{Transport, WireFormat as WireDtype};

#[derive(Debug, Clone)]
pub struct RingOptions {
    /// A peer silent for this long (or a write stuck this long) fails the operation; also the
    /// deadline for forming the ring in `connect`.
    pub timeout: Duration,
    /// Pipelining unit: the buffer moves in chunks of about this many bytes.
    pub chunk_bytes: usize,
    pub dtype: WireDtype,
    /// Membership generation: only neighbours of the same generation are accepted.
    pub generation: u64,
    pub transport: Transport,
    /// Shared-memory pipelining unit (one doorbell per chunk).
    pub shm_chunk_bytes: usize,
    /// The run's secret the handshake proves (`RingKey::from_token`); every rank must agree.
    pub key: RingKey,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            timeout: Duration::from_secs(60),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            dtype: WireDtype::Fp32,
            generation: 0,
            transport: Transport::Auto,
            shm_chunk_bytes: DEFAULT_SHM_CHUNK_BYTES,
            key: RingKey::default(),
        }
    }
}

/// Measured in bench/README-allreduce.md: large enough to amortise syscalls, small enough
/// to stay in L2 while a chunk is reduced and forwarded.
pub const DEFAULT_CHUNK_BYTES: usize = 64 * 1024;

/// Measured in bench/README-allreduce.md: each doorbell costs a wake-up, so chunks are large;
/// 2 MiB still pipelines the 16–100 MiB buffers that matter.
pub const DEFAULT_SHM_CHUNK_BYTES: usize = 2 << 20;

/// The all-gather key of the host-id exchange at connect (a rank expecting another first
/// operation fails on the header).
const HOST_ID_KEY: u64 = 0x4643_5348_4d48_4f53;

struct Links {
    left: TcpStream,
    right: TcpStream,
}

pub struct RingCollective {
    rank: usize,
    world_size: usize,
    opts: RingOptions,
    /// `None` when the world size is 1.
    links: Option<Links>,
    /// Operation counter, checked against the left neighbour's at every operation.
    seq: u32,
    /// Set by the first error: the ring is then unusable (a new generation builds a new one).
    broken: Option<String>,
    /// Shared-memory all-reduce, when every rank is on this host.
    shm: Option<Shm>,
}

impl std::fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("generation", &self.opts.generation)
            .field("broken", &self.broken)
            .field("transport", &self.transport())
            .finish()
    }
}

pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Invalid {
        op,
        message: message.into(),
    }
}

impl RingCollective {
    /// Form the ring: connect to the right neighbour, accept the left one on `listener` (the
    /// address this rank advertised as `peers[rank]`). Fails with `Timeout` naming a neighbour
    /// that does not show up within `opts.timeout`, and with `Invalid` when the right neighbour
    /// refuses us (another generation, rank or world size).
    pub fn connect(
        rank: usize,
        peers: &[String],
        listener: TcpListener,
        opts: RingOptions,
    ) -> Result<Self> {
        const OP: &str = "connect";
        let world_size = peers.len();
        if world_size == 0 {
            return Err(invalid(OP, "the peer list is empty"));
        }
        if rank >= world_size {
            return Err(invalid(
                OP,
                format!("rank {rank} is outside a world of {world_size}"),
            ));
        }
        if opts.timeout.is_zero() {
            return Err(invalid(OP, "the timeout must be positive"));
        }
        if opts.chunk_bytes < 8 || opts.shm_chunk_bytes < 4 {
            return Err(invalid(
                OP,
                format!(
                    "chunk_bytes {} is below 8 or shm_chunk_bytes {} below 4",
                    opts.chunk_bytes, opts.shm_chunk_bytes
                ),
            ));
        }
        let mut ring = RingCollective {
            rank,
            world_size,
            opts,
            links: None,
            seq: 0,
            broken: None,
            shm: None,
        };
        if world_size == 1 {
            return Ok(ring);
        }
        let (left_stream, right_stream) = rendezvous::form(
            rank,
            peers,
            &listener,
            ring.opts.generation,
            ring.opts.key,
            ring.opts.timeout,
        )?;
        ring.links = Some(Links {
            left: left_stream,
            right: right_stream,
        });
        if ring.opts.transport != Transport::Tcp {
            ring.negotiate_shm()?;
        }
        tracing::debug!(
            rank,
            world_size,
            generation = ring.opts.generation,
            transport = ?ring.transport(),
            "ring formed"
        );
        Ok(ring)
    }

    /// Exchange host ids; when all are equal, all-reduce goes through shared memory.
    fn negotiate_shm(&mut self) -> Result<()> {
        const OP: &str = "connect";
        // Unknown host ids never match (a flag byte, then the id).
        let mut mine = [0u8; 9];
        if let Some(id) = shm::host_id() {
            mine[0] = 1;
            mine[1..].copy_from_slice(&id.to_le_bytes());
        }
        let (all, _) = self.all_gather_rows(&mine, 1, mine.len(), HOST_ID_KEY)?;
        let others: Vec<usize> = all
            .chunks_exact(mine.len())
            .enumerate()
            .filter(|(_, id)| id[0] == 0 || *id != mine)
            .map(|(r, _)| r)
            .collect();
        if others.is_empty() {
            self.shm = Some(Shm::new(self.rank, self.opts.generation));
        } else if self.opts.transport == Transport::Shm {
            return Err(invalid(
                OP,
                format!(
                    "transport \"shm\" needs every rank on one host (with one /dev/shm); ranks {others:?} are not on this rank's"
                ),
            ));
        } else {
            tracing::info!(
                rank = self.rank,
                ?others,
                "ranks on other hosts: all-reduce over TCP"
            );
        }
        Ok(())
    }

    pub fn options(&self) -> &RingOptions {
        &self.opts
    }

    /// The transport all-reduce uses (settled when the ring formed).
    pub fn transport(&self) -> Transport {
        if self.shm.is_some() {
            Transport::Shm
        } else {
            Transport::Tcp
        }
    }

    fn left(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    fn right(&self) -> usize {
        (self.rank + 1) % self.world_size
    }

    /// Run one operation: refuse if broken, exchange and check headers, run `body`, and poison
    /// the ring on any error (closing the sockets tells the neighbours at once).
    fn operate<R>(
        &mut self,
        op: Op,
        a: u64,
        b: u64,
        body: impl FnOnce(&Link<'_>, &RingOptions) -> Result<R>,
    ) -> Result<R> {
        if let Some(why) = &self.broken {
            return Err(invalid(
                op.name(),
                format!("the ring is unusable after an earlier error: {why}"),
            ));
        }
        let Some(links) = &self.links else {
            return Err(invalid(op.name(), "no links (world size 1)"));
        };
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let link = Link {
            left: &links.left,
            right: &links.right,
            left_rank: self.left(),
            right_rank: self.right(),
            timeout: self.opts.timeout,
            op: op.name(),
        };
        let out = exchange_header(&link, Header::new(op, seq, a, b))
            .and_then(|()| body(&link, &self.opts));
        if let Err(e) = &out {
            let _ = links.left.shutdown(Shutdown::Both);
            let _ = links.right.shutdown(Shutdown::Both);
            self.broken = Some(e.to_string());
            tracing::warn!(rank = self.rank, error = %e, "ring collective failed");
        }
        out
    }
}

/// Cut `buf` into consecutive parts of `part_bytes` and each part into chunks of at most
/// `chunk_bytes`. Returns the chunks and, per part, the range of its chunk ids.
fn cut<'a>(
    mut buf: &'a mut [u8],
    part_bytes: &[usize],
    chunk_bytes: usize,
) -> (Vec<&'a mut [u8]>, Vec<std::ops::Range<usize>>) {
    let mut chunks = Vec::new();
    let mut parts = Vec::with_capacity(part_bytes.len());
    for &len in part_bytes {
        let len = len.min(buf.len());
        let (mut part, rest) = std::mem::take(&mut buf).split_at_mut(len);
        buf = rest;
        let start = chunks.len();
        while !part.is_empty() {
            let k = part.len().min(chunk_bytes);
            let (c, rest) = std::mem::take(&mut part).split_at_mut(k);
            chunks.push(c);
            part = rest;
        }
        parts.push(start..chunks.len());
    }
    (chunks, parts)
}

fn exchange_header(link: &Link<'_>, ours: Header) -> Result<()> {
    wire::write_all(link.right, &ours.encode()).map_err(|e| link.write_err(e))?;
    let mut b = [0u8; Header::LEN];
    wire::read_exact(link.left, &mut b).map_err(|e| link.read_err(e))?;
    let theirs = Header::decode(&b);
    if theirs != ours {
        return Err(invalid(
            link.op,
            format!(
                "out of step with rank {}: it sent {} (op {}, #{}, args {}, {}) but this rank is at {} #{} (args {}, {})",
                link.left_rank,
                op_name(theirs.op),
                theirs.op,
                theirs.seq,
                theirs.a,
                theirs.b,
                link.op,
                ours.seq,
                ours.a,
                ours.b
            ),
        ));
    }
    Ok(())
}

fn op_name(code: u32) -> &'static str {
    [Op::AllReduce, Op::AllGather, Op::Broadcast, Op::Barrier]
        .into_iter()
        .find(|op| *op as u32 == code)
        .map_or("an unknown operation", Op::name)
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        if !t.is_contiguous() && t.defined() {
            let mut c = t.contiguous();
            self.all_reduce_sum(&mut c)?;
            return t
                .f_copy_(&c)
                .map_err(|e| invalid("all_reduce", e.to_string()));
        }
        if t.defined() && t.f_kind().ok() == Some(Kind::Double) {
            return self.all_reduce_f64(t);
        }
        let data = f32_data(t, "all_reduce")?;
        self.all_reduce_f32(data)
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        check_cpu(t, OP)?;
        let size = t.size();
        if size.is_empty() {
            return Err(invalid(OP, "needs a tensor with at least one dimension"));
        }
        let kind = t.f_kind().map_err(|e| invalid(OP, e.to_string()))?;
        let mut mine = t.contiguous();
        let key = row_key(kind, &size[1..]);
        let row_bytes = size[1..].iter().product::<i64>() as usize * kind.elt_size_in_bytes();
        let (gathered, rows) = {
            let bytes = tensor_bytes(&mut mine, OP)?;
            self.all_gather_rows(bytes, size[0] as usize, row_bytes, key)?
        };
        let mut shape = size.clone();
        shape[0] = rows as i64;
        Tensor::f_from_data_size(&gathered, &shape, kind).map_err(|e| invalid(OP, e.to_string()))
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        if !t.is_contiguous() && t.defined() {
            let mut c = t.contiguous();
            self.broadcast(&mut c, root)?;
            return t.f_copy_(&c).map_err(|e| invalid(OP, e.to_string()));
        }
        let bytes = tensor_bytes(t, OP)?;
        self.broadcast_bytes(bytes, root)
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        let n = self.world_size;
        // The header exchange proves the left neighbour arrived; after n−2 more token passes
        // every rank has heard (transitively) from every other.
        self.operate(Op::Barrier, 0, 0, |link, _| {
            for _ in 0..n.saturating_sub(2) {
                wire::write_all(link.right, &[1u8]).map_err(|e| link.write_err(e))?;
                let mut b = [0u8; 1];
                wire::read_exact(link.left, &mut b).map_err(|e| link.read_err(e))?;
            }
            Ok(())
        })
    }
}
