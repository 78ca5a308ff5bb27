use super::*;

#[test]
fn defaults_round_trip_through_toml() {
    let cfg = RunConfig::default();
    let back = RunConfig::parse(&cfg.to_toml(), "mem").expect("parse");
    assert_eq!(cfg, back);
}

#[test]
fn unknown_field_names_the_field() {
    let err = RunConfig::parse("[optim]\nglobal_bach = 3\n", "run.toml").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("run.toml") && msg.contains("global_bach"),
        "{msg}"
    );
}

#[test]
fn wrong_type_and_bad_values_are_rejected() {
    let err = RunConfig::parse("[optim]\nglobal_batch = \"x\"\n", "a.toml").unwrap_err();
    assert!(err.to_string().contains("global_batch"), "{err}");
    let err = RunConfig::parse("[objectives]\ncontrastive = 0.0\n", "b.toml").unwrap_err();
    assert!(err.to_string().contains("objectives"), "{err}");
    let err = RunConfig::parse("[cluster]\nbackend = \"mpi\"\n", "c.toml").unwrap_err();
    assert!(err.to_string().contains("cluster.backend"), "{err}");
    let err = RunConfig::parse("[cluster]\ntransport = \"rdma\"\n", "c.toml").unwrap_err();
    assert!(err.to_string().contains("cluster.transport"), "{err}");
    let err = RunConfig::parse("[optim]\nprecision = \"fp16\"\n", "c.toml").unwrap_err();
    assert!(err.to_string().contains("optim.precision"), "{err}");
    let err = RunConfig::parse("[cluster]\noverlap_allreduce = \"yes\"\n", "c.toml").unwrap_err();
    assert!(
        err.to_string().contains("cluster.overlap_allreduce"),
        "{err}"
    );
}

#[test]
fn numbers_that_reach_durations_and_indices_are_checked_naming_the_key() {
    for (text, key) in [
        (
            "[cluster]\nheartbeat_timeout_s = nan\n",
            "cluster.heartbeat_timeout_s",
        ),
        (
            "[cluster]\nheartbeat_timeout_s = -1.0\n",
            "cluster.heartbeat_timeout_s",
        ),
        (
            "[cluster]\nheartbeat_interval_s = inf\n",
            "cluster.heartbeat_interval_s",
        ),
        (
            "[cluster]\nheartbeat_interval_s = 0.0\n",
            "cluster.heartbeat_interval_s",
        ),
        (
            "[cluster]\nheartbeat_interval_s = 10.0\nheartbeat_timeout_s = 5.0\n",
            "cluster.heartbeat_interval_s",
        ),
        (
            "[cluster]\ncollective_timeout_s = 0.0\n",
            "cluster.collective_timeout_s",
        ),
        ("[cluster]\nsettle_s = -0.5\n", "cluster.settle_s"),
        ("[cluster]\nbucket_mb = inf\n", "cluster.bucket_mb"),
        ("[store]\nretry_budget_s = 0.0\n", "store.retry_budget_s"),
        ("[store]\nretry_budget_s = nan\n", "store.retry_budget_s"),
        ("[data]\ncrop_scale = [nan, 1.0]\n", "data.crop_scale"),
        ("[data]\ncrop_scale = [0.5, nan]\n", "data.crop_scale"),
        (
            "[data]\nlanes = 9\n[optim]\nglobal_batch = 8\n",
            "data.lanes",
        ),
        ("[optim]\nlr = nan\n", "optim.lr"),
        ("[optim]\neps = 0.0\n", "optim.eps"),
        ("[optim]\nbeta2 = 1.0\n", "optim.beta2"),
        ("[optim]\nweight_decay = -0.1\n", "optim.weight_decay"),
        (
            "[optim]\nweight_decay_rule = \"all\"\n",
            "optim.weight_decay_rule",
        ),
        ("[optim]\ngrad_clip = nan\n", "optim.grad_clip"),
        ("[objectives]\nmlm = nan\n", "objectives.mlm"),
        ("[run]\nepochs = 0\n", "run.epochs"),
        (
            "[model]\nlock_text_unlocked_groups = 2\n",
            "model.lock_text_unlocked_groups",
        ),
    ] {
        let err = RunConfig::parse(text, "k.toml").unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains("k.toml"),
            "{text:?}: {err}"
        );
    }
    RunConfig::parse("[data]\nlanes = 8\n[optim]\nglobal_batch = 8\n", "ok.toml")
        .expect("as many lanes as samples");
    // A step-limited run may say epochs = 0.
    RunConfig::parse("[run]\nsteps = 10\nepochs = 0\n", "ok.toml").expect("valid");
}

#[test]
fn itm_needs_a_fusion_encoder_and_no_micro_batches() {
    let err = RunConfig::parse("[objectives]\nitm = 1.0\n", "a.toml").unwrap_err();
    assert!(err.to_string().contains("model.fusion_layers"), "{err}");
    let err = RunConfig::parse(
        "[model]\nfusion_layers = 0\n[objectives]\nitm = 1.0\n",
        "a.toml",
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.fusion_layers"), "{err}");
    let err = RunConfig::parse("[model]\nfusion_layers = -1\n", "a.toml").unwrap_err();
    assert!(err.to_string().contains("model.fusion_layers"), "{err}");
    let err = RunConfig::parse(
        "[model]\nfusion_layers = 2\n[objectives]\nitm = 1.0\n[optim]\nmicro_batch = 4\n",
        "a.toml",
    )
    .unwrap_err();
    assert!(err.to_string().contains("optim.micro_batch"), "{err}");
    let err = RunConfig::parse("[objectives]\nitm = -1.0\n", "a.toml").unwrap_err();
    assert!(err.to_string().contains("objectives.itm"), "{err}");
    for ok in [
        "[model]\nfusion_layers = 2\n[objectives]\nitm = 1.0\n",
        "[model]\npreset = \"ViT-B-16-fusion\"\n[objectives]\nitm = 1.0\n",
        "[model]\ninit = \"ckpt/\"\n[objectives]\nitm = 1.0\n",
    ] {
        RunConfig::parse(ok, "a.toml").expect(ok);
    }
}

#[test]
fn data_sources_mix_several_datasets() {
    let cfg = RunConfig::parse(
        "[data]\nsources = [{ root = \"a\", weight = 3.0 }, { root = \"s3://b/c\" }]\n",
        "m.toml",
    )
    .expect("parse");
    let s = cfg.data.sources();
    assert_eq!((s[0].root.as_str(), s[0].weight), ("a", 3.0));
    assert_eq!((s[1].root.as_str(), s[1].weight), ("s3://b/c", 1.0));
    assert_eq!(cfg.data.describe(), "a + s3://b/c");
    let back = RunConfig::parse(&cfg.to_toml(), "mem").expect("round trip");
    assert_eq!(back, cfg);
    // data.root alone is one source of weight 1; neither is the default dataset.
    let one = RunConfig::parse("[data]\nroot = \"d\"\n", "r.toml").expect("parse");
    assert_eq!(one.data.sources().len(), 1);
    assert_eq!(one.data.sources()[0].weight, 1.0);
    assert_eq!(
        RunConfig::default().data.describe(),
        DataSection::DEFAULT_ROOT
    );
}

#[test]
fn bad_data_sources_name_the_field() {
    for (text, field) in [
        (
            "[data]\nroot = \"a\"\nsources = [{ root = \"b\" }]\n",
            "data.sources",
        ),
        (
            "[data]\nsources = [{ root = \"a\" }, { root = \"b\", weight = 0.0 }]\n",
            "data.sources[1].weight",
        ),
        (
            "[data]\nsources = [{ root = \"a\", weight = nan }]\n",
            "data.sources[0].weight",
        ),
        (
            "[data]\nsources = [{ root = \"a\", weight = -1.0 }]\n",
            "data.sources[0].weight",
        ),
        (
            "[data]\nsources = [{ root = \"a\", weight = inf }]\n",
            "data.sources[0].weight",
        ),
        (
            "[data]\nsources = [{ root = \"\" }]\n",
            "data.sources[0].root",
        ),
        (
            "[data]\nsources = [{ root = \"a\" }, { root = \"a/\" }]\n",
            "data.sources[1].root",
        ),
    ] {
        let err = RunConfig::parse(text, "m.toml").unwrap_err().to_string();
        assert!(err.contains(&format!("{field}:")), "{text}: {err}");
    }
    let err = RunConfig::parse(
        "[data]\nroot = \"a\"\nsources = [{ root = \"b\" }]\n",
        "m.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("data.root"), "{err}");
}
