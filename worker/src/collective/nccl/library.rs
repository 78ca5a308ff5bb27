//! NCCL itself, loaded at run time through cudarc: whether CUDA's driver and NCCL can be found
//! ([`probe`]), a group's unique id, the element type of a tensor kind, and NCCL's results as
//! `CollectiveError`s.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;
use tch::Kind;

use crate::collective::{CollectiveError, Result};

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

pub(super) fn invalid(op: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Invalid {
        op,
        message: message.into(),
    }
}

/// cudarc panics when a library or symbol is missing: turn that into an error.
pub(super) fn guarded<T>(op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

pub(super) fn error_string(r: nc::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static string.
    let p = unsafe { nc::ncclGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null static C string.
        format!("{r:?}: {}", unsafe { CStr::from_ptr(p) }.to_string_lossy())
    }
}

pub(super) fn check(op: &'static str, r: nc::ncclResult_t) -> Result<()> {
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
pub(super) fn nonblocking_config() -> nc::ncclConfig_t {
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
