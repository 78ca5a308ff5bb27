//! NCCL behind the `Collective` trait, for libtorch CUDA tensors (through cudarc's bindings,
//! loaded at run time: building needs no CUDA, and a CPU-only machine gets an error, not a crash).
//!
//! Setting up a group: rank 0 calls [`unique_id`] and the caller hands the 128 bytes to every
//! other rank (`join` broadcasts them over the generation's TCP ring: `cmd::join::gpu`); each rank
//! then calls [`NcclCollective::new`] with them. On a generation change the old
//! communicator is dropped (aborted if it failed) and a new one built from a new id.
//!
//! Ordering: tch never changes streams, so libtorch works on the legacy default stream of the
//! device; NCCL is given that same stream (a null `cudaStream_t`), so a collective starts after
//! the kernels that produced its input and the kernels that read its output wait for it.
//! Each call waits for the stream before returning (the trait is synchronous), polling with a
//! timeout; the communicator is non-blocking so that a dead peer turns into `ncclCommAbort` and
//! an error instead of a hang.
//!
//! `library` is NCCL itself (finding it, ids, element types, results); this file the
//! communicator and the `Collective` trait on it.

mod library;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, Result};
use library::{check, error_string, guarded, invalid, nonblocking_config};
pub use library::{nccl_type, probe, unique_id, NcclId, NcclInfo, ID_BYTES};

pub struct NcclCollective {
    comm: nc::ncclComm_t,
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
    /// Keeps the device's primary context retained and lets us bind it to this thread.
    ctx: Arc<cudarc::driver::CudaContext>,
    /// Set once the communicator failed: it was aborted and must not be used or destroyed.
    broken: bool,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self`), which NCCL allows.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Join the communicator `id` as `rank` of `world`, on GPU `device` (an index as libtorch
    /// sees it). Every rank must call this with the same id; `timeout` bounds the set-up and
    /// each later collective.
    pub fn new(
        id: &NcclId,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(invalid(
                "nccl_init",
                format!("rank {rank} of world {world}"),
            ));
        }
        probe()?;
        guarded("nccl_init", || {
            let ctx = cudarc::driver::CudaContext::new(device)
                .map_err(|e| invalid("nccl_init", format!("cuda:{device}: {e:?}")))?;
            let mut raw = nc::ncclUniqueId {
                internal: [0; ID_BYTES],
            };
            for (r, b) in raw.internal.iter_mut().zip(id.0.iter()) {
                *r = *b as std::ffi::c_char;
            }
            let mut comm: nc::ncclComm_t = std::ptr::null_mut();
            let mut config = nonblocking_config();
            // SAFETY: valid out-pointer and config; the id is plain bytes.
            let r = unsafe {
                nc::ncclCommInitRankConfig(&mut comm, world as i32, raw, rank as i32, &mut config)
            };
            check("nccl_init", r)?;
            let mut me = NcclCollective {
                comm,
                rank,
                world,
                device,
                timeout,
                ctx,
                broken: false,
            };
            me.wait_comm("nccl_init")?;
            tracing::info!(rank, world, device, "NCCL communicator ready");
            Ok(me)
        })
    }

    /// The GPU this communicator uses.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    /// Abort the communicator (any rank may; peers' pending collectives then fail).
    pub fn abort(&mut self) {
        if !self.broken && !self.comm.is_null() {
            // SAFETY: a communicator we created and have not destroyed.
            let _ = unsafe { nc::ncclCommAbort(self.comm) };
        }
        self.broken = true;
    }

    fn fail(&mut self, op: &'static str, message: String) -> CollectiveError {
        tracing::warn!(op, %message, "NCCL failed; aborting the communicator");
        self.abort();
        invalid(op, message)
    }

    fn async_error(&self) -> nc::ncclResult_t {
        let mut r = nc::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator, valid out-pointer.
        let q = unsafe { nc::ncclCommGetAsyncError(self.comm, &mut r) };
        if q != nc::ncclResult_t::ncclSuccess {
            return q;
        }
        r
    }

    /// Wait until the non-blocking communicator finished its pending call (init, enqueue).
    fn wait_comm(&mut self, op: &'static str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            match self.async_error() {
                nc::ncclResult_t::ncclSuccess => return Ok(()),
                nc::ncclResult_t::ncclInProgress => {}
                e => return Err(self.fail(op, error_string(e))),
            }
            if t0.elapsed() > self.timeout {
                let msg = format!(
                    "no progress within {:.1}s (a peer is dead or slow)",
                    self.timeout.as_secs_f64()
                );
                return Err(self.fail(op, msg));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Wait for libtorch's (legacy default) stream, i.e. the collective just enqueued on it.
    fn wait_stream(&mut self, op: &'static str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            // SAFETY: the null stream of the context bound to this thread.
            let q = unsafe { cu::cuStreamQuery(std::ptr::null_mut()) };
            match q {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(op, format!("CUDA stream error {e:?}"))),
            }
            match self.async_error() {
                nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => {}
                e => return Err(self.fail(op, error_string(e))),
            }
            if t0.elapsed() > self.timeout {
                let msg = format!(
                    "did not complete within {:.1}s (a peer is dead or slow)",
                    self.timeout.as_secs_f64()
                );
                return Err(self.fail(op, msg));
            }
            std::thread::yield_now();
        }
    }

    /// Checks shared by every operation: usable communicator, tensor on our GPU, known type.
    fn prepare(&mut self, op: &'static str, t: &Tensor) -> Result<nc::ncclDataType_t> {
        if self.broken {
            return Err(invalid(
                op,
                "the NCCL communicator was aborted; build a new one",
            ));
        }
        if t.device() != Device::Cuda(self.device) {
            return Err(invalid(
                op,
                format!(
                    "tensor is on {:?}, the communicator on cuda:{}",
                    t.device(),
                    self.device
                ),
            ));
        }
        let kind = t.f_kind().map_err(|e| invalid(op, e.to_string()))?;
        let ty =
            nccl_type(kind).ok_or_else(|| invalid(op, format!("{kind:?} has no NCCL type")))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| invalid(op, format!("{e:?}")))?;
        Ok(ty)
    }

    /// After enqueueing: the call's own status, then completion.
    fn finish(&mut self, op: &'static str, r: nc::ncclResult_t) -> Result<()> {
        if let Err(e) = check(op, r) {
            self.abort();
            return Err(e);
        }
        self.wait_comm(op)?;
        self.wait_stream(op)
    }
}

/// An in-place op ran on a contiguous copy of a strided `t`: the result goes back into `t`.
fn copy_back(op: &'static str, t: &mut Tensor, buf: &Tensor) -> Result<()> {
    if buf.data_ptr() != t.data_ptr() {
        t.f_copy_(buf).map_err(|e| invalid(op, e.to_string()))?;
    }
    Ok(())
}

fn contiguous(op: &'static str, t: &Tensor) -> Result<Tensor> {
    t.f_contiguous().map_err(|e| invalid(op, e.to_string()))
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let op = "all_reduce";
        let ty = self.prepare(op, t)?;
        let buf = contiguous(op, t)?;
        let n = buf.numel();
        let p = buf.data_ptr();
        // SAFETY: in place on a live contiguous CUDA buffer of n elements of type ty.
        let r = unsafe {
            nc::ncclAllReduce(
                p,
                p,
                n,
                ty,
                nc::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish(op, r)?;
        copy_back(op, t, &buf)
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        let op = "all_gather";
        self.prepare(op, t)?;
        let dev = t.device();
        // Dim-0 lengths may differ: gather them, pad every rank's rows to the longest.
        let mut lens = Tensor::f_zeros([self.world as i64], (Kind::Int64, dev))
            .map_err(|e| invalid(op, e.to_string()))?;
        let n0 = t.size().first().copied().unwrap_or(1);
        let _ = lens
            .f_narrow(0, self.rank as i64, 1)
            .and_then(|mut s| s.f_fill_(n0))
            .map_err(|e| invalid(op, e.to_string()))?;
        self.all_reduce_sum(&mut lens)?;
        let lens: Vec<i64> = Vec::<i64>::try_from(lens.to_device(Device::Cpu))
            .map_err(|e| invalid(op, e.to_string()))?;
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut shape = t.size();
        if shape.is_empty() {
            shape = vec![1];
        }
        let row: i64 = shape[1..].iter().product();
        let kind = t.kind();
        let padded =
            Tensor::f_zeros([max * row], (kind, dev)).map_err(|e| invalid(op, e.to_string()))?;
        padded
            .f_narrow(0, 0, n0 * row)
            .and_then(|mut d| d.f_copy_(&t.reshape([-1])))
            .map_err(|e| invalid(op, e.to_string()))?;
        let out = Tensor::f_zeros([self.world as i64 * max * row], (kind, dev))
            .map_err(|e| invalid(op, e.to_string()))?;
        let ty = self.prepare(op, &padded)?;
        // SAFETY: send max*row elements, receive world*max*row, both live contiguous buffers.
        let r = unsafe {
            nc::ncclAllGather(
                padded.data_ptr(),
                out.data_ptr(),
                (max * row) as usize,
                ty,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish(op, r)?;
        let parts: Vec<Tensor> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| out.narrow(0, i as i64 * max * row, n * row))
            .collect();
        let mut out_shape = shape.clone();
        out_shape[0] = lens.iter().sum();
        Tensor::f_cat(&parts, 0)
            .and_then(|c| c.f_reshape(&out_shape))
            .map_err(|e| invalid(op, e.to_string()))
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let op = "broadcast";
        if root >= self.world {
            return Err(invalid(op, format!("root {root} of world {}", self.world)));
        }
        let ty = self.prepare(op, t)?;
        let buf = contiguous(op, t)?;
        let p = buf.data_ptr();
        // SAFETY: in place on a live contiguous CUDA buffer.
        let r = unsafe {
            nc::ncclBroadcast(
                p,
                p,
                buf.numel(),
                ty,
                root as i32,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish(op, r)?;
        copy_back(op, t, &buf)
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = Tensor::f_ones([1], (Kind::Float, Device::Cuda(self.device)))
            .map_err(|e| invalid("barrier", e.to_string()))?;
        self.all_reduce_sum(&mut one)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.broken || self.comm.is_null() {
            return;
        }
        // A healthy communicator: finalize would wait for peers; abort frees without waiting.
        // SAFETY: a live communicator, not used after this.
        let _ = unsafe { nc::ncclCommAbort(self.comm) };
    }
}
