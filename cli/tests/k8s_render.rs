//! `ferroclip k8s render`: the real binary's output, its structure, and validation against the
//! Kubernetes schemas with the real `kubernetes-validate`.

mod k8s_common;

use ferroclip_proto::config::{Backend, RunConfig};
use k8s_common::*;
use serde_json::{json, Value};

fn worker_container(docs: &[Value], run: &str) -> Value {
    find(docs, "Job", &format!("{run}-workers"))["spec"]["template"]["spec"]["containers"][0]
        .clone()
}

fn run_config(docs: &[Value], run: &str) -> RunConfig {
    let toml = find(docs, "ConfigMap", &format!("{run}-config"))["data"]["run.toml"]
        .as_str()
        .expect("run.toml text")
        .to_string();
    RunConfig::parse(&toml, "rendered run.toml").expect("rendered run.toml parses")
}

#[test]
fn gpu_run_has_an_indexed_job_with_gpus_and_a_probed_coordinator() {
    let (_, docs) = render(GPU_ARGS);
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "ConfigMap",
            "Service",
            "Deployment",
            "Job",
            "NetworkPolicy",
            "NetworkPolicy"
        ]
    );

    let job = &find(&docs, "Job", "ferroclip-workers")["spec"];
    assert_eq!(job["completionMode"], "Indexed");
    assert_eq!(job["completions"], 4);
    assert_eq!(job["parallelism"], 4);
    assert_eq!(job["backoffLimitPerIndex"], 3);
    let rules = job["podFailurePolicy"]["rules"].as_array().expect("rules");
    assert!(rules
        .iter()
        .any(|r| r["action"] == "Ignore" && r["onExitCodes"]["values"] == json!([143])));
    assert!(rules
        .iter()
        .any(|r| r["action"] == "FailJob" && r["onExitCodes"]["values"] == json!([2])));
    let pod = &job["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(0) >= 30);
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
    let shm = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "shm"))
        .expect("shm");
    assert_eq!(
        shm["emptyDir"],
        json!({ "medium": "Memory", "sizeLimit": "64Gi" })
    );

    let c = worker_container(&docs, "ferroclip");
    assert_eq!(c["resources"]["requests"]["nvidia.com/gpu"], "8");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "8");
    assert_eq!(env(&c, "FERROCLIP_LOCAL_WORKERS")["value"], "8");
    assert_eq!(env(&c, "FERROCLIP_DEVICE")["value"], "cuda");
    assert_eq!(
        env(&c, "FERROCLIP_COORDINATOR")["value"],
        "https://ferroclip-coordinator:50051"
    );
    assert_eq!(
        env(&c, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(env(&c, "NCCL_SOCKET_IFNAME")["value"], "eth0");
    let ports: Vec<u64> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(ports, (29500..29508).collect::<Vec<u64>>());
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(
        mounts.contains(&"/dev/shm")
            && mounts.contains(&"/var/run/ferroclip/token")
            && mounts.contains(&"/var/run/ferroclip/tls"),
        "{mounts:?}"
    );

    let deploy = &find(&docs, "Deployment", "ferroclip-coordinator")["spec"];
    assert_eq!(deploy["replicas"], 1);
    assert_eq!(deploy["strategy"]["type"], "Recreate");
    let tpl = &deploy["template"];
    assert_eq!(
        tpl["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(
        tpl["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );
    let co = &tpl["spec"]["containers"][0];
    assert_eq!(co["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(co["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args: Vec<&str> = co["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "coordinator",
            "--config",
            "/etc/ferroclip/run.toml",
            "--grpc-addr",
            "0.0.0.0:50051",
            "--heartbeat-addr",
            "0.0.0.0:50052",
            "--http-addr",
            "0.0.0.0:8080",
            "--token-file",
            "/var/run/ferroclip/token/token",
            "--journal",
            "s3://ferroclip/runs/vit-b-16/journal",
        ]
    );
    // Selectors pick exactly the coordinator's pods.
    let labels = &tpl["metadata"]["labels"];
    for (k, v) in deploy["selector"]["matchLabels"]
        .as_object()
        .expect("selector")
    {
        assert_eq!(&labels[k], v, "Deployment selector {k}");
    }
    let svc = &find(&docs, "Service", "ferroclip-coordinator")["spec"];
    for (k, v) in svc["selector"].as_object().expect("selector") {
        assert_eq!(&labels[k], v, "Service selector {k}");
    }
    let svc_ports: Vec<u64> = svc["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(svc_ports, [50051, 50052, 8080]);

    let cfg = run_config(&docs, "ferroclip");
    assert_eq!(cfg.data.root.as_deref(), Some("s3://bucket/laion"));
    assert_eq!(cfg.model.preset, "ViT-B-16");
    assert_eq!(cfg.cluster.backend, Backend::Nccl);
    assert_eq!(cfg.cluster.max_workers, 32);
}

#[test]
fn cpu_run_asks_for_no_gpus_and_uses_the_ring() {
    let (text, docs) = render(CPU_ARGS);
    assert!(!text.contains("nvidia.com/gpu"), "{text}");
    assert!(!text.contains("NCCL_"), "{text}");
    let job = &find(&docs, "Job", "ferroclip-workers")["spec"];
    assert_eq!(job["completions"], 2);
    assert_eq!(job["parallelism"], 2);
    assert!(job["template"]["spec"].get("tolerations").is_none());
    let c = worker_container(&docs, "ferroclip");
    assert_eq!(env(&c, "FERROCLIP_DEVICE")["value"], "cpu");
    assert_eq!(env(&c, "FERROCLIP_LOCAL_WORKERS")["value"], "1");
    assert_eq!(
        c["resources"]["requests"],
        json!({ "cpu": "1", "memory": "4Gi" })
    );
    let cfg = run_config(&docs, "ferroclip");
    assert_eq!(cfg.cluster.backend, Backend::Ring);
    assert_eq!(cfg.model.preset, "tiny");
    assert_eq!(cfg.data.root.as_deref(), Some("s3://bucket/small"));
}

#[test]
fn run_name_namespace_images_and_fresh_reach_every_object() {
    let mut args = CPU_ARGS.to_vec();
    args.extend_from_slice(&[
        "--run-name",
        "exp7",
        "--namespace",
        "team-a",
        "--image",
        "reg.example/ferroclip:9",
        "--worker-image",
        "reg.example/ferroclip-worker:9",
        "--run-dir",
        "gs://b/runs/exp7/",
        "--fresh",
    ]);
    let (_, docs) = render(&args);
    for d in &docs {
        let name = d["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("exp7-"), "{name}");
        assert_eq!(d["metadata"]["namespace"], "team-a", "{name}");
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/instance"], "exp7",
            "{name}"
        );
    }
    let job_pod = &find(&docs, "Job", "exp7-workers")["spec"]["template"]["spec"];
    assert_eq!(
        job_pod["containers"][0]["image"],
        "reg.example/ferroclip-worker:9"
    );
    let secret_names: Vec<&str> = job_pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(secret_names, ["exp7-token", "exp7-tls"]);
    let tls = job_pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "tls")
        .expect("the TLS volume");
    assert_eq!(
        tls["secret"]["items"],
        serde_json::json!([{ "key": "ca.crt", "path": "ca.crt" }]),
        "workers get the CA, never the server's key"
    );
    assert_eq!(
        job_pod["containers"][0]["envFrom"][0]["secretRef"]["name"],
        "exp7-s3"
    );
    assert_eq!(
        env(&job_pod["containers"][0], "FERROCLIP_COORDINATOR")["value"],
        "https://exp7-coordinator:50051"
    );

    let co =
        &find(&docs, "Deployment", "exp7-coordinator")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(co["image"], "reg.example/ferroclip:9");
    let args: Vec<&str> = co["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        &args[args.len() - 3..],
        ["--journal", "gs://b/runs/exp7/journal", "--fresh"]
    );
    assert_eq!(run_config(&docs, "exp7").run.dir, "gs://b/runs/exp7/");
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local_dir = dir.path().join("local.toml");
    std::fs::write(&local_dir, "[run]\ndir = \"runs/x\"\n").expect("write");
    let greedy = dir.path().join("greedy.toml");
    std::fs::write(
        &greedy,
        "[run]\ndir = \"s3://b/r\"\n[cluster]\nmin_workers = 5\n",
    )
    .expect("write");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[optim]\nglobal_bach = 3\n").expect("write");
    let (local_dir, greedy, typo) = (
        local_dir.to_string_lossy(),
        greedy.to_string_lossy(),
        typo.to_string_lossy(),
    );
    let cfg = "k8s/base/run.toml";
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--workers", "0", "--config", cfg, "--data", "s3://b/d"],
            vec!["--workers"],
        ),
        (
            vec![
                "--workers",
                "1",
                "--gpus-per-worker",
                "17",
                "--config",
                cfg,
                "--data",
                "s3://b/d",
            ],
            vec!["--gpus-per-worker"],
        ),
        (
            vec!["--workers", "1", "--config", cfg, "--data", "data/synth"],
            vec!["--data", "data/synth", "object-store URL"],
        ),
        (
            vec![
                "--workers",
                "1",
                "--config",
                "no/such.toml",
                "--data",
                "s3://b/d",
            ],
            vec!["no/such.toml"],
        ),
        (
            vec!["--workers", "1", "--config", &typo, "--data", "s3://b/d"],
            vec!["global_bach", &typo],
        ),
        (
            vec![
                "--workers",
                "1",
                "--config",
                &local_dir,
                "--data",
                "s3://b/d",
            ],
            vec!["run.dir", "--run-dir"],
        ),
        (
            vec!["--workers", "2", "--config", &greedy, "--data", "s3://b/d"],
            vec!["min_workers", "never start"],
        ),
        (
            vec![
                "--workers",
                "1",
                "--config",
                cfg,
                "--data",
                "s3://b/d",
                "--run-name",
                "My_Run",
            ],
            vec!["--run-name", "My_Run"],
        ),
        (
            vec![
                "--workers",
                "1",
                "--config",
                cfg,
                "--data",
                "s3://b/d",
                "--namespace",
                "-x",
            ],
            vec!["-x"],
        ),
    ];
    for (args, wanted) in cases {
        let mut full = vec!["k8s", "render"];
        full.extend_from_slice(&args);
        let out = ferroclip(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "{args:?} printed manifests");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        for w in wanted {
            assert!(
                stderr.contains(w),
                "{args:?}: error should name {w}: {stderr}"
            );
        }
    }
}

#[test]
fn rendered_manifests_validate_against_kubernetes_schemas() {
    let Some(validator) = validator() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fresh = GPU_ARGS.to_vec();
    fresh.extend_from_slice(&["--run-name", "r2", "--namespace", "ml", "--fresh"]);
    for (n, args) in [GPU_ARGS, CPU_ARGS, &fresh].into_iter().enumerate() {
        let (text, _) = render(args);
        let file = dir.path().join(format!("render-{n}.yaml"));
        std::fs::write(&file, text).expect("write");
        let (ok, out) = validate(&validator, &file);
        assert!(ok, "render {args:?} does not validate: {out}");
    }
    // The same check rejects the two negative fixtures, each for its own reason.
    for (fixture, reason) in [
        (
            "invalid-misspelled-field.yaml",
            "'terminationGracePeriodSecond' was unexpected",
        ),
        ("invalid-wrong-type.yaml", "is not of type 'integer'"),
    ] {
        let (ok, out) = validate(&validator, &repo_root().join("k8s/tests").join(fixture));
        assert!(!ok, "{fixture} validated but must not");
        assert!(out.contains(reason), "{fixture}: {out}");
    }
}

#[test]
fn validate_k8s_script_passes_on_base_overlays_and_renders() {
    if validator().is_none() {
        return;
    }
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/validate-k8s"))
        .env("FERROCLIP", env!("CARGO_BIN_EXE_ferroclip"))
        .output()
        .expect("run scripts/validate-k8s");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/validate-k8s failed:\n{text}");
    for line in [
        "ok   k8s/base (kustomize build)",
        "ok   k8s/overlays/cpu-smoke == ferroclip k8s render",
        "ok   k8s/overlays/gpu == ferroclip k8s render",
        "ok   k8s/overlays/jobset == ferroclip k8s render --kind jobset",
        "ok   ferroclip k8s render (jobset-gpu-16x8-queued)",
        "k8s/tests/jobset-invalid-misspelled-field.yaml is rejected",
        "k8s/tests/invalid-misspelled-field.yaml is rejected",
        "k8s/tests/invalid-wrong-type.yaml is rejected",
    ] {
        assert!(text.contains(line), "missing \"{line}\" in:\n{text}");
    }
}
