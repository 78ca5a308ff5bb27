//! Device selection: the rules as pure functions, and a GPU request on this CPU-only libtorch.

use ferroclip_worker::device::{
    check_index, cuda_index, cuda_lib_path, parse, select, visible_limit, DeviceError,
    DeviceRequest,
};

#[test]
fn parses_cpu_cuda_and_ordinals() {
    assert_eq!(parse("cpu"), Ok(DeviceRequest::Cpu));
    assert_eq!(parse(" CPU "), Ok(DeviceRequest::Cpu));
    assert_eq!(parse("cuda"), Ok(DeviceRequest::Cuda(None)));
    assert_eq!(parse("cuda:0"), Ok(DeviceRequest::Cuda(Some(0))));
    assert_eq!(parse("cuda:7"), Ok(DeviceRequest::Cuda(Some(7))));
    for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda0", "cuda:1:2"] {
        assert_eq!(
            parse(bad),
            Err(DeviceError::BadSpec(bad.to_string())),
            "{bad:?}"
        );
    }
    let msg = parse("tpu").unwrap_err().to_string();
    assert!(msg.contains("cpu, cuda or cuda:N"), "{msg}");
}

#[test]
fn plain_cuda_takes_local_rank_explicit_index_wins() {
    let cuda = DeviceRequest::Cuda(None);
    assert_eq!(cuda_index(DeviceRequest::Cpu, Some("3")), Ok(None));
    assert_eq!(cuda_index(cuda, None), Ok(Some(0)));
    assert_eq!(cuda_index(cuda, Some("")), Ok(Some(0)));
    assert_eq!(cuda_index(cuda, Some("3")), Ok(Some(3)));
    assert_eq!(
        cuda_index(DeviceRequest::Cuda(Some(1)), Some("3")),
        Ok(Some(1))
    );
    assert_eq!(
        cuda_index(cuda, Some("-1")),
        Err(DeviceError::BadLocalRank("-1".into()))
    );
    assert_eq!(
        cuda_index(cuda, Some("one")),
        Err(DeviceError::BadLocalRank("one".into()))
    );
}

#[test]
fn cuda_visible_devices_limits() {
    assert_eq!(visible_limit(None), None);
    assert_eq!(visible_limit(Some("")), Some(0));
    assert_eq!(visible_limit(Some("-1")), Some(0));
    assert_eq!(visible_limit(Some("0")), Some(1));
    assert_eq!(visible_limit(Some("2,3")), Some(2));
    assert_eq!(visible_limit(Some("GPU-8a1b,GPU-77c0")), Some(2));
    // CUDA ignores everything from the first invalid entry on.
    assert_eq!(visible_limit(Some("1,-1,2")), Some(1));
}

#[test]
fn index_checked_against_visible_count() {
    assert_eq!(check_index(0, 1, None), Ok(()));
    assert_eq!(check_index(1, 2, Some("4,5")), Ok(()));
    let e = check_index(3, 2, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cuda:3 requested but only 2 GPUs are visible"
    );
    let e = check_index(1, 1, Some("6")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cuda:1 requested but only 1 GPU is visible (CUDA_VISIBLE_DEVICES=\"6\")"
    );
    let e = check_index(0, 0, None).unwrap_err();
    assert_eq!(e.to_string(), "cuda:0 requested but no GPU is visible");
}

#[test]
fn cpu_selects_cpu() {
    assert_eq!(select("cpu"), Ok(tch::Device::Cpu));
    assert!(matches!(select("npu"), Err(DeviceError::BadSpec(_))));
}

/// This repository's libtorch (.libtorch, scripts/setup-libtorch) leaves libtorch_cuda.so out on
/// purpose: asking for a GPU must name the missing library and the way out, not crash.
#[test]
fn cuda_on_cpu_only_libtorch_is_a_clear_error() {
    let dir = ferroclip_worker::libtorch::loaded_lib_dir().expect("libtorch is mapped");
    assert!(
        !cuda_lib_path(&dir).exists(),
        "this test needs a CPU-only libtorch, but {} has libtorch_cuda.so",
        dir.display()
    );
    // An empty CUDA_VISIBLE_DEVICES would (rightly) be reported first as "no GPU visible".
    if std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| visible_limit(Some(&v)) == Some(0)) {
        let e = select("cuda:1").unwrap_err();
        assert!(matches!(e, DeviceError::NoGpu { .. }), "{e}");
        return;
    }
    let e = select("cuda:1").unwrap_err();
    assert_eq!(
        e,
        DeviceError::CudaLibMissing {
            requested: "cuda:1".into(),
            dir: dir.display().to_string()
        }
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("cuda:1 requested but libtorch_cuda.so was not found in "),
        "{msg}"
    );
    assert!(
        msg.contains("CPU-only") && msg.contains("LIBTORCH_USE_PYTORCH"),
        "{msg}"
    );
    // And the process still works on the CPU afterwards.
    let t = tch::Tensor::ones([3], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
    assert_eq!(t.double_value(&[]), 3.0);
}
