//! The ring's all-reduce: f32 by reduce-scatter then all-gather around the ring (or through
//! shared memory, `shm`), f64 by gathering every buffer and adding in rank order.

use tch::Tensor;

use super::{cut, invalid, RingCollective, WireDtype};
use crate::collective::host::check_cpu;
use crate::collective::pipe::{self, Codec, INLINE_BYTES};
use crate::collective::wire::Op;
use crate::collective::{Collective, Result};

impl RingCollective {
    /// Sum `data` across ranks in place.
    pub fn all_reduce_f32(&mut self, data: &mut [f32]) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        let dtype_code = match self.opts.dtype {
            WireDtype::Fp32 => 0,
            WireDtype::Bf16 => 1,
        };
        let (rank, n) = (self.rank, self.world_size);
        if let Some(mut shm) = self.shm.take() {
            // Shared memory has no wire: the sum is exact f32 whatever `dtype` says.
            let chunk = self.opts.shm_chunk_bytes / 4;
            let out = self.operate(
                Op::AllReduce,
                data.len() as u64,
                ((chunk as u64) << 8) | 0x5A,
                |link, _| {
                    if data.is_empty() {
                        return Ok(());
                    }
                    shm.all_reduce(link, rank, n, data, chunk)
                },
            );
            self.shm = Some(shm);
            return out;
        }
        self.operate(
            Op::AllReduce,
            data.len() as u64,
            dtype_code,
            |link, opts| {
                if data.is_empty() {
                    return Ok(());
                }
                let codec = match opts.dtype {
                    WireDtype::Fp32 => Codec::Raw,
                    WireDtype::Bf16 => Codec::Bf16,
                };
                let threaded = data.len() * 4 > INLINE_BYTES;
                let seg_bytes: Vec<usize> =
                    (0..n).map(|i| segment_len(data.len(), n, i) * 4).collect();
                // Chunks hold whole f32s.
                let chunk = (opts.chunk_bytes / 4).max(1) * 4;
                let (chunks, segs) = cut(bytemuck::cast_slice_mut(data), &seg_bytes, chunk);
                pipe::run(link, codec, chunks, threaded, |p| {
                    // Reduce-scatter: at step s send segment r−s, receive and add segment r−s−1.
                    // Each received chunk is forwarded at once (it is what step s+1 sends); after the
                    // last step this rank owns segment r+1, fully reduced.
                    for id in segs[rank].clone() {
                        p.send(id)?;
                    }
                    for s in 0..n - 1 {
                        let seg = (rank + 2 * n - s - 1) % n;
                        for id in segs[seg].clone() {
                            p.recv_add(id)?;
                            if s == n - 2 {
                                p.round_for_wire(id)?;
                            }
                            p.send(id)?;
                        }
                    }
                    // All-gather: at step s receive segment r−s, forward it unless it is the last.
                    for s in 0..n - 1 {
                        let seg = (rank + n - s) % n;
                        for id in segs[seg].clone() {
                            p.recv_store(id)?;
                            if s < n - 2 {
                                p.send(id)?;
                            }
                        }
                    }
                    Ok(())
                })
            },
        )
    }

    /// f64 sums, for gradient checks and exactness tests (training all-reduces f32): every rank
    /// gathers every buffer and adds them in rank order, so all ranks get the same bits. Moves
    /// n× the bytes of the ring all-reduce; tests use small models.
    pub(super) fn all_reduce_f64(&mut self, t: &mut Tensor) -> Result<()> {
        const OP: &str = "all_reduce";
        check_cpu(t, OP)?;
        if self.world_size == 1 {
            return Ok(());
        }
        let numel = t.numel() as i64;
        let err = |e: tch::TchError| invalid(OP, e.to_string());
        let all = self.all_gather(&t.f_reshape([1, numel]).map_err(err)?)?;
        let mut sum = all.f_get(0).map_err(err)?.copy();
        for r in 1..self.world_size as i64 {
            sum = sum.f_add(&all.f_get(r).map_err(err)?).map_err(err)?;
        }
        t.f_copy_(&sum.f_view(t.size().as_slice()).map_err(err)?)
            .map_err(err)
    }
}

/// Length of segment `i` when `len` items are split in `n` nearly equal parts.
fn segment_len(len: usize, n: usize, i: usize) -> usize {
    len / n + usize::from(i < len % n)
}
