//! The Kubernetes objects of one run, built from checked parameters. The kustomize base in
//! `k8s/base` is this module's output for `--workers 1 --gpus-per-worker 1 --cpu` and the overlays
//! are its output for their own parameter sets; `scripts/validate-k8s` checks that they agree.

use serde_json::{json, Value};

/// The launcher that runs G worker processes in one pod (one per GPU) and supervises them.
pub const LAUNCHER: &str = include_str!("../../../k8s/base/launch-workers.sh");

/// Where the pieces live inside the containers (fixed by the processes' flags).
const CONFIG_DIR: &str = "/etc/ferroclip";
const TOKEN_DIR: &str = "/var/run/ferroclip/token";
const LAUNCHER_DIR: &str = "/opt/ferroclip";
pub const GRPC_PORT: u16 = 50051;
pub const HTTP_PORT: u16 = 8080;
pub const COLLECTIVE_PORT_BASE: u16 = 29500;

/// Everything that varies between runs; checked by the caller.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub run_name: String,
    pub namespace: Option<String>,
    /// Worker pods (Indexed Job completions = parallelism).
    pub pods: u32,
    /// Worker processes per pod: one per GPU, or CPU processes with `cpu`.
    pub procs_per_pod: u32,
    pub cpu: bool,
    pub image: String,
    pub worker_image: String,
    /// The run's object-store directory (journal, checkpoints).
    pub run_dir: String,
    /// run.toml as it goes into the ConfigMap.
    pub config_toml: String,
    /// The coordinator starts the run over (`--fresh`) instead of resuming its journal.
    pub fresh: bool,
}

impl RunSpec {
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.run_name)
    }

    fn labels(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/name": "ferroclip",
            "app.kubernetes.io/instance": self.run_name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "ferroclip",
        })
    }

    /// The labels that select a component's pods (a subset that never changes).
    fn selector(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/instance": self.run_name,
            "app.kubernetes.io/component": component,
        })
    }

    fn metadata(&self, suffix: &str, component: &str) -> Value {
        let mut m = json!({ "name": self.name(suffix), "labels": self.labels(component) });
        if let Some(ns) = &self.namespace {
            m["namespace"] = json!(ns);
        }
        m
    }
}

/// All objects of the run, in apply order.
pub fn render(spec: &RunSpec) -> Vec<Value> {
    vec![
        config_map(spec, "config", "run.toml", &spec.config_toml),
        config_map(spec, "launcher", "launch-workers.sh", LAUNCHER),
        service(spec),
        deployment(spec),
        job(spec),
    ]
}

fn config_map(spec: &RunSpec, suffix: &str, key: &str, text: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": spec.metadata(suffix, "config"),
        "data": { key: text },
    })
}

fn service(spec: &RunSpec) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": spec.metadata("coordinator", "coordinator"),
        "spec": {
            "type": "ClusterIP",
            "selector": spec.selector("coordinator"),
            "ports": [
                { "name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc" },
                { "name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http" },
            ],
        },
    })
}

/// Read-only root, no privileges: the pods pass the "restricted" Pod Security Standard.
fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
    })
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// Object-store credentials: optional so that clusters with workload identity need no Secret.
fn s3_env_from(spec: &RunSpec) -> Value {
    json!([{ "secretRef": { "name": spec.name("s3"), "optional": true } }])
}

fn token_volume(spec: &RunSpec) -> Value {
    json!({ "name": "token", "secret": { "secretName": spec.name("token"), "defaultMode": 0o440 } })
}

fn deployment(spec: &RunSpec) -> Value {
    let mut args = vec![
        "coordinator".to_string(),
        "--config".into(),
        format!("{CONFIG_DIR}/run.toml"),
        "--grpc-addr".into(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--http-addr".into(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--journal".into(),
        format!("{}/journal", spec.run_dir.trim_end_matches('/')),
    ];
    if spec.fresh {
        args.push("--fresh".into());
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": "http" },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        })
    };
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": spec.metadata("coordinator", "coordinator"),
        "spec": {
            "replicas": 1,
            // Two coordinators must never write the same journal: stop the old pod first.
            "strategy": { "type": "Recreate" },
            "revisionHistoryLimit": 3,
            "selector": { "matchLabels": spec.selector("coordinator") },
            "template": {
                "metadata": {
                    "labels": spec.labels("coordinator"),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": HTTP_PORT.to_string(),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    // SIGTERM: the coordinator journals its state and exits.
                    "terminationGracePeriodSeconds": 30,
                    "enableServiceLinks": false,
                    "automountServiceAccountToken": false,
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": "coordinator",
                        "image": spec.image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["ferroclip"],
                        "args": args,
                        "env": [{ "name": "RUST_LOG", "value": "info" }],
                        "envFrom": s3_env_from(spec),
                        "ports": [
                            { "name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP" },
                            { "name": "http", "containerPort": HTTP_PORT, "protocol": "TCP" },
                        ],
                        // Resuming from a journal in object storage may take a while.
                        "startupProbe": probe("/healthz", 2, 60),
                        "livenessProbe": probe("/healthz", 10, 3),
                        "readinessProbe": probe("/readyz", 5, 2),
                        "resources": {
                            "requests": { "cpu": "500m", "memory": "1Gi" },
                            "limits": { "memory": "2Gi" },
                        },
                        "securityContext": container_security(),
                        "volumeMounts": [
                            { "name": "config", "mountPath": CONFIG_DIR, "readOnly": true },
                            { "name": "token", "mountPath": TOKEN_DIR, "readOnly": true },
                            { "name": "tmp", "mountPath": "/tmp" },
                        ],
                    }],
                    "volumes": [
                        { "name": "config", "configMap": { "name": spec.name("config") } },
                        token_volume(spec),
                        { "name": "tmp", "emptyDir": {} },
                    ],
                },
            },
        },
    })
}

/// Worker pod resources: per GPU (or per CPU process), multiplied by the processes per pod.
struct PodResources {
    requests: Value,
    limits: Value,
    shm: String,
}

fn worker_resources(spec: &RunSpec) -> PodResources {
    let n = spec.procs_per_pod;
    if spec.cpu {
        let mem = format!("{}Gi", 4 * n);
        PodResources {
            requests: json!({ "cpu": n.to_string(), "memory": mem }),
            limits: json!({ "memory": mem }),
            shm: format!("{n}Gi"),
        }
    } else {
        // Image decoding needs about one core per 2,000 img/s; 8 cores per GPU leaves room.
        let mem = format!("{}Gi", 64 * n);
        PodResources {
            requests: json!({ "cpu": (8 * n).to_string(), "memory": mem, "nvidia.com/gpu": n.to_string() }),
            limits: json!({ "memory": mem, "nvidia.com/gpu": n.to_string() }),
            shm: format!("{}Gi", 8 * n),
        }
    }
}

fn worker_env(spec: &RunSpec) -> Value {
    let mut env = vec![
        json!({ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }),
        json!({ "name": "FERROCLIP_COORDINATOR", "value": format!("http://{}:{GRPC_PORT}", spec.name("coordinator")) }),
        json!({ "name": "FERROCLIP_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token") }),
        json!({ "name": "FERROCLIP_LOCAL_WORKERS", "value": spec.procs_per_pod.to_string() }),
        json!({ "name": "FERROCLIP_DEVICE", "value": if spec.cpu { "cpu" } else { "cuda" } }),
        json!({ "name": "FERROCLIP_COLLECTIVE_PORT_BASE", "value": COLLECTIVE_PORT_BASE.to_string() }),
        json!({ "name": "HOME", "value": "/tmp" }),
        json!({ "name": "RUST_LOG", "value": "info" }),
    ];
    if !spec.cpu {
        // NCCL: bootstrap over the pod network, not loopback; warnings only unless debugging.
        for (name, value) in [("NCCL_SOCKET_IFNAME", "eth0"), ("NCCL_DEBUG", "WARN")] {
            env.push(json!({ "name": name, "value": value }));
        }
    }
    Value::Array(env)
}

fn job(spec: &RunSpec) -> Value {
    let res = worker_resources(spec);
    let ports: Vec<Value> = (0..spec.procs_per_pod)
        .map(|i| {
            json!({
                "name": format!("collective-{i}"),
                "containerPort": u32::from(COLLECTIVE_PORT_BASE) + i,
                "protocol": "TCP",
            })
        })
        .collect();
    let mut pod = json!({
        "restartPolicy": "Never",
        // SIGTERM: each worker finishes or abandons its step, calls Leave and exits.
        "terminationGracePeriodSeconds": 60,
        "enableServiceLinks": false,
        "automountServiceAccountToken": false,
        "securityContext": pod_security(),
        "containers": [{
            "name": "worker",
            "image": spec.worker_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["bash", format!("{LAUNCHER_DIR}/launch-workers.sh")],
            "env": worker_env(spec),
            "envFrom": s3_env_from(spec),
            "ports": ports,
            "resources": { "requests": res.requests, "limits": res.limits },
            "securityContext": container_security(),
            "volumeMounts": [
                { "name": "launcher", "mountPath": LAUNCHER_DIR, "readOnly": true },
                { "name": "token", "mountPath": TOKEN_DIR, "readOnly": true },
                { "name": "shm", "mountPath": "/dev/shm" },
                { "name": "tmp", "mountPath": "/tmp" },
            ],
        }],
        "volumes": [
            { "name": "launcher", "configMap": { "name": spec.name("launcher"), "defaultMode": 0o555 } },
            token_volume(spec),
            // NCCL's shared-memory transport and the data pipeline need more than the 64 MiB default.
            { "name": "shm", "emptyDir": { "medium": "Memory", "sizeLimit": res.shm } },
            { "name": "tmp", "emptyDir": {} },
        ],
        // Hints, not rules: one pod per node, all pods in one zone (the all-reduce crosses every pod).
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": { "matchLabels": spec.selector("worker") },
        }],
        "affinity": {
            "podAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "topology.kubernetes.io/zone",
                        "labelSelector": { "matchLabels": spec.selector("worker") },
                    },
                }],
            },
        },
    });
    if !spec.cpu {
        pod["tolerations"] = json!([
            { "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" },
        ]);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": spec.metadata("workers", "worker"),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.pods,
            "parallelism": spec.pods,
            // Each index is one member of an elastic run: a pod that keeps failing uses up only its
            // own retries, and the other indexes go on training without it.
            "backoffLimitPerIndex": 3,
            "podFailurePolicy": { "rules": [
                // Exit 2 is a usage error (bad flags): every retry would fail the same way.
                { "action": "FailJob", "onExitCodes": { "containerName": "worker", "operator": "In", "values": [2] } },
                // 143: stopped by SIGTERM (deleted, drained, preempted) after leaving cleanly:
                // replace it, and the replacement rejoins without using up a retry.
                { "action": "Ignore", "onExitCodes": { "containerName": "worker", "operator": "In", "values": [143] } },
                { "action": "Ignore", "onPodConditions": [{ "type": "DisruptionTarget", "status": "True" }] },
            ] },
            "template": {
                "metadata": { "labels": spec.labels("worker") },
                "spec": pod,
            },
        },
    })
}
