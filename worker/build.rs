//! Builds csrc/hooks.cpp (autograd gradient hooks), csrc/optim.cpp (fused AdamW) and
//! csrc/checkpoint.cpp (activation checkpointing's autograd Function), which tch does not
//! expose, against the headers of the libtorch that torch-sys links: $LIBTORCH, or PyTorch's
//! with LIBTORCH_USE_PYTORCH.

use std::path::PathBuf;
use std::process::Command;

fn libtorch_root() -> PathBuf {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        if std::env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
            return PathBuf::from(dir);
        }
    }
    let py = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&py)
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("no LIBTORCH and {py} could not be run: {e}"));
    assert!(
        out.status.success(),
        "no LIBTORCH, and {py} cannot import torch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/hooks.cpp");
    println!("cargo:rerun-if-changed=csrc/optim.cpp");
    println!("cargo:rerun-if-changed=csrc/checkpoint.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let root = libtorch_root();
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .file("csrc/hooks.cpp")
        .file("csrc/optim.cpp")
        .file("csrc/checkpoint.cpp")
        .compile("ferroclip_hooks");
}
