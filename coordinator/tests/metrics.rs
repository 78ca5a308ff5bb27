//! The coordinator's /metrics page over real gRPC and HTTP: what two ranks report in CommitStep
//! becomes the step's record (losses weighted by each rank's samples, other figures averaged)
//! and per-worker series.

use clap::Parser;
use ferroclip_coordinator::{serve, ServeOptions};
use ferroclip_proto::config::RunConfig;
use ferroclip_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::Request;

const TOKEN: &str = "metrics-test-token-0123";

#[derive(Parser)]
struct Shards {
    #[command(flatten)]
    args: ferroclip_shards::cli::ShardsArgs,
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    // A member's session secret (Join adopts the first one presented for a free id).
    r.metadata_mut().insert(
        ferroclip_proto::SESSION_HEADER,
        "test-session-0123456789abcdef".parse().expect("ascii"),
    );
    r
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn metric(name: &str, value: f64) -> v1::Metric {
    v1::Metric {
        name: name.into(),
        value,
    }
}

type Ranks = Vec<(
    CoordinatorClient<tonic::transport::Channel>,
    &'static str,
    u32,
)>;

/// Both workers join (concurrently: a generation forms once both wait); (client, id, rank).
async fn join_all(url: &str, last_generation: u64, last_applied_step: u64) -> Ranks {
    let mut joins = Vec::new();
    for id in ["w-a", "w-b"] {
        let url = url.to_string();
        joins.push(tokio::spawn(async move {
            let mut c = CoordinatorClient::connect(url).await.expect("connect");
            let place = c
                .join(authed(v1::JoinRequest {
                    worker_id: id.into(),
                    host: format!("host-{id}"),
                    device: "cpu".into(),
                    collective_addr: "127.0.0.1:1".into(),
                    last_generation,
                    last_applied_step,
                    state_generation: last_generation,
                }))
                .await
                .expect("join")
                .into_inner();
            (c, id, place.rank)
        }));
    }
    let mut ranks = Vec::new();
    for j in joins {
        ranks.push(j.await.expect("join task"));
    }
    ranks
}

/// The value of the first line starting with `series` on the /metrics page.
async fn scrape(http: std::net::SocketAddr, series: &str) -> f64 {
    let body = http_get(http, "/metrics").await;
    let page = body.split("\r\n\r\n").nth(1).expect("body").to_string();
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in\n{page}"))
}

#[tokio::test]
async fn committed_figures_become_metrics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data").to_string_lossy().to_string();
    let synth = Shards::parse_from([
        "shards",
        "synth",
        "--out",
        &data,
        "--rows",
        "60",
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
    ferroclip_shards::cli::run(synth.args).await.expect("synth");
    let mut cfg = RunConfig::default();
    cfg.data.root = Some(data);
    cfg.run.dir = tmp.path().join("run").to_string_lossy().to_string();
    cfg.run.steps = 10;
    cfg.optim.global_batch = 8;
    cfg.cluster.min_workers = 2;
    cfg.cluster.max_workers = 2;
    cfg.cluster.settle_s = 0.2;
    let h = serve(ServeOptions {
        config: cfg,
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: Some("127.0.0.1:0".parse().expect("addr")),
        heartbeat_addr: None,
        token: TOKEN.into(),
        viewer_token: None,
        tls: None,
        journal: None,
        fresh: false,
        store: Default::default(),
    })
    .await
    .expect("coordinator starts");
    let url = format!("http://{}", h.grpc_addr);
    let mut ranks = join_all(&url, 0, 0).await;
    // Rank 0 had 8 rows and loss 2; rank 1 had none (it reports 0, which must not count).
    for (c, id, rank) in ranks.iter_mut() {
        let (rows, loss, step_s) = if *rank == 0 {
            (8, 2.0, 0.5)
        } else {
            (0, 0.0, 0.7)
        };
        c.next_step(authed(v1::NextStepRequest {
            worker_id: id.to_string(),
            generation: 1,
            step: 1,
        }))
        .await
        .expect("next step");
        c.commit_step(authed(v1::CommitStepRequest {
            worker_id: id.to_string(),
            generation: 1,
            step: 1,
            samples: rows,
            metrics: vec![
                metric("loss/total", loss),
                metric("lr", 1e-3),
                metric("time/step_s", step_s),
                metric("time/data_wait_s", 0.1),
                metric("time/allreduce_s", 0.2),
                metric("allreduce/busbw_bytes_per_s", 4e6),
                metric("grad_norm", 3.0),
            ],
            next_step: 0,
        }))
        .await
        .expect("commit");
    }
    let rank1 = ranks
        .iter()
        .find(|r| r.2 == 1)
        .map(|r| r.1)
        .expect("a rank 1");
    let http = h.http_addr.expect("http");
    let body = http_get(http, "/metrics").await;
    let page = body.split("\r\n\r\n").nth(1).expect("body");
    let value = |series: &str| -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} not in\n{page}"))
    };
    assert_eq!(value("ferroclip_step "), 1.0);
    assert_eq!(value("ferroclip_workers "), 2.0);
    assert_eq!(value("ferroclip_loss{objective=\"total\"} "), 2.0);
    assert_eq!(value("ferroclip_learning_rate "), 1e-3);
    assert_eq!(value("ferroclip_grad_norm "), 3.0);
    assert!((value("ferroclip_step_seconds ") - 0.6).abs() < 1e-9);
    assert_eq!(
        value("ferroclip_step_phase_seconds{phase=\"allreduce\"} "),
        0.2
    );
    assert_eq!(
        value("ferroclip_allreduce_bus_bandwidth_bytes_per_second "),
        4e6
    );
    let series = format!(
        "ferroclip_worker_step_seconds{{rank=\"1\",worker=\"{rank1}\",host=\"host-{rank1}\"}} "
    );
    assert_eq!(value(&series), 0.7);
    assert_eq!(value("ferroclip_worker_deaths_total "), 0.0);
    for (name, _, _) in ferroclip_coordinator::metrics::FAMILIES {
        assert!(
            page.contains(&format!("# TYPE {name} ")),
            "{name} not announced"
        );
    }

    // A failure report ends generation 1; both re-join and commit step 2: one death, one
    // recovery with its duration.
    let (c, id, _) = &mut ranks[0];
    c.report_failure(authed(v1::ReportFailureRequest {
        worker_id: id.to_string(),
        generation: 1,
        suspect_rank: 1,
        reason: "test".into(),
    }))
    .await
    .expect("report failure");
    assert_eq!(scrape(http, "ferroclip_worker_deaths_total ").await, 1.0);
    assert_eq!(scrape(http, "ferroclip_recoveries_total ").await, 0.0);
    let mut ranks = join_all(&url, 1, 1).await;
    for (c, id, _) in ranks.iter_mut() {
        c.next_step(authed(v1::NextStepRequest {
            worker_id: id.to_string(),
            generation: 2,
            step: 2,
        }))
        .await
        .expect("next step 2");
        c.commit_step(authed(v1::CommitStepRequest {
            worker_id: id.to_string(),
            generation: 2,
            step: 2,
            samples: 4,
            metrics: vec![metric("loss/total", 1.0)],
            next_step: 0,
        }))
        .await
        .expect("commit 2");
    }
    // The stale generation is refused and counted.
    let (c, id, _) = &mut ranks[0];
    let e = c
        .heartbeat(authed(v1::HeartbeatRequest {
            worker_id: id.to_string(),
            generation: 1,
            store_wait_s: 0.0,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(scrape(http, "ferroclip_step ").await, 2.0);
    assert_eq!(scrape(http, "ferroclip_generation ").await, 2.0);
    assert_eq!(scrape(http, "ferroclip_generations_total ").await, 2.0);
    assert_eq!(scrape(http, "ferroclip_recoveries_total ").await, 1.0);
    assert!(scrape(http, "ferroclip_last_recovery_seconds ").await > 0.0);
    assert!(scrape(http, "ferroclip_rejected_rpcs_total ").await >= 1.0);
    h.shutdown().await;
}
