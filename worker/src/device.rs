//! Which device this worker trains on: `--device cpu|cuda|cuda:N`, LOCAL_RANK, and the CUDA half
//! of libtorch loaded at start-up only when a GPU is asked for, so one binary (built against a
//! CPU-only libtorch) runs on CPU-only and GPU machines alike.
//!
//! The parsing and selection rules are pure functions of their inputs (tested without a GPU);
//! `select` is the one place that reads the environment and touches the loader.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// What `--device` asked for, before LOCAL_RANK and the visible GPUs are considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    /// `cuda` (index from LOCAL_RANK, else 0) or `cuda:N`.
    Cuda(Option<usize>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("--device {0:?}: expected cpu, cuda or cuda:N")]
    BadSpec(String),
    #[error("LOCAL_RANK={0:?} is not a non-negative integer")]
    BadLocalRank(String),
    #[error(
        "cannot tell where libtorch is loaded from (libtorch_cpu.so is not in /proc/self/maps)"
    )]
    LibtorchDirUnknown,
    #[error(
        "{requested} requested but libtorch_cuda.so was not found in {dir}: this libtorch is \
         CPU-only; point LIBTORCH at a CUDA libtorch or use LIBTORCH_USE_PYTORCH"
    )]
    CudaLibMissing { requested: String, dir: String },
    #[error("{requested} requested but loading {path} failed: {message}")]
    CudaLoad {
        requested: String,
        path: String,
        message: String,
    },
    #[error("{requested} requested but no GPU is visible{}", visible_note(.cuda_visible_devices))]
    NoGpu {
        requested: String,
        cuda_visible_devices: Option<String>,
    },
    #[error("cuda:{index} requested but only {count} GPU{} visible{}",
        if *.count == 1 { " is" } else { "s are" }, visible_note(.cuda_visible_devices))]
    OutOfRange {
        index: usize,
        count: usize,
        cuda_visible_devices: Option<String>,
    },
}

fn visible_note(cvd: &Option<String>) -> String {
    match cvd {
        Some(v) => format!(" (CUDA_VISIBLE_DEVICES={v:?})"),
        None => String::new(),
    }
}

/// `cpu`, `cuda`, `cuda:N` (case-insensitive, surrounding blanks ignored).
pub fn parse(spec: &str) -> Result<DeviceRequest, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(DeviceRequest::Cpu),
        "cuda" | "gpu" => Ok(DeviceRequest::Cuda(None)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| DeviceRequest::Cuda(Some(n)))
            .ok_or_else(|| DeviceError::BadSpec(spec.to_string())),
    }
}

/// The CUDA ordinal to use: an explicit `cuda:N` wins; plain `cuda` means one process per
/// visible GPU, so the index is LOCAL_RANK (as torchrun sets it), else 0. None for the CPU.
pub fn cuda_index(
    req: DeviceRequest,
    local_rank: Option<&str>,
) -> Result<Option<usize>, DeviceError> {
    match req {
        DeviceRequest::Cpu => Ok(None),
        DeviceRequest::Cuda(Some(n)) => Ok(Some(n)),
        DeviceRequest::Cuda(None) => match local_rank.map(str::trim) {
            None | Some("") => Ok(Some(0)),
            Some(v) => v
                .parse::<usize>()
                .map(Some)
                .map_err(|_| DeviceError::BadLocalRank(v.to_string())),
        },
    }
}

/// How many GPUs CUDA_VISIBLE_DEVICES lets through, when it says: None when unset (all
/// GPUs), Some(0) for "" or a list starting with -1 (CUDA stops at the first invalid entry).
pub fn visible_limit(cuda_visible_devices: Option<&str>) -> Option<usize> {
    let v = cuda_visible_devices?.trim();
    if v.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    for entry in v.split(',').map(str::trim) {
        if entry.is_empty() || entry.starts_with('-') {
            break;
        }
        n += 1;
    }
    Some(n)
}

/// The index checked against the GPUs libtorch sees (indices are relative to
/// CUDA_VISIBLE_DEVICES, as in CUDA itself).
pub fn check_index(
    index: usize,
    count: usize,
    cuda_visible_devices: Option<&str>,
) -> Result<(), DeviceError> {
    let cvd = cuda_visible_devices.map(str::to_string);
    if count == 0 {
        return Err(DeviceError::NoGpu {
            requested: format!("cuda:{index}"),
            cuda_visible_devices: cvd,
        });
    }
    if index >= count {
        return Err(DeviceError::OutOfRange {
            index,
            count,
            cuda_visible_devices: cvd,
        });
    }
    Ok(())
}

/// Where libtorch's CUDA library must be: beside `libtorch_cpu.so`.
pub fn cuda_lib_path(libtorch_lib_dir: &Path) -> PathBuf {
    libtorch_lib_dir.join("libtorch_cuda.so")
}

/// `tch::Device` → "cpu" / "cuda:N".
pub fn name(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Dlopen a library into the global namespace (its symbols serve libraries loaded later).
/// The handle is never closed: libtorch's CUDA half must stay loaded for the process' life.
pub fn dlopen_global(path: &Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: a valid C string; dlerror is read right after on this thread.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let e = unsafe { libc::dlerror() };
        let msg = if e.is_null() {
            "dlopen failed".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
            unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
        };
        return Err(msg);
    }
    Ok(())
}

/// Load libtorch_cuda.so from `lib_dir` (once per process), then check the GPU `index`.
fn open_cuda(index: usize, lib_dir: &Path, cvd: Option<&str>) -> Result<(), DeviceError> {
    let requested = format!("cuda:{index}");
    let path = cuda_lib_path(lib_dir);
    if !path.exists() {
        return Err(DeviceError::CudaLibMissing {
            requested,
            dir: lib_dir.display().to_string(),
        });
    }
    dlopen_global(&path).map_err(|message| DeviceError::CudaLoad {
        requested,
        path: path.display().to_string(),
        message,
    })?;
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    check_index(index, count, cvd)
}

/// Resolve `--device` against the environment (LOCAL_RANK, CUDA_VISIBLE_DEVICES), loading
/// libtorch's CUDA library when a GPU is asked for.
pub fn select(spec: &str) -> Result<tch::Device, DeviceError> {
    let req = parse(spec)?;
    let local_rank = std::env::var("LOCAL_RANK").ok();
    let Some(index) = cuda_index(req, local_rank.as_deref())? else {
        return Ok(tch::Device::Cpu);
    };
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    if visible_limit(cvd.as_deref()) == Some(0) {
        return Err(DeviceError::NoGpu {
            requested: format!("cuda:{index}"),
            cuda_visible_devices: cvd,
        });
    }
    let lib_dir = crate::libtorch::loaded_lib_dir().ok_or(DeviceError::LibtorchDirUnknown)?;
    open_cuda(index, &lib_dir, cvd.as_deref())?;
    tracing::info!(device = %format!("cuda:{index}"), lib_dir = %lib_dir.display(), "CUDA libtorch loaded");
    Ok(tch::Device::Cuda(index))
}

/// Make CUDA autocast use bf16 (libtorch's default is fp16; tch has no call for the dtype):
/// `at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, c10::ScalarType::BFloat16)`
/// looked up in the loaded libtorch. Both enums are int8 in C++; the call passes them as ints.
pub fn set_autocast_bf16() -> anyhow::Result<()> {
    const SET: &[u8] = b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0";
    const GET: &[u8] = b"_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE\0";
    const CUDA: i8 = 1;
    const BFLOAT16: i8 = 15;
    // SAFETY: dlsym on the global namespace with NUL-terminated names.
    let (set, get) = unsafe {
        (
            libc::dlsym(libc::RTLD_DEFAULT, SET.as_ptr().cast()),
            libc::dlsym(libc::RTLD_DEFAULT, GET.as_ptr().cast()),
        )
    };
    if set.is_null() || get.is_null() {
        anyhow::bail!("at::autocast::set_autocast_dtype is not exported by this libtorch");
    }
    // SAFETY: the C++ functions take (DeviceType, ScalarType) / (DeviceType), int8 enums.
    type SetFn = extern "C" fn(i8, i8);
    type GetFn = extern "C" fn(i8) -> i8;
    let (set, get) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, SetFn>(set),
            std::mem::transmute::<*mut libc::c_void, GetFn>(get),
        )
    };
    set(CUDA, BFLOAT16);
    let now = get(CUDA);
    if now != BFLOAT16 {
        anyhow::bail!("autocast dtype is {now} after setting bf16 ({BFLOAT16})");
    }
    Ok(())
}
