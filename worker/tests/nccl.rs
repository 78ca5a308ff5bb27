//! The NCCL backend on a machine without NVIDIA libraries: it must say what is missing and
//! never panic (cudarc's dynamic loading panics when a library is absent).

use std::time::Duration;

use ferroclip_worker::collective::nccl::{nccl_type, probe, unique_id, NcclCollective, NcclId};
use tch::Kind;

fn has(names: &[&str]) -> bool {
    names.iter().any(|n| {
        let c = std::ffi::CString::new(*n).expect("no NUL");
        // SAFETY: a plain dlopen probe of a library name; the handle is closed at once.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY) };
        if !h.is_null() {
            // SAFETY: the handle we just opened.
            unsafe { libc::dlclose(h) };
        }
        !h.is_null()
    })
}

/// The message to expect here: the driver is checked first, then NCCL.
fn expected_missing() -> Option<&'static str> {
    if !has(&["libcuda.so", "libcuda.so.1"]) {
        Some("CUDA driver library was not found")
    } else if !has(&["libnccl.so", "libnccl.so.1"]) {
        Some("libnccl was not found")
    } else {
        None
    }
}

#[test]
fn missing_libraries_are_a_clear_error_not_a_panic() {
    let Some(want) = expected_missing() else {
        // An NVIDIA machine: the probe must then succeed and report a version.
        let info = probe().expect("libcuda and libnccl load");
        assert!(info.version >= 20000, "{}", info.version_string());
        return;
    };
    let e = probe().expect_err("no NVIDIA libraries here");
    assert!(e.to_string().contains(want), "{e}");
    assert_eq!(e.suspect(), None, "no peer is to blame");
    let e = unique_id().expect_err("no id without NCCL");
    assert!(e.to_string().contains(want), "{e}");
    let id = NcclId([7; 128]);
    let e = NcclCollective::new(&id, 0, 1, 0, Duration::from_secs(1))
        .err()
        .expect("no communicator without NCCL");
    assert!(e.to_string().contains(want), "{e}");
    // The process is unharmed: libtorch still works.
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0]).sum(Kind::Float);
    assert_eq!(t.double_value(&[]), 3.0);
}

#[test]
fn bad_rank_is_rejected_before_loading_anything() {
    let id = NcclId([0; 128]);
    let e = NcclCollective::new(&id, 2, 2, 0, Duration::from_secs(1))
        .err()
        .expect("rank 2 of 2 is invalid");
    assert!(e.to_string().contains("rank 2 of world 2"), "{e}");
}

#[test]
fn unique_id_bytes_round_trip() {
    let bytes: Vec<u8> = (0..128u32).map(|i| (i * 7 % 251) as u8).collect();
    let id = NcclId::from_bytes(&bytes).expect("128 bytes");
    assert_eq!(id.0.as_slice(), bytes.as_slice());
    let e = NcclId::from_bytes(&bytes[..100]).expect_err("short id");
    assert!(e.to_string().contains("128 bytes, got 100"), "{e}");
}

#[test]
fn tensor_kinds_map_to_nccl_types() {
    use cudarc::nccl::sys::ncclDataType_t as T;
    assert_eq!(nccl_type(Kind::Float), Some(T::ncclFloat32));
    assert_eq!(nccl_type(Kind::BFloat16), Some(T::ncclBfloat16));
    assert_eq!(nccl_type(Kind::Half), Some(T::ncclFloat16));
    assert_eq!(nccl_type(Kind::Int64), Some(T::ncclInt64));
    assert_eq!(nccl_type(Kind::ComplexFloat), None);
}
