//! Helpers shared by the k8s tests: run the real `ferroclip` binary, find the real validator.

#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A GPU run (the gpu overlay's config) and a CPU run (the cpu-smoke overlay's).
pub const GPU_ARGS: &[&str] = &[
    "--workers",
    "4",
    "--gpus-per-worker",
    "8",
    "--config",
    "k8s/overlays/gpu/run.toml",
    "--data",
    "s3://bucket/laion",
];

pub const CPU_ARGS: &[&str] = &[
    "--workers",
    "2",
    "--cpu",
    "--config",
    "k8s/overlays/cpu-smoke/run.toml",
    "--data",
    "s3://bucket/small",
];

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn ferroclip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferroclip"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run ferroclip")
}

/// `ferroclip k8s render ARGS`: the YAML text and its documents as JSON values.
pub fn render(args: &[&str]) -> (String, Vec<Value>) {
    let mut full = vec!["k8s", "render"];
    full.extend_from_slice(args);
    let out = ferroclip(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "render {args:?} failed: {stderr}");
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect::<Vec<Value>>();
    (text, docs)
}

pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {docs:#?}"))
}

/// A JobSet's replicated job `name`: its Job spec.
pub fn replicated_job<'a>(jobset: &'a Value, name: &str) -> &'a Value {
    jobset["spec"]["replicatedJobs"]
        .as_array()
        .and_then(|r| r.iter().find(|j| j["name"] == name))
        .map(|j| &j["template"]["spec"])
        .unwrap_or_else(|| panic!("no replicated job {name} in {jobset:#}"))
}

/// The workers' Job spec under either kind: the Job `<run>-workers`, or the JobSet's `workers`.
pub fn workers_job<'a>(docs: &'a [Value], run: &str) -> &'a Value {
    match docs.iter().find(|d| d["kind"] == "JobSet") {
        Some(jobset) => replicated_job(jobset, "workers"),
        None => &find(docs, "Job", &format!("{run}-workers"))["spec"],
    }
}

/// The value of env var `name` of the first container of a pod template.
pub fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {container:#}"))
}

/// The command that runs kubernetes-validate, if it is installed. Under CI (env `CI` set) a
/// missing validator fails the test: CI installs it (`pip install kubernetes-validate==1.37.0`).
pub fn validator() -> Option<Vec<String>> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    for cmd in [
        &["kubernetes-validate"][..],
        &["python3", "-m", "kubernetes_validate"][..],
    ] {
        if works(cmd) {
            return Some(cmd.iter().map(|s| s.to_string()).collect());
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "kubernetes-validate not found and CI is set: pip install kubernetes-validate==1.37.0"
    );
    eprintln!("NOTICE: kubernetes-validate not found; skipping schema validation (pip install kubernetes-validate==1.37.0)");
    None
}

/// The python that runs `k8s/tools/validate_crd.py` (PyYAML and jsonschema, both installed with
/// kubernetes-validate), if there is one; under CI a missing one fails the test.
pub fn crd_python() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import jsonschema, yaml"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some("python3".into());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "python3 with jsonschema and PyYAML not found and CI is set: pip install kubernetes-validate==1.37.0"
    );
    eprintln!("NOTICE: python3 lacks jsonschema/PyYAML; skipping JobSet schema validation");
    None
}

/// Validates the JobSets in `file` against k8s/crds' JobSet CRD, strictly: (passed, output).
pub fn validate_jobset(python: &str, file: &std::path::Path) -> (bool, String) {
    let root = repo_root();
    let out = Command::new(python)
        .arg(root.join("k8s/tools/validate_crd.py"))
        .arg(root.join("k8s/crds/jobset.x-k8s.io_jobsets.yaml"))
        .arg(file)
        .output()
        .expect("run validate_crd.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs the validator (--strict, Kubernetes 1.32.0) on a file: (passed, output).
pub fn validate(validator: &[String], file: &std::path::Path) -> (bool, String) {
    let out = Command::new(&validator[0])
        .args(&validator[1..])
        .args(["--strict", "--quiet", "-k", "1.32.0"])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
