//! The ring's all-gather (rows of any size per rank, in rank order) and broadcast: blocks and
//! chunks stream around the ring, each rank forwarding what it receives.

use super::{cut, invalid, RingCollective};
use crate::collective::pipe::{self, Codec, Link, INLINE_BYTES};
use crate::collective::wire::Op;
use crate::collective::Result;

impl RingCollective {
    /// Every rank's `rows` rows of `row_bytes` bytes each (`mine`), concatenated in rank
    /// order; returns the bytes and the total row count. `key` must be equal on all ranks
    /// (it identifies the row type).
    pub fn all_gather_rows(
        &mut self,
        mine: &[u8],
        rows: usize,
        row_bytes: usize,
        key: u64,
    ) -> Result<(Vec<u8>, usize)> {
        if rows.checked_mul(row_bytes) != Some(mine.len()) {
            return Err(invalid(
                "all_gather",
                format!(
                    "{} bytes are not {rows} rows of {row_bytes} bytes",
                    mine.len()
                ),
            ));
        }
        if self.world_size == 1 {
            return Ok((mine.to_vec(), rows));
        }
        let (rank, n) = (self.rank, self.world_size);
        self.operate(Op::AllGather, key, row_bytes as u64, |link, opts| {
            // Row counts first (8 bytes per rank), then the rows.
            let mut counts = vec![0u8; 8 * n];
            counts[8 * rank..8 * rank + 8].copy_from_slice(&(rows as u64).to_le_bytes());
            ring_gather(link, rank, n, &mut counts, &vec![8; n], 8)?;
            let counts: Vec<usize> = counts
                .chunks_exact(8)
                .map(|b| {
                    let mut x = [0u8; 8];
                    x.copy_from_slice(b);
                    u64::from_le_bytes(x) as usize
                })
                .collect();
            let sizes = gather_sizes(&counts, row_bytes)?;
            let total_rows: usize = counts.iter().sum();
            let mut out = vec![0u8; sizes.iter().sum()];
            let start: usize = sizes[..rank].iter().sum();
            out[start..start + mine.len()].copy_from_slice(mine);
            ring_gather(link, rank, n, &mut out, &sizes, opts.chunk_bytes)?;
            Ok((out, total_rows))
        })
    }

    /// Overwrite `data` everywhere with root's `data` (same length on every rank).
    pub fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(invalid(
                "broadcast",
                format!("root {root} is outside a world of {}", self.world_size),
            ));
        }
        if self.world_size == 1 {
            return Ok(());
        }
        let (rank, n) = (self.rank, self.world_size);
        self.operate(
            Op::Broadcast,
            data.len() as u64,
            root as u64,
            |link, opts| {
                let threaded = data.len() > INLINE_BYTES;
                let total = data.len();
                let (chunks, _) = cut(data, &[total], opts.chunk_bytes);
                let count = chunks.len();
                let forwards = (rank + 1) % n != root;
                pipe::run(link, Codec::Raw, chunks, threaded, |p| {
                    for id in 0..count {
                        if rank != root {
                            p.recv_store(id)?;
                        }
                        if rank == root || forwards {
                            p.send(id)?;
                        }
                    }
                    Ok(())
                })
            },
        )
    }
}

/// Ring all-gather of variable-size blocks of `buf` (block i belongs to rank i; this rank's
/// block is already in place). At step s, send block r−s and receive block r−s−1.
fn ring_gather(
    link: &Link<'_>,
    rank: usize,
    n: usize,
    buf: &mut [u8],
    sizes: &[usize],
    chunk_bytes: usize,
) -> Result<()> {
    if sizes.len() != n || sizes.iter().sum::<usize>() != buf.len() {
        return Err(invalid(link.op, "block sizes do not match the buffer"));
    }
    let threaded = buf.len() > INLINE_BYTES;
    let (chunks, blocks) = cut(buf, sizes, chunk_bytes);
    pipe::run(link, Codec::Raw, chunks, threaded, |p| {
        for id in blocks[rank].clone() {
            p.send(id)?;
        }
        for s in 0..n - 1 {
            let block = (rank + 2 * n - s - 1) % n;
            for id in blocks[block].clone() {
                p.recv_store(id)?;
                if s < n - 2 {
                    p.send(id)?;
                }
            }
        }
        Ok(())
    })
}

/// The most bytes one all-gather may hold: row counts come from peers, and a count beyond any
/// real batch is an error, never an allocation.
pub(crate) const MAX_GATHER_BYTES: usize = 1 << 32;

/// Each rank's bytes in an all-gather of `counts[r]` rows of `row_bytes`, checked against
/// overflow and [`MAX_GATHER_BYTES`] before anything is allocated.
pub(crate) fn gather_sizes(counts: &[usize], row_bytes: usize) -> Result<Vec<usize>> {
    let mut total = 0usize;
    let mut sizes = Vec::with_capacity(counts.len());
    for (r, &c) in counts.iter().enumerate() {
        let bytes = c
            .checked_mul(row_bytes)
            .and_then(|b| total.checked_add(b).map(|t| (b, t)))
            .filter(|&(_, t)| t <= MAX_GATHER_BYTES);
        let Some((b, t)) = bytes else {
            return Err(invalid(
                "all_gather",
                format!(
                    "rank {r} sent a row count of {c} ({row_bytes} bytes a row): more than the {MAX_GATHER_BYTES} bytes an all-gather may hold"
                ),
            ));
        };
        sizes.push(b);
        total = t;
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_peer_row_count_is_refused_before_any_allocation() {
        assert_eq!(gather_sizes(&[2, 3], 8).unwrap(), [16, 24]);
        for counts in [
            vec![1, usize::MAX],
            vec![MAX_GATHER_BYTES / 8 + 1, 0],
            vec![1 << 40, 1 << 40],
        ] {
            let e = gather_sizes(&counts, 8).unwrap_err().to_string();
            assert!(e.contains("row count") && e.contains("rank"), "{e}");
        }
    }
}
