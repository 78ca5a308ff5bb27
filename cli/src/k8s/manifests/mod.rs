//! The Kubernetes objects of one run, built from checked parameters. The kustomize base in
//! `k8s/base` is this module's output for `--workers 1 --gpus-per-worker 1 --cpu` and the overlays
//! are its output for their own parameter sets; `scripts/validate-k8s` checks that they agree.
//!
//! Two shapes of the same pods: `job.rs` (a Deployment for the coordinator and an Indexed Job
//! for the workers) and `jobset.rs` (one JobSet holding both, for JobSet and Kueue clusters).

mod job;
mod jobset;
mod network;
mod pods;

use serde_json::{json, Value};

/// The launcher that runs G worker processes in one pod (one per GPU) and supervises them.
pub const LAUNCHER: &str = include_str!("../../../../k8s/base/launch-workers.sh");

/// Where the pieces live inside the containers (fixed by the processes' flags).
const CONFIG_DIR: &str = "/etc/ferroclip";
const TOKEN_DIR: &str = "/var/run/ferroclip/token";
/// The Secret `<run>-tls` (keys `tls.crt`, `tls.key`, `ca.crt`: `kubectl create secret generic`
/// from `ferroclip certs`, or cert-manager's Certificate); the workers see only `ca.crt`.
const TLS_DIR: &str = "/var/run/ferroclip/tls";
const LAUNCHER_DIR: &str = "/opt/ferroclip";
/// The JobSet's child Job names end in these (and the pods' host names start with them).
pub const COORDINATOR_JOB: &str = "coordinator";
pub const WORKERS_JOB: &str = "workers";
pub const GRPC_PORT: u16 = 50051;
/// The coordinator's heartbeat port (`--heartbeat-addr`): beats on a thread of their own.
pub const HEARTBEAT_PORT: u16 = 50052;
pub const HTTP_PORT: u16 = 8080;
pub const COLLECTIVE_PORT_BASE: u16 = 29500;

/// Which objects carry the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A Deployment (coordinator) and an Indexed Job (workers): any cluster.
    Job,
    /// One JobSet (`jobset.x-k8s.io/v1alpha2`) holding both: one object to queue, watch and delete.
    Jobset,
}

/// Everything that varies between runs; checked by the caller.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub kind: Kind,
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
    /// Kueue LocalQueue that admits the run (JobSet only): the JobSet starts suspended.
    pub queue: Option<String>,
    /// PriorityClass of every pod (Kueue orders and preempts workloads by it).
    pub priority_class: Option<String>,
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
        self.metadata_named(&self.name(suffix), component)
    }

    fn metadata_named(&self, name: &str, component: &str) -> Value {
        let mut m = json!({ "name": name, "labels": self.labels(component) });
        if let Some(ns) = &self.namespace {
            m["namespace"] = json!(ns);
        }
        m
    }

    /// Where workers reach the coordinator: the Service, or under a JobSet the coordinator
    /// pod's own DNS name (the JobSet's headless Service; stable across pod replacements).
    fn coordinator_url(&self) -> String {
        match self.kind {
            Kind::Job => format!("https://{}:{GRPC_PORT}", self.name("coordinator")),
            Kind::Jobset => format!(
                "https://{run}-{COORDINATOR_JOB}-0-0.{run}:{GRPC_PORT}",
                run = self.run_name
            ),
        }
    }
}

/// All objects of the run, in apply order.
pub fn render(spec: &RunSpec) -> Vec<Value> {
    let mut objects = vec![
        config_map(spec, "config", "run.toml", &spec.config_toml),
        config_map(spec, "launcher", "launch-workers.sh", LAUNCHER),
        // Under a JobSet too: a stable name for the dashboard, port-forwards and Prometheus.
        service(spec),
    ];
    match spec.kind {
        Kind::Job => objects.extend([job::deployment(spec), job::job(spec)]),
        Kind::Jobset => objects.push(jobset::jobset(spec)),
    }
    objects.extend(network::policies(spec));
    objects
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
                { "name": "heartbeat", "port": HEARTBEAT_PORT, "targetPort": "heartbeat", "appProtocol": "grpc" },
                { "name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http" },
            ],
        },
    })
}
