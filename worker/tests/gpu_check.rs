//! `ferroclip-worker gpu-check` without a GPU: the CPU path runs end to end and prints its JSON
//! line; asking for CUDA on this CPU-only libtorch fails with the clear message. Plus the FLOPs
//! count behind MFU.

use std::process::Command;

use ferroclip_worker::cmd::gpu_check::{clip_train_flops_per_sample, peak_bf16_tflops};
use ferroclip_worker::device::set_autocast_bf16;
use ferroclip_worker::model::ModelConfig;

const BIN: &str = env!("CARGO_BIN_EXE_ferroclip-worker");

#[test]
fn vit_b_16_flops_match_the_known_figure() {
    // OpenCLIP's ViT-B-16 forward is ~41 GFLOPs (17.6 G multiply-adds image + 2.9 G text,
    // counted as 2 FLOPs each); training is three forwards.
    let f = clip_train_flops_per_sample(&ModelConfig::preset("ViT-B-16").expect("preset"));
    assert!((115e9..130e9).contains(&f), "{f:e}");
    let b32 = clip_train_flops_per_sample(&ModelConfig::preset("ViT-B-32").expect("preset"));
    // B/32: 50 image tokens instead of 197, the same text tower (~14.8 GFLOPs forward).
    assert!((40e9..48e9).contains(&b32), "{b32:e}");
}

#[test]
fn peak_table_knows_common_gpus() {
    assert_eq!(peak_bf16_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
    assert_eq!(peak_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
    assert_eq!(peak_bf16_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
    assert_eq!(peak_bf16_tflops("NVIDIA L4"), Some(121.0));
    assert_eq!(peak_bf16_tflops("NVIDIA L40S"), Some(362.0));
    assert_eq!(peak_bf16_tflops("Some Future GPU"), None);
}

#[test]
fn cpu_run_prints_throughput_json() {
    let out = Command::new(BIN)
        .args(["gpu-check", "--device", "cpu", "--preset", "tiny"])
        .args(["--batches", "8", "--steps", "2", "--warmup", "1"])
        .args(["--peak-tflops", "1"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ferroclip-worker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
    assert_eq!(v["batch"], 8);
    assert_eq!(v["preset"], "tiny");
    assert!(v["samples_per_s"].as_f64().expect("number") > 0.0, "{v}");
    assert!(v["mfu"].as_f64().expect("number") > 0.0, "{v}");
    assert!(stdout.contains("autocast is CUDA-only"), "{stdout}");
}

#[test]
fn cuda_request_fails_clearly_on_cpu_only_libtorch() {
    let out = Command::new(BIN)
        .args(["gpu-check", "--device", "cuda:0"])
        .env("RUST_BACKTRACE", "0")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .expect("run ferroclip-worker");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cuda:0 requested but libtorch_cuda.so was not found in"),
        "{stderr}"
    );
}

/// The autocast dtype is set through libtorch's C++ symbol (tch has no call for it); the symbol
/// and the call work on a CPU-only libtorch too, and reading it back proves the ABI.
#[test]
fn autocast_dtype_can_be_set_to_bf16() {
    set_autocast_bf16().expect("set and read back the CUDA autocast dtype");
}
