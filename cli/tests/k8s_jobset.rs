//! `ferroclip k8s render --kind jobset`: the run as one JobSet, the same pods as the Job kind,
//! Kueue's labels, strict validation against the JobSet CRD's schema (k8s/crds/), and failure
//! rules that answer each exit code as the Job kind does.

mod k8s_common;

use k8s_common::*;
use serde_json::{json, Value};

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend_from_slice(extra);
    v
}

fn pod_spec(job_spec: &Value) -> &Value {
    &job_spec["template"]["spec"]
}

#[test]
fn a_jobset_holds_the_same_pods_started_coordinator_first() {
    let (_, jobs) = render(GPU_ARGS);
    let (_, docs) = render(&with(GPU_ARGS, &["--kind", "jobset"]));
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "ConfigMap",
            "Service",
            "JobSet",
            "NetworkPolicy",
            "NetworkPolicy"
        ]
    );
    let js = find(&docs, "JobSet", "ferroclip");
    assert_eq!(js["apiVersion"], "jobset.x-k8s.io/v1alpha2");
    let spec = &js["spec"];
    assert_eq!(spec["startupPolicy"]["startupPolicyOrder"], "InOrder");
    assert_eq!(
        spec["successPolicy"],
        json!({ "operator": "All", "targetReplicatedJobs": ["workers"] })
    );
    assert_eq!(spec["network"]["enableDNSHostnames"], true);
    assert!(spec.get("suspend").is_none(), "not queued: starts at once");
    let names: Vec<&Value> = spec["replicatedJobs"]
        .as_array()
        .expect("replicatedJobs")
        .iter()
        .map(|j| &j["name"])
        .collect();
    assert_eq!(names, [&json!("coordinator"), &json!("workers")]);

    // The workers: the Job kind's Job spec, but for where they find the coordinator (its pod's
    // name in the JobSet's headless Service).
    let mut workers = replicated_job(js, "workers").clone();
    let url = env(
        &pod_spec(&workers)["containers"][0],
        "FERROCLIP_COORDINATOR",
    )["value"]
        .clone();
    assert_eq!(url, "https://ferroclip-coordinator-0-0.ferroclip:50051");
    let job = find(&jobs, "Job", "ferroclip-workers")["spec"].clone();
    let job_url = env(&pod_spec(&job)["containers"][0], "FERROCLIP_COORDINATOR")["value"].clone();
    assert_eq!(job_url, "https://ferroclip-coordinator:50051");
    for e in workers["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .expect("env")
    {
        if e["name"] == "FERROCLIP_COORDINATOR" {
            e["value"] = job_url.clone();
        }
    }
    assert_eq!(workers, job);

    // The coordinator: the Deployment's pod as a one-pod Indexed Job (pods never restart in
    // place under a podFailurePolicy; a new pod resumes from the journal).
    let coordinator = replicated_job(js, "coordinator");
    assert_eq!(coordinator["completionMode"], "Indexed");
    assert_eq!(coordinator["completions"], 1);
    let mut deployment_pod =
        find(&jobs, "Deployment", "ferroclip-coordinator")["spec"]["template"].clone();
    deployment_pod["spec"]["restartPolicy"] = json!("Never");
    assert_eq!(coordinator["template"], deployment_pod);
    let args = &pod_spec(coordinator)["containers"][0]["args"];
    assert!(
        !args.as_array().expect("args").contains(&json!("--fresh")),
        "a replaced coordinator resumes its journal: {args}"
    );

    // Kueue accounts for every container: each one asks for CPU and memory.
    for rj in ["coordinator", "workers"] {
        for c in pod_spec(replicated_job(js, rj))["containers"]
            .as_array()
            .expect("containers")
        {
            let req = &c["resources"]["requests"];
            assert!(
                req["cpu"].is_string() && req["memory"].is_string(),
                "{rj}: {c:#}"
            );
        }
    }
}

#[test]
fn a_queued_jobset_starts_suspended_for_kueue_with_its_priority() {
    let (_, docs) = render(&with(
        CPU_ARGS,
        &[
            "--kind",
            "jobset",
            "--queue",
            "team-a",
            "--priority-class",
            "batch-high",
        ],
    ));
    let js = find(&docs, "JobSet", "ferroclip");
    assert_eq!(
        js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
    assert_eq!(js["spec"]["suspend"], true);
    for rj in ["coordinator", "workers"] {
        assert_eq!(
            pod_spec(replicated_job(js, rj))["priorityClassName"],
            "batch-high",
            "{rj}"
        );
    }
    // The Job kind takes a priority class too, but no queue (Kueue would admit the workers
    // without their coordinator).
    let (_, jobs) = render(&with(CPU_ARGS, &["--priority-class", "batch-high"]));
    assert_eq!(
        find(&jobs, "Deployment", "ferroclip-coordinator")["spec"]["template"]["spec"]
            ["priorityClassName"],
        "batch-high"
    );
    assert_eq!(
        pod_spec(workers_job(&jobs, "ferroclip"))["priorityClassName"],
        "batch-high"
    );
    for (args, flag) in [
        (with(CPU_ARGS, &["--queue", "team-a"]), "--queue"),
        (
            with(CPU_ARGS, &["--kind", "jobset", "--queue", "Team A"]),
            "--queue",
        ),
        (
            with(CPU_ARGS, &["--priority-class", "x_y"]),
            "--priority-class",
        ),
        (
            with(
                &CPU_ARGS[..5],
                &["--kind", "jobset", "--data", "https://host/ds"],
            ),
            "--data",
        ),
    ] {
        let out = ferroclip(&with(&["k8s", "render"], &args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?}: should name {flag}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn rendered_jobsets_validate_strictly_against_the_jobset_crd() {
    let (Some(python), Some(validator)) = (crd_python(), validator()) else {
        return;
    };
    let queued = ["--queue", "team-a", "--priority-class", "high"];
    let named = ["--namespace", "ml", "--run-name", "big-run", "--fresh"];
    // Every render's JobSet against its CRD, the built-in kinds with kubernetes-validate: one
    // file each (one validator start each; the messages name the document).
    let (mut jobsets, mut builtin) = (String::new(), String::new());
    let mut renders = Vec::new();
    for base in [GPU_ARGS, CPU_ARGS] {
        for extra in [&[][..], &queued[..], &named[..]] {
            let args = with(&with(base, &["--kind", "jobset"]), extra);
            let (_, docs) = render(&args);
            for d in &docs {
                let text = format!("---\n{}", serde_yaml::to_string(d).expect("yaml"));
                if d["kind"] == "JobSet" {
                    jobsets.push_str(&text);
                } else {
                    builtin.push_str(&text);
                }
            }
            renders.push(args);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (js_file, builtin_file) = (
        dir.path().join("jobsets.yaml"),
        dir.path().join("builtin.yaml"),
    );
    std::fs::write(&js_file, jobsets).expect("write");
    std::fs::write(&builtin_file, builtin).expect("write");
    let (ok, out) = validate_jobset(&python, &js_file);
    assert!(ok, "JobSets of {renders:?} do not validate: {out}");
    assert!(out.contains("6 JobSet document(s) valid"), "{out}");
    let (ok, out) = validate(&validator, &builtin_file);
    assert!(ok, "{renders:?} do not validate: {out}");
    // The same check is strict: a misspelled field deep in a pod template fails, named.
    let fixture = repo_root().join("k8s/tests/jobset-invalid-misspelled-field.yaml");
    let (ok, out) = validate_jobset(&python, &fixture);
    assert!(!ok, "the misspelled fixture validated: {out}");
    assert!(out.contains("'restartPolicyy' was unexpected"), "{out}");
}

/// What the Job controller does with a pod of `job` whose `container` failed with `code`
/// (`disrupted`: evicted or preempted), by its podFailurePolicy: the first matching rule's
/// action, or "Count" (counts toward the backoff limit) when none matches.
fn pod_outcome(job: &Value, container: &str, code: i64, disrupted: bool) -> String {
    let rules = job["podFailurePolicy"]["rules"].as_array().expect("rules");
    for rule in rules {
        let on_code = &rule["onExitCodes"];
        let hit = if on_code.is_object() {
            let named = on_code["containerName"].is_null() || on_code["containerName"] == container;
            let listed = on_code["values"]
                .as_array()
                .expect("values")
                .contains(&json!(code));
            named && (listed == (on_code["operator"] == "In"))
        } else {
            disrupted
                && rule["onPodConditions"]
                    .as_array()
                    .expect("conditions")
                    .iter()
                    .any(|c| c["type"] == "DisruptionTarget" && c["status"] == "True")
        };
        if hit {
            return rule["action"].as_str().expect("action").to_string();
        }
    }
    "Count".into()
}

/// What the JobSet controller does when one of its Jobs fails for `reason`: the first rule
/// that lists the reason (for that replicated job), else its default, RestartJobSet.
fn jobset_action(jobset: &Value, replicated_job: &str, reason: &str) -> String {
    let rules = jobset["spec"]["failurePolicy"]["rules"]
        .as_array()
        .expect("rules");
    rules
        .iter()
        .find(|r| {
            let targets = r["targetReplicatedJobs"].as_array();
            let ours = targets.is_none_or(|t| t.contains(&json!(replicated_job)));
            let listed = r["onJobFailureReasons"]
                .as_array()
                .is_none_or(|l| l.contains(&json!(reason)));
            ours && listed
        })
        .map(|r| r["action"].as_str().expect("action").to_string())
        .unwrap_or_else(|| "RestartJobSet".into())
}

#[test]
fn failure_rules_answer_every_exit_code_as_the_job_kind_does() {
    let (_, jobs) = render(GPU_ARGS);
    let (_, docs) = render(&with(GPU_ARGS, &["--kind", "jobset"]));
    let js = find(&docs, "JobSet", "ferroclip");
    let job = &find(&jobs, "Job", "ferroclip-workers")["spec"];
    // (exit code, disrupted) -> what happens to the pod.
    let table = [
        (2, false, "FailJob"),  // usage error: retrying cannot help
        (143, false, "Ignore"), // SIGTERM (drained, deleted, preempted): replaced, not counted
        (137, true, "Ignore"),  // evicted or preempted
        (1, false, "Count"),    // a crash: replaced, counted toward the backoff limit
        (137, false, "Count"),  // OOM-killed
    ];
    for (code, disrupted, want) in table {
        assert_eq!(
            pod_outcome(job, "worker", code, disrupted),
            want,
            "Job kind: exit {code}"
        );
        let workers = replicated_job(js, "workers");
        assert_eq!(
            pod_outcome(workers, "worker", code, disrupted),
            want,
            "JobSet workers: exit {code}"
        );
        let coordinator = replicated_job(js, "coordinator");
        assert_eq!(
            pod_outcome(coordinator, "coordinator", code, disrupted),
            want,
            "JobSet coordinator: exit {code}"
        );
    }
    // Counted failures are bounded as in the Job kind.
    assert_eq!(
        replicated_job(js, "workers")["backoffLimitPerIndex"],
        job["backoffLimitPerIndex"]
    );
    let limit = replicated_job(js, "coordinator")["backoffLimit"]
        .as_u64()
        .expect("limit");
    assert!((1..=10).contains(&limit), "{limit}");

    // A failed Job: a usage error fails the run; a crash loop restarts the whole run (the
    // coordinator resumes from its journal), at most maxRestarts times.
    for rj in ["coordinator", "workers"] {
        assert_eq!(
            jobset_action(js, rj, "PodFailurePolicy"),
            "FailJobSet",
            "{rj}"
        );
        for reason in [
            "BackoffLimitExceeded",
            "FailedIndexes",
            "MaxFailedIndexesExceeded",
        ] {
            assert_eq!(
                jobset_action(js, rj, reason),
                "RestartJobSet",
                "{rj} {reason}"
            );
        }
    }
    let max = js["spec"]["failurePolicy"]["maxRestarts"]
        .as_u64()
        .expect("maxRestarts");
    assert!((1..=10).contains(&max), "{max}");
}

#[test]
fn network_policies_admit_workers_to_the_coordinator_and_each_other_only() {
    let workers = json!({ "podSelector": { "matchLabels": {
        "app.kubernetes.io/instance": "ferroclip", "app.kubernetes.io/component": "worker" } } });
    for (args, ring_ports) in [
        // CPU: 2 processes per pod, the ring's two ports.
        (
            with(&["--gpus-per-worker", "2"], CPU_ARGS),
            json!([{ "protocol": "TCP", "port": 29500, "endPort": 29501 }]),
        ),
        // GPU: NCCL opens its own ports, so any port, but still only from the run's workers.
        (GPU_ARGS.to_vec(), Value::Null),
    ] {
        for kind in ["job", "jobset"] {
            let (_, docs) = render(&with(&args, &["--kind", kind]));
            let coord = &find(&docs, "NetworkPolicy", "ferroclip-coordinator")["spec"];
            assert_eq!(coord["policyTypes"], json!(["Ingress"]));
            assert_eq!(
                coord["ingress"][0]["from"],
                json!([workers.clone()]),
                "{kind}"
            );
            assert_eq!(
                coord["ingress"][0]["ports"],
                json!([
                    { "protocol": "TCP", "port": 50051 },
                    { "protocol": "TCP", "port": 50052 },
                ])
            );
            assert_eq!(
                coord["ingress"][1]["ports"],
                json!([{ "protocol": "TCP", "port": 8080 }])
            );
            let w = &find(&docs, "NetworkPolicy", "ferroclip-workers")["spec"];
            assert_eq!(w["ingress"][0]["from"], json!([workers.clone()]), "{kind}");
            assert_eq!(w["ingress"][0]["ports"], ring_ports, "{kind} {args:?}");
            assert_eq!(w["ingress"].as_array().map(Vec::len), Some(1));
        }
    }
}
