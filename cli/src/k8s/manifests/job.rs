//! `--kind job`: the coordinator as a Deployment, the workers as an Indexed Job. Works on any
//! cluster; the two are separate objects (deleted together by label).

use serde_json::{json, Value};

use super::pods::{coordinator_template, worker_job_spec};
use super::RunSpec;

pub fn deployment(spec: &RunSpec) -> Value {
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
            "template": coordinator_template(spec),
        },
    })
}

pub fn job(spec: &RunSpec) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": spec.metadata("workers", "worker"),
        "spec": worker_job_spec(spec),
    })
}
