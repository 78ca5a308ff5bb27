//! Helpers shared by the k8s tests: run the real `ferroclip` binary, find the real validator.

#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

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
