//! NetworkPolicies of a run: the coordinator's gRPC port only from the run's worker pods, worker
//! pods only from each other (CPU runs: the ring ports; GPU runs: any port, since NCCL opens its
//! own ephemeral ones), the HTTP port (dashboard, /metrics) from the namespace. Egress stays open
//! (object stores). Both kinds label their pods alike, so the same policies serve a Job and a
//! JobSet.

use serde_json::{json, Value};

use super::{RunSpec, COLLECTIVE_PORT_BASE, GRPC_PORT, HEARTBEAT_PORT, HTTP_PORT};

pub fn policies(spec: &RunSpec) -> Vec<Value> {
    let workers = json!({ "podSelector": { "matchLabels": spec.selector("worker") } });
    let namespace = json!({ "podSelector": {} });
    let mut from_workers = json!({ "from": [workers.clone()] });
    if spec.cpu {
        let mut ring = json!({ "protocol": "TCP", "port": COLLECTIVE_PORT_BASE });
        if spec.procs_per_pod > 1 {
            ring["endPort"] = json!(u32::from(COLLECTIVE_PORT_BASE) + spec.procs_per_pod - 1);
        }
        from_workers["ports"] = json!([ring]);
    }
    vec![
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": spec.metadata("coordinator", "coordinator"),
            "spec": {
                "podSelector": { "matchLabels": spec.selector("coordinator") },
                "policyTypes": ["Ingress"],
                "ingress": [
                    // Members' RPCs and heartbeats: the run's workers only.
                    { "from": [workers.clone()], "ports": [
                        { "protocol": "TCP", "port": GRPC_PORT },
                        { "protocol": "TCP", "port": HEARTBEAT_PORT },
                    ] },
                    // Probes come from the kubelet (not subject to policies); the dashboard and
                    // Prometheus from this namespace (k8s/README.md: a scraper elsewhere).
                    { "from": [namespace], "ports": [{ "protocol": "TCP", "port": HTTP_PORT }] },
                ],
            },
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": spec.metadata("workers", "worker"),
            "spec": {
                "podSelector": { "matchLabels": spec.selector("worker") },
                "policyTypes": ["Ingress"],
                // The ring (and NCCL): between the run's workers only.
                "ingress": [from_workers],
            },
        }),
    ]
}
