//! The pods of a run, the same under both kinds: the coordinator's and the workers' pod
//! templates, and the Indexed Job spec that runs the workers.

use serde_json::{json, Value};

use super::{
    RunSpec, COLLECTIVE_PORT_BASE, CONFIG_DIR, GRPC_PORT, HEARTBEAT_PORT, HTTP_PORT, LAUNCHER_DIR,
    TLS_DIR, TOKEN_DIR,
};

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

/// The TLS Secret, with only `keys` of it (the workers get the CA, never the server's key).
fn tls_volume(spec: &RunSpec, keys: &[&str]) -> Value {
    let items: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "key": k, "path": k }))
        .collect();
    json!({ "name": "tls", "secret": { "secretName": spec.name("tls"), "defaultMode": 0o440, "items": items } })
}

fn with_priority(spec: &RunSpec, mut pod: Value) -> Value {
    if let Some(p) = &spec.priority_class {
        pod["priorityClassName"] = json!(p);
    }
    pod
}

/// What the Job controller does with a failed pod, by the container's exit code. The same rules
/// for the coordinator's and the workers' pods, under both kinds.
pub fn pod_failure_policy(container: &str) -> Value {
    json!({ "rules": [
        // Exit 2 is a usage error (bad flags or config): every retry would fail the same way.
        { "action": "FailJob", "onExitCodes": { "containerName": container, "operator": "In", "values": [2] } },
        // 143: stopped by SIGTERM (deleted, drained, preempted) after leaving cleanly or
        // journaling: replace it, and the replacement rejoins without using up a retry.
        { "action": "Ignore", "onExitCodes": { "containerName": container, "operator": "In", "values": [143] } },
        { "action": "Ignore", "onPodConditions": [{ "type": "DisruptionTarget", "status": "True" }] },
    ] })
}

/// The coordinator's pod template (without `restartPolicy`: the Deployment's is Always, the
/// JobSet's Job's is Never).
pub fn coordinator_template(spec: &RunSpec) -> Value {
    let mut args = vec![
        "coordinator".to_string(),
        "--config".into(),
        format!("{CONFIG_DIR}/run.toml"),
        "--grpc-addr".into(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--heartbeat-addr".into(),
        format!("0.0.0.0:{HEARTBEAT_PORT}"),
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
            "httpGet": { "path": path, "port": "http", "scheme": "HTTPS" },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        })
    };
    let pod = json!({
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
            "env": [
                { "name": "RUST_LOG", "value": "info" },
                { "name": "FERROCLIP_TLS_CERT", "value": format!("{TLS_DIR}/tls.crt") },
                { "name": "FERROCLIP_TLS_KEY", "value": format!("{TLS_DIR}/tls.key") },
            ],
            "envFrom": s3_env_from(spec),
            "ports": [
                { "name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP" },
                { "name": "heartbeat", "containerPort": HEARTBEAT_PORT, "protocol": "TCP" },
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
                { "name": "tls", "mountPath": TLS_DIR, "readOnly": true },
                { "name": "tmp", "mountPath": "/tmp" },
            ],
        }],
        "volumes": [
            { "name": "config", "configMap": { "name": spec.name("config") } },
            token_volume(spec),
            tls_volume(spec, &["tls.crt", "tls.key"]),
            { "name": "tmp", "emptyDir": {} },
        ],
    });
    json!({
        "metadata": {
            "labels": spec.labels("coordinator"),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": HTTP_PORT.to_string(),
                "prometheus.io/path": "/metrics",
                "prometheus.io/scheme": "https",
            },
        },
        "spec": with_priority(spec, pod),
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
        json!({ "name": "FERROCLIP_COORDINATOR", "value": spec.coordinator_url() }),
        json!({ "name": "FERROCLIP_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token") }),
        json!({ "name": "FERROCLIP_TLS_CA", "value": format!("{TLS_DIR}/ca.crt") }),
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

fn worker_template(spec: &RunSpec) -> Value {
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
                { "name": "tls", "mountPath": TLS_DIR, "readOnly": true },
                { "name": "shm", "mountPath": "/dev/shm" },
                { "name": "tmp", "mountPath": "/tmp" },
            ],
        }],
        "volumes": [
            { "name": "launcher", "configMap": { "name": spec.name("launcher"), "defaultMode": 0o555 } },
            token_volume(spec),
            tls_volume(spec, &["ca.crt"]),
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
        "metadata": { "labels": spec.labels("worker") },
        "spec": with_priority(spec, pod),
    })
}

/// The workers' Indexed Job spec: one index per pod.
pub fn worker_job_spec(spec: &RunSpec) -> Value {
    json!({
        "completionMode": "Indexed",
        "completions": spec.pods,
        "parallelism": spec.pods,
        // Each index is one member of an elastic run: a pod that keeps failing uses up only its
        // own retries, and the other indexes go on training without it.
        "backoffLimitPerIndex": 3,
        "podFailurePolicy": pod_failure_policy("worker"),
        "template": worker_template(spec),
    })
}
