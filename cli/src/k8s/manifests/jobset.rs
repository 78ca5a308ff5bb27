//! `--kind jobset`: the whole run as one JobSet (`jobset.x-k8s.io/v1alpha2`): a coordinator Job
//! and the workers' Indexed Job, started in that order, done when the workers are, queued by
//! Kueue as one unit, deleted as one object.

use serde_json::{json, Value};

use super::pods::{coordinator_template, pod_failure_policy, worker_job_spec};
use super::{RunSpec, COORDINATOR_JOB, WORKERS_JOB};

/// Whole-run restarts a JobSet allows for crashes (each recreates every pod; the coordinator
/// resumes from its journal, the workers from the newest checkpoint).
pub const MAX_RESTARTS: u32 = 3;
/// Replacements of a crashing coordinator pod within one attempt of the JobSet.
pub const COORDINATOR_BACKOFF_LIMIT: u32 = 6;

pub fn jobset(spec: &RunSpec) -> Value {
    let mut coordinator = coordinator_template(spec);
    // A Job's pods never restart in place: podFailurePolicy needs restartPolicy Never.
    coordinator["spec"]["restartPolicy"] = json!("Never");
    let coordinator_job = json!({
        // Indexed: the pod's host name (`<run>-coordinator-0-0`) is what workers dial.
        "completionMode": "Indexed",
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": COORDINATOR_BACKOFF_LIMIT,
        "podFailurePolicy": pod_failure_policy("coordinator"),
        "template": coordinator,
    });
    let mut metadata = spec.metadata_named(&spec.run_name, "run");
    let mut body = json!({
        // Pods reach each other as <host>.<run>; the coordinator is dialled before it is Ready.
        "network": { "enableDNSHostnames": true, "publishNotReadyAddresses": true },
        // The workers start once the coordinator is Ready.
        "startupPolicy": { "startupPolicyOrder": "InOrder" },
        // The run is done when the workers are (then the coordinator is deleted).
        "successPolicy": { "operator": "All", "targetReplicatedJobs": [WORKERS_JOB] },
        "failurePolicy": {
            "maxRestarts": MAX_RESTARTS,
            "rules": [
                // A Job failed by its podFailurePolicy (exit 2, a usage error) fails the run.
                {
                    "name": "usage-error",
                    "action": "FailJobSet",
                    "onJobFailureReasons": ["PodFailurePolicy"],
                },
                // A crash loop (a coordinator past its backoffLimit, a worker index past its
                // backoffLimitPerIndex) restarts the whole run, at most maxRestarts times.
                {
                    "name": "crash-loop",
                    "action": "RestartJobSet",
                    "onJobFailureReasons": ["BackoffLimitExceeded", "FailedIndexes", "MaxFailedIndexesExceeded"],
                },
            ],
        },
        "replicatedJobs": [
            {
                "name": COORDINATOR_JOB,
                "replicas": 1,
                "template": { "metadata": { "labels": spec.labels("coordinator") }, "spec": coordinator_job },
            },
            {
                "name": WORKERS_JOB,
                "replicas": 1,
                "template": { "metadata": { "labels": spec.labels("worker") }, "spec": worker_job_spec(spec) },
            },
        ],
    });
    if let Some(queue) = &spec.queue {
        // Kueue admits a suspended JobSet as one workload, once its whole quota is free.
        metadata["labels"]["kueue.x-k8s.io/queue-name"] = json!(queue);
        body["suspend"] = json!(true);
    }
    json!({
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": body,
    })
}
