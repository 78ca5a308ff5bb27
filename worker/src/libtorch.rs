//! Facts about the libtorch this process runs on.

use std::path::{Path, PathBuf};

/// Directory of the `libtorch_cpu.so` mapped into this process, if any.
pub fn loaded_lib_dir() -> Option<PathBuf> {
    // Touch libtorch so it is surely mapped before we look.
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// The version of the libtorch loaded at run time ("2.11.0", "2.11.0+cu130", ...).
/// A standalone libtorch has `build-version`; a PyTorch install has `torch/version.py`.
pub fn version() -> String {
    let Some(lib) = loaded_lib_dir() else {
        return "unknown (libtorch_cpu.so not found in /proc/self/maps)".into();
    };
    let root = lib.parent().unwrap_or(&lib);
    if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        return v.trim().to_string();
    }
    if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
        for line in py.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest
                    .trim_start_matches([' ', '=', ':', 's', 't', 'r'])
                    .trim();
                return v.trim_matches(['\'', '"']).to_string();
            }
        }
    }
    format!("unknown (no build-version beside {})", lib.display())
}
