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

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, Result};

/// Size of an `ncclUniqueId`.
pub const ID_BYTES: usize = 128;

/// The bytes rank 0 creates and every rank needs to join the same communicator.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId(pub [u8; ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}…)", &self.0[..8])
    }
}

impl NcclId {
    /// From bytes received over the wire (exactly 128).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let arr: [u8; ID_BYTES] = b.try_into().map_err(|_| CollectiveError::Invalid {
            op: "nccl_id",
            message: format!("an NCCL unique id has {ID_BYTES} bytes, got {}", b.len()),
        })?;
        Ok(NcclId(arr))
    }
}

/// What was found of CUDA and NCCL in this process' library search path.
#[derive(Debug, Clone)]
pub struct NcclInfo {
    /// `ncclGetVersion`, e.g. 22809 for 2.28.9.
    pub version: i32,
}

impl NcclInfo {
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }
}

fn invalid(op: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Invalid {
        op,
        message: message.into(),
    }
}

/// cudarc panics when a library or symbol is missing: turn that into an error.
fn guarded<T>(op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic in the CUDA/NCCL bindings".into());
        Err(invalid(op, msg))
    })
}

/// Check that the CUDA driver (libcuda) and NCCL (libnccl) can be loaded, and NCCL's version.
/// Never panics: a CPU-only machine gets an error naming the missing library.
pub fn probe() -> Result<NcclInfo> {
    // SAFETY: only tries to dlopen candidate names.
    if !unsafe { cu::is_culib_present() } {
        return Err(invalid(
            "nccl_probe",
            format!(
                "the CUDA driver library was not found (looked for {:?}): no NVIDIA driver on this machine",
                cudarc::get_lib_name_candidates("cuda").last()
            ),
        ));
    }
    // SAFETY: as above.
    if !unsafe { nc::is_culib_present() } {
        return Err(invalid(
            "nccl_probe",
            format!(
                "libnccl was not found on the library path (looked for {:?}); a PyTorch install has \
                 it as nvidia/nccl/lib/libnccl.so.2: put a libnccl.so link to it on LD_LIBRARY_PATH \
                 (scripts/gpu-check.sh does)",
                cudarc::get_lib_name_candidates("nccl")
            ),
        ));
    }
    guarded("nccl_probe", || {
        let mut v = 0;
        // SAFETY: writes one int.
        check("ncclGetVersion", unsafe { nc::ncclGetVersion(&mut v) })?;
        Ok(NcclInfo { version: v })
    })
}

/// A new unique id (rank 0 only), to be sent to the other ranks.
pub fn unique_id() -> Result<NcclId> {
    probe()?;
    guarded("nccl_unique_id", || {
        let id = cudarc::nccl::result::get_uniqueid()
            .map_err(|e| invalid("nccl_unique_id", error_string(e.0)))?;
        let mut out = [0u8; ID_BYTES];
        for (o, c) in out.iter_mut().zip(id.internal.iter()) {
            *o = *c as u8;
        }
        Ok(NcclId(out))
    })
}

fn error_string(r: nc::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static string.
    let p = unsafe { nc::ncclGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null static C string.
        format!("{r:?}: {}", unsafe { CStr::from_ptr(p) }.to_string_lossy())
    }
}

fn check(op: &'static str, r: nc::ncclResult_t) -> Result<()> {
    match r {
        nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(invalid(op, error_string(e))),
    }
}

/// The NCCL element type of a tensor kind.
pub fn nccl_type(kind: Kind) -> Option<nc::ncclDataType_t> {
    use nc::ncclDataType_t as T;
    Some(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Half => T::ncclFloat16,
        Kind::Double => T::ncclFloat64,
        Kind::Int64 => T::ncclInt64,
        Kind::Int => T::ncclInt32,
        Kind::Uint8 | Kind::Bool => T::ncclUint8,
        Kind::Int8 => T::ncclInt8,
        _ => return None,
    })
}

/// `ncclConfig_t` as NCCL_CONFIG_INITIALIZER sets it, non-blocking (so abort can end a hang).
fn nonblocking_config() -> nc::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    nc::ncclConfig_t {
        size: std::mem::size_of::<nc::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

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
        if buf.data_ptr() != t.data_ptr() {
            t.f_copy_(&buf).map_err(|e| invalid(op, e.to_string()))?;
        }
        Ok(())
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
        if buf.data_ptr() != t.data_ptr() {
            t.f_copy_(&buf).map_err(|e| invalid(op, e.to_string()))?;
        }
        Ok(())
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
