//! Dataset mixing with real processes: a coordinator and two workers train one epoch over two
//! `data.sources` (weights 3:1, sizes 3:1); every sample of both is used exactly once, and
//! /metrics counts each source's samples.

mod run_common;

use std::collections::BTreeMap;
use std::time::Duration;

use run_common::*;

/// `ferroclip shards synth` into `dir` (a second source beside `synth`'s `dir/data`).
fn synth_into(dir: &std::path::Path, rows: u32, seed: u32) -> String {
    std::fs::create_dir_all(dir).expect("mkdir");
    synth(dir, rows, seed)
}

/// Value of `name{source="<source>"}` on the /metrics page.
fn source_samples(page: &str, source: &str) -> Option<f64> {
    let prefix = format!("ferroclip_source_samples_total{{source=\"{source}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The real-run config (`run_config`, global batch 16) over `big` (weight 3) and `small`
/// (weight 1), with `data_extra` added to its `[data]` section.
fn three_to_one_config(
    dir: &std::path::Path,
    run_dir: &str,
    big: &str,
    small: &str,
    data_extra: &str,
) -> std::path::PathBuf {
    let cfg = run_config(dir, run_dir, big, 16, "");
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        &format!("root = \"{big}\""),
        &format!(
            "sources = [{{ root = \"{big}\", weight = 3.0 }}, {{ root = \"{small}\", weight = 1.0 }}]\n{data_extra}"
        ),
    );
    std::fs::write(&cfg, text).expect("config");
    cfg
}

#[test]
fn two_sources_are_each_used_once_and_counted_in_metrics() {
    let tmp = tempfile::tempdir().expect("tmp");
    // 330 and 110 rows, 10 % val: 297 and 99 train samples in row groups of 20.
    let big = synth_into(&tmp.path().join("big"), 330, 5);
    let small = synth_into(&tmp.path().join("small"), 110, 6);
    let opts = Default::default();
    let (big_keys, small_keys) = (train_keys(&big, &opts), train_keys(&small, &opts));
    let run_dir = tmp.path().join("run").display().to_string();
    let cfg = three_to_one_config(tmp.path(), &run_dir, &big, &small, "");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _w: Vec<Proc> = ["w-a", "w-b"].iter().map(|id| worker(grpc, id)).collect();
    let s = wait_until(http, "the end", Duration::from_secs(300), |s| {
        s["state"] == "finished"
    });

    // Exactly once: the fed keys are the two train splits' keys as a multiset (synth names
    // its keys by index, so the sources share names and only counts tell them apart).
    let steps = audited_steps(&run_dir, &opts);
    let mut fed: BTreeMap<String, u32> = BTreeMap::new();
    for k in steps.values().flat_map(|st| st.keys.iter()) {
        *fed.entry(k.clone()).or_default() += 1;
    }
    let mut want: BTreeMap<String, u32> = BTreeMap::new();
    for k in big_keys.iter().chain(&small_keys) {
        *want.entry(k.clone()).or_default() += 1;
    }
    assert_eq!(fed, want, "each sample of each source once");
    let used: usize = steps.values().map(|st| st.keys.len()).sum();

    let (code, page) = get(http, "/metrics", Some(TOKEN)).expect("GET /metrics");
    assert_eq!(code, 200, "{page}");
    let a = source_samples(&page, &big).expect("big source's count");
    let b = source_samples(&page, &small).expect("small source's count");
    assert_eq!(a as usize, big_keys.len(), "{page}");
    assert_eq!(b as usize, small_keys.len(), "{page}");
    assert_eq!((a + b) as usize, used, "the counts sum to the samples used");

    let sources = s["sources"].as_array().expect("/api/status sources");
    let counts: Vec<(String, u64, f64)> = sources
        .iter()
        .map(|x| {
            (
                x["root"].as_str().unwrap_or_default().to_string(),
                x["samples"].as_u64().unwrap_or(0),
                x["weight"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            (big.clone(), big_keys.len() as u64, 3.0),
            (small.clone(), small_keys.len() as u64, 1.0)
        ]
    );
}

/// Runs one epoch over two sources (weights 3:1, sizes 3:1) with `data.lanes = 3` and the
/// given workers (id, fault); the run's steps as its audit records count them.
fn laned_run(
    root: &std::path::Path,
    big: &str,
    small: &str,
    workers: &[(&str, &str)],
) -> BTreeMap<u64, AuditedStep> {
    std::fs::create_dir_all(root).expect("mkdir");
    let run_dir = root.join("run").display().to_string();
    let cfg = three_to_one_config(root, &run_dir, big, small, "lanes = 3");
    let (grpc, http) = (free_port(), free_port());
    let _coord = coordinator(&cfg, grpc, http);
    let _w: Vec<Proc> = workers
        .iter()
        .map(|(id, fault)| match fault {
            &"" => worker(grpc, id),
            f => worker_with(grpc, id, &[("FERROCLIP_FAULT", f)]),
        })
        .collect();
    let s = wait_until(http, "the end", Duration::from_secs(300), |s| {
        s["state"] == "finished"
    });
    if workers.iter().any(|(_, f)| !f.is_empty()) {
        assert!(
            s["counters"]["recoveries"].as_u64().unwrap_or(0) >= 1,
            "no recovery recorded: {s}"
        );
    }
    audited_steps(&run_dir, &Default::default())
}

/// `data.lanes`: the same mixed epoch trained by one worker and by three, one of which is
/// SIGKILLed (after applying its 4th step; or with its 6th step's samples leased, that step
/// abandoned) and the others regroup as two, feeds the same samples in the same order at every
/// step: the global batches are world-size independent.
#[test]
fn with_fixed_lanes_one_worker_and_three_then_two_feed_the_same_steps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let big = synth_into(&tmp.path().join("big"), 330, 5);
    let small = synth_into(&tmp.path().join("small"), 110, 6);
    let one = laned_run(&tmp.path().join("one"), &big, &small, &[("w-a", "")]);
    let opts = Default::default();
    let total = train_keys(&big, &opts).len() + train_keys(&small, &opts).len();
    assert_eq!(one.len(), total.div_ceil(16), "steps at world 1");
    assert!(
        one.values().take(total / 16).all(|s| s.keys.len() == 16),
        "full batches"
    );
    for fault in ["applied:4", "load:6"] {
        let three = laned_run(
            &tmp.path().join(fault.replace(':', "-")),
            &big,
            &small,
            &[("w-a", ""), ("w-b", fault), ("w-c", "")],
        );
        assert_eq!(
            one.len(),
            three.len(),
            "{fault}: steps at world 1 and 3 → 2"
        );
        for (step, a) in &one {
            assert_eq!(
                a.keys, three[step].keys,
                "{fault}: step {step}'s samples, in order"
            );
        }
        assert!(
            three.values().any(|s| s.checksums.len() == 2),
            "{fault}: a step applied by two ranks (after the kill)"
        );
        let used: usize = three.values().map(|s| s.keys.len()).sum();
        assert_eq!(
            used, total,
            "{fault}: every sample once (the multiset: two_sources_… above)"
        );
    }
}
