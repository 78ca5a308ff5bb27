//! The coordinator over real gRPC on 127.0.0.1, on a real synthetic dataset: authentication,
//! generation checks, malformed requests, step commits, and resuming from the journal.

use clap::Parser;
use ferroclip_coordinator::{serve, ServeOptions};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "test-token-0123456789";

#[derive(Parser)]
struct Shards {
    #[command(flatten)]
    args: ferroclip_shards::cli::ShardsArgs,
}

async fn synth(dir: &std::path::Path) -> String {
    let out = dir.join("data").to_string_lossy().to_string();
    let cmd = Shards::parse_from([
        "shards",
        "synth",
        "--out",
        &out,
        "--rows",
        "120",
        "--seed",
        "1",
        "--image-size",
        "16",
        "--rows-per-row-group",
        "10",
        "--val-fraction",
        "0.1",
        "--no-progress",
    ]);
    ferroclip_shards::cli::run(cmd.args)
        .await
        .expect("synth dataset");
    out
}

fn config(data: &str, run_dir: &std::path::Path) -> RunConfig {
    let mut c = RunConfig::default();
    c.data.root = Some(data.into());
    c.run.dir = run_dir.to_string_lossy().to_string();
    c.run.steps = 50;
    c.optim.global_batch = 8;
    c.cluster.min_workers = 1;
    c.cluster.max_workers = 2;
    c.cluster.settle_s = 0.2;
    c
}

fn authed<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    // A member's session secret (Join adopts the first one presented for a free id).
    r.metadata_mut().insert(
        ferroclip_proto::SESSION_HEADER,
        "test-session-0123456789abcdef".parse().expect("ascii"),
    );
    r
}

fn join_req(id: &str, applied: u64) -> v1::JoinRequest {
    v1::JoinRequest {
        worker_id: id.into(),
        host: "test".into(),
        device: "cpu".into(),
        collective_addr: "127.0.0.1:1".into(),
        last_generation: 0,
        last_applied_step: applied,
        state_generation: 0,
    }
}

async fn start(
    cfg: RunConfig,
    fresh: bool,
) -> (ferroclip_coordinator::Handle, CoordinatorClient<Channel>) {
    let h = serve(ServeOptions {
        config: cfg,
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: Some("127.0.0.1:0".parse().expect("addr")),
        heartbeat_addr: None,
        token: TOKEN.into(),
        viewer_token: None,
        tls: None,
        journal: None,
        fresh,
        store: Default::default(),
    })
    .await
    .expect("coordinator starts");
    let c = CoordinatorClient::connect(format!("http://{}", h.grpc_addr))
        .await
        .expect("connect");
    (h, c)
}

#[tokio::test]
async fn rejects_bad_calls_and_commits_good_steps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path()).await;
    let (h, mut c) = start(config(&data, &tmp.path().join("run")), false).await;

    // Token: missing and wrong are UNAUTHENTICATED.
    let e = c
        .status(authed(v1::StatusRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .join(authed(join_req("a", 0), Some("wrong-token-xxxx")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Malformed requests are INVALID_ARGUMENT.
    let e = c
        .join(authed(join_req("", 0), Some(TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut bad = join_req("a", 0);
    bad.collective_addr = "no-port".into();
    let e = c.join(authed(bad, Some(TOKEN))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let place = c
        .join(authed(join_req("a", 0), Some(TOKEN)))
        .await
        .expect("join")
        .into_inner();
    assert_eq!((place.generation, place.rank, place.world_size), (1, 0, 1));
    assert_eq!(place.next_step, 1);
    assert!(RunConfig::parse(&place.run_config_toml, "join").is_ok());
    // The Join carries the generation's first two steps (a new world does not ask NextStep
    // all at once); NextStep answers them the same below.
    let first: Vec<_> = place.first_steps.iter().map(|r| r.step).collect();
    assert_eq!(first, [1, 2]);

    // Stale generation and unknown workers are FAILED_PRECONDITION.
    let hb = |id: &str, g| {
        authed(
            v1::HeartbeatRequest {
                worker_id: id.into(),
                generation: g,
                store_wait_s: 0.0,
            },
            Some(TOKEN),
        )
    };
    assert_eq!(
        c.heartbeat(hb("a", 0)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        c.heartbeat(hb("zz", 1)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert!(c.heartbeat(hb("a", 1)).await.is_ok());

    // Steps: 8 samples each, committed by the only rank; samples never repeat.
    let mut seen = std::collections::HashSet::new();
    for step in 1..=3u64 {
        let r = c
            .next_step(authed(
                v1::NextStepRequest {
                    worker_id: "a".into(),
                    generation: 1,
                    step,
                },
                Some(TOKEN),
            ))
            .await
            .expect("next step")
            .into_inner();
        assert_eq!(r.samples.len(), 8);
        assert_eq!(r.global_batch, 8);
        if let Some(carried) = place.first_steps.iter().find(|c| c.step == step) {
            assert_eq!(carried.samples, r.samples, "step {step}: the Join's answer");
            assert_eq!(carried.prefetch_blocks, r.prefetch_blocks);
        }
        assert!(
            r.rank_batches.is_empty(),
            "an even split is not spelled out"
        );
        for s in &r.samples {
            assert!(seen.insert((s.epoch, s.block, s.row)), "sample repeated");
        }
        let commit = c
            .commit_step(authed(
                v1::CommitStepRequest {
                    worker_id: "a".into(),
                    generation: 1,
                    step,
                    samples: 8,
                    metrics: vec![v1::Metric {
                        name: "loss/total".into(),
                        value: 1.0 / step as f64,
                    }],
                    next_step: 0,
                },
                Some(TOKEN),
            ))
            .await
            .expect("commit")
            .into_inner();
        assert!(commit.committed);
    }
    // Committing an old step again (a retry after a lost answer) says it is committed and
    // changes nothing; a step never assigned is refused. The run goes on.
    // A commit of `step` asking for `next_step` with it (0: none).
    let commit = |step, next_step| {
        authed(
            v1::CommitStepRequest {
                worker_id: "a".into(),
                generation: 1,
                step,
                samples: 8,
                metrics: vec![],
                next_step,
            },
            Some(TOKEN),
        )
    };
    let again = c.commit_step(commit(2, 0)).await.expect("retried commit");
    assert!(again.into_inner().committed);
    let e = c.commit_step(commit(9, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let s = c
        .status(authed(v1::StatusRequest {}, Some(TOKEN)))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.step, 3);
    assert_eq!(s.state, "training");

    // /metrics needs the token and exposes the committed step.
    let http = h.http_addr.expect("http");
    let body = http_get(http, "/metrics", Some(TOKEN)).await;
    assert!(body.contains("ferroclip_step 3"), "{body}");
    assert!(http_get(http, "/metrics", None)
        .await
        .contains("token required"));
    assert!(http_get(http, "/healthz", None).await.contains("ok"));

    // A commit may carry the next step's NextStep: the same answer NextStep gives, journaled
    // with the commit. A step that cannot be assigned (too far ahead, or committed) rides
    // along as nothing, and the commit still counts.
    let r = c
        .commit_step(commit(3, 4))
        .await
        .expect("commit with next")
        .into_inner();
    let next = r.next.expect("step 4 rides on the commit");
    assert_eq!(
        (next.step, next.samples.len(), next.global_batch),
        (4, 8, 8)
    );
    for s in &next.samples {
        assert!(seen.insert((s.epoch, s.block, s.row)), "sample repeated");
    }
    let asked = c
        .next_step(authed(
            v1::NextStepRequest {
                worker_id: "a".into(),
                generation: 1,
                step: 4,
            },
            Some(TOKEN),
        ))
        .await
        .expect("next step 4")
        .into_inner();
    assert_eq!(asked.samples, next.samples, "NextStep answers the same");
    let far = c
        .commit_step(commit(4, 9))
        .await
        .expect("commit 4")
        .into_inner();
    assert!(far.committed && far.next.is_none(), "{far:?}");
    let done = c
        .commit_step(commit(4, 4))
        .await
        .expect("commit 4 again")
        .into_inner();
    assert!(done.committed && done.next.is_none(), "{done:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn a_restarted_coordinator_resumes_from_its_journal() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path()).await;
    let cfg = config(&data, &tmp.path().join("run"));
    let (h, mut c) = start(cfg.clone(), false).await;
    c.join(authed(join_req("a", 0), Some(TOKEN)))
        .await
        .expect("join");
    let mut first = Vec::new();
    for step in 1..=2u64 {
        let r = c
            .next_step(authed(
                v1::NextStepRequest {
                    worker_id: "a".into(),
                    generation: 1,
                    step,
                },
                Some(TOKEN),
            ))
            .await
            .expect("next")
            .into_inner();
        first.extend(r.samples.iter().map(|s| (s.epoch, s.block, s.row)));
        c.commit_step(authed(
            v1::CommitStepRequest {
                worker_id: "a".into(),
                generation: 1,
                step,
                samples: 8,
                metrics: vec![],
                next_step: 0,
            },
            Some(TOKEN),
        ))
        .await
        .expect("commit");
    }
    // Step 3 is handed out and applied by the worker, but the coordinator dies before the commit.
    let r3 = c
        .next_step(authed(
            v1::NextStepRequest {
                worker_id: "a".into(),
                generation: 1,
                step: 3,
            },
            Some(TOKEN),
        ))
        .await
        .expect("next")
        .into_inner();
    first.extend(r3.samples.iter().map(|s| (s.epoch, s.block, s.row)));
    drop(h); // a crash: no final journal write, the lease runs out

    // Another run's journal (another seed) is refused, naming what differs.
    let mut other = cfg.clone();
    other.run.seed += 1;
    let err = serve(ServeOptions {
        config: other,
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: None,
        heartbeat_addr: None,
        token: TOKEN.into(),
        viewer_token: None,
        tls: None,
        journal: None,
        fresh: false,
        store: Default::default(),
    })
    .await
    .err()
    .expect("refused");
    assert!(
        err.to_string().contains("run.seed") && err.to_string().contains("--fresh"),
        "{err}"
    );

    // The same arguments resume it, unattended.
    let (h, mut c) = start(cfg, false).await;
    // The worker re-joins saying it applied step 3: the journaled assignment of step 3 commits.
    let place = c
        .join(authed(join_req("a", 3), Some(TOKEN)))
        .await
        .expect("join")
        .into_inner();
    assert_eq!(place.next_step, 4);
    assert!(!place.needs_state);
    let r4 = c
        .next_step(authed(
            v1::NextStepRequest {
                worker_id: "a".into(),
                generation: place.generation,
                step: 4,
            },
            Some(TOKEN),
        ))
        .await
        .expect("next")
        .into_inner();
    for s in &r4.samples {
        assert!(
            !first.contains(&(s.epoch, s.block, s.row)),
            "sample repeated after restart"
        );
    }
    h.shutdown().await;
}

/// Heartbeats are served on a port of their own (named by the Join answer) by a thread of
/// their own, and never wait for the run: a beat arriving while another call holds the run
/// is answered at once and applied, as of its arrival, before the next check for silent
/// members.
#[tokio::test]
async fn heartbeats_have_their_own_port_and_are_answered_while_the_run_is_locked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path()).await;
    let (h, mut c) = start(config(&data, &tmp.path().join("run")), false).await;
    let place = c
        .join(authed(join_req("a", 0), Some(TOKEN)))
        .await
        .expect("join")
        .into_inner();
    assert_eq!(place.heartbeat_port, u32::from(h.heartbeat_addr.port()));
    assert_ne!(h.heartbeat_addr.port(), h.grpc_addr.port());
    let mut lane = CoordinatorClient::connect(format!("http://{}", h.heartbeat_addr))
        .await
        .expect("connect to the heartbeat port");
    let hb = |g| {
        authed(
            v1::HeartbeatRequest {
                worker_id: "a".into(),
                generation: g,
                store_wait_s: 0.0,
            },
            Some(TOKEN),
        )
    };
    // The same rules as on the main port: the token, the member's generation.
    let e = lane
        .heartbeat(authed(
            v1::HeartbeatRequest {
                worker_id: "a".into(),
                generation: place.generation,
                store_wait_s: 0.0,
            },
            Some("wrong-token-xxxx"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = lane.heartbeat(hb(place.generation + 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        !lane
            .heartbeat(hb(place.generation))
            .await
            .expect("beat")
            .into_inner()
            .stop
    );

    let seen = |run: &ferroclip_coordinator::run::Run| {
        run.members
            .members()
            .iter()
            .find(|m| m.info.worker_id == "a")
            .map(|m| m.last_seen)
            .expect("a is a member")
    };
    let held = h.shared.run.lock().await;
    let before = seen(&held);
    let sent = std::time::Instant::now();
    let within = std::time::Duration::from_secs(5);
    // On either port, with the run held by another call: answered, not waiting for it.
    for (port, r) in [
        (
            "heartbeat",
            tokio::time::timeout(within, lane.heartbeat(hb(place.generation))).await,
        ),
        (
            "main",
            tokio::time::timeout(within, c.heartbeat(hb(place.generation))).await,
        ),
    ] {
        let r = r.unwrap_or_else(|_| panic!("a beat on the {port} port waited for the run"));
        assert!(!r.expect("beat").into_inner().stop, "{port} port");
    }
    assert_eq!(seen(&held), before, "applied only once the run is free");
    drop(held);
    h.shared.tick().await;
    let after = seen(&*h.shared.run.lock().await);
    assert!(
        after >= sent && after > before,
        "the deferred beats count as of their arrival"
    );
    h.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("http connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
