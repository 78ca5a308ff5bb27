//! TLS on the control plane and the viewer's read-only credential, with real processes over
//! TCP on 127.0.0.1: `ferroclip certs` makes a CA; a coordinator serves gRPC and HTTP over TLS;
//! a worker trains through it; clients that do not trust the CA, plaintext clients, a server
//! certificate for another host and an expired one are refused with messages that name the
//! problem; mutual TLS wants the worker certificate; the viewer token reads but never acts.

mod run_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroclip_proto::tls::ClientTls;
use ferroclip_proto::v1;
use ferroclip_proto::v1::coordinator_client::CoordinatorClient;
use run_common::*;

const VIEWER: &str = "viewer-test-token-9876";

fn certs(dir: &Path, hosts: &str, extra: &[&str]) -> PathBuf {
    let out = Command::new(bin("ferroclip"))
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--hosts", hosts])
        .args(extra)
        .output()
        .expect("run ferroclip certs");
    assert!(
        out.status.success(),
        "certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "worker.pem",
        "worker-key.pem",
    ] {
        assert!(dir.join(f).exists(), "{f} written");
    }
    dir.to_path_buf()
}

fn tls_args(certs: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        certs.join("server.pem").to_string_lossy().into(),
        "--tls-key".into(),
        certs.join("server-key.pem").to_string_lossy().into(),
    ]
}

fn viewer_file(dir: &Path) -> String {
    let p = dir.join("viewer-token");
    std::fs::write(&p, format!("{VIEWER}\n")).expect("viewer token");
    p.to_string_lossy().into()
}

fn start(cfg: &Path, grpc: u16, http: u16, args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    coordinator_with(cfg, grpc, http, &args, &[])
}

/// `ferroclip status` against 127.0.0.1:grpc with `args` and the given token.
fn status_cmd(grpc: u16, token: &str, args: &[&str]) -> Output {
    Command::new(bin("ferroclip"))
        .args(["status", "--coordinator", &format!("127.0.0.1:{grpc}")])
        .args(args)
        .env("FERROCLIP_TOKEN", token)
        .env_remove("FERROCLIP_TLS_CA")
        .output()
        .expect("run ferroclip status")
}

fn ca_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca).expect("ca.pem");
    ClientTls {
        ca: pem,
        identity: None,
    }
    .rustls_config()
    .expect("rustls config")
}

/// One HTTP/1.1 request over TLS: (status, headers, body); Err(the TLS or I/O error).
fn https(
    cfg: &Arc<rustls::ClientConfig>,
    port: u16,
    request: &str,
) -> Result<(u16, String, String), String> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // A server that closes without close_notify still sent the whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let out = String::from_utf8_lossy(&out).to_string();
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    Ok((code, head.to_string(), body.to_string()))
}

fn https_get(
    cfg: &Arc<rustls::ClientConfig>,
    port: u16,
    path: &str,
    headers: &str,
) -> Result<(u16, String, String), String> {
    https(
        cfg,
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn a_worker_trains_over_tls_and_untrusting_or_plaintext_clients_fail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ca_dir = certs(&tmp.path().join("certs"), "127.0.0.1,localhost", &[]);
    let other = certs(&tmp.path().join("other"), "127.0.0.1", &[]);
    let data = synth(tmp.path(), 48, 3);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let (grpc, http) = (free_port(), free_port());
    let mut args = tls_args(&ca_dir);
    args.extend(["--viewer-token-file".into(), viewer_file(tmp.path())]);
    let _coord = start(&cfg, grpc, http, &args);
    let ca = ca_dir.join("ca.pem").to_string_lossy().to_string();
    let _w = worker_with(grpc, "w-tls", &[("FERROCLIP_TLS_CA", &ca)]);

    // HTTPS with the viewer token, until the run is finished.
    let client = ca_client(&ca_dir.join("ca.pem"));
    let auth = format!("Authorization: Bearer {VIEWER}\r\n");
    let start = Instant::now();
    let finished = loop {
        if let Ok((200, _, body)) = https_get(&client, http, "/api/status", &auth) {
            let s: serde_json::Value = serde_json::from_str(&body).expect("status json");
            if s["state"] == "finished" {
                break s;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the run over TLS did not finish"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        step_of(&finished) >= 4,
        "the train split of 48 samples / 8: {finished}"
    );
    assert!(
        !finished["last_checkpoint"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "a final checkpoint over TLS"
    );

    // gRPC: `ferroclip status` trusting the CA works (viewer token), with a scheme-less URL.
    let ok = status_cmd(grpc, VIEWER, &["--tls-ca", &ca]);
    assert!(ok.status.success(), "status over TLS: {}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("state finished"));

    // A client that trusts another CA is refused, and says why.
    let other_ca = other.join("ca.pem").to_string_lossy().to_string();
    let bad = status_cmd(grpc, VIEWER, &["--tls-ca", &other_ca]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("invalid peer certificate") && stderr(&bad).contains("UnknownIssuer"),
        "names the untrusted issuer: {}",
        stderr(&bad)
    );
    // Plaintext gRPC to the TLS port fails promptly, with a hint.
    let t = Instant::now();
    let plain = status_cmd(grpc, VIEWER, &[]);
    assert!(!plain.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "plaintext fails promptly"
    );
    assert!(stderr(&plain).contains("--tls-ca"), "{}", stderr(&plain));
    // Plaintext HTTP to the HTTPS port gets no answer (the handshake fails, the server closes).
    assert_eq!(get(http, "/healthz", None).map(|r| r.0), None);
    // HTTPS from a client that does not trust the CA fails its handshake.
    let e = https_get(&ca_client(&other.join("ca.pem")), http, "/healthz", "").unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    // HTTP credentials: the worker token no longer views when a viewer token is configured.
    let worker_auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for path in ["/api/status", "/metrics", "/"] {
        let (code, _, _) = https_get(&client, http, path, &worker_auth).expect("https");
        assert_eq!(code, 401, "{path} with the worker token");
        let (code, _, _) = https_get(&client, http, path, &auth).expect("https");
        assert_eq!(code, 200, "{path} with the viewer token");
    }
    // The dashboard's login: a form post sets an HttpOnly, Secure cookie, which then opens `/`.
    let body = format!("token={VIEWER}");
    let (code, head, _) = https(
        &client,
        http,
        &format!(
            "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("login");
    assert_eq!(code, 303, "{head}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    assert!(
        cookie_line.contains("HttpOnly") && cookie_line.contains("Secure"),
        "{cookie_line}"
    );
    let cookie = cookie_line["set-cookie:".len()..]
        .trim()
        .split(';')
        .next()
        .expect("cookie value")
        .to_string();
    let (code, _, page) =
        https_get(&client, http, "/", &format!("Cookie: {cookie}\r\n")).expect("dashboard");
    assert_eq!(code, 200);
    assert!(
        page.contains("<svg") || page.contains("api/status"),
        "the dashboard page"
    );
    let (code, _, _) = https_get(
        &client,
        http,
        "/api/status",
        &format!("Cookie: {cookie}\r\n"),
    )
    .expect("api");
    assert_eq!(code, 200, "the dashboard's polls carry the cookie");
    let (code, _, _) = https_get(&client, http, "/login?once=not-a-code", "").expect("once");
    assert_eq!(code, 401, "an unknown one-time code");
}

#[test]
fn a_certificate_for_another_host_or_an_expired_one_is_refused_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 16, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let cases = [
        (
            "wrong-host",
            "ferroclip-coordinator.example",
            vec![],
            "not valid for name",
        ),
        (
            "expired",
            "127.0.0.1",
            vec!["--expired"],
            "certificate expired",
        ),
    ];
    for (name, hosts, extra, says) in cases {
        let dir = certs(&tmp.path().join(name), hosts, &extra);
        let (grpc, http) = (free_port(), free_port());
        let _coord = start(&cfg, grpc, http, &tls_args(&dir));
        let ca = dir.join("ca.pem").to_string_lossy().to_string();
        let start = Instant::now();
        let out = loop {
            let out = status_cmd(grpc, TOKEN, &["--tls-ca", &ca]);
            assert!(
                !out.status.success(),
                "{name}: a bad certificate was accepted"
            );
            // Until the coordinator listens the error is "connection refused".
            if stderr(&out).contains("invalid peer certificate")
                || start.elapsed() > Duration::from_secs(30)
            {
                break out;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
    }
}

#[test]
fn mutual_tls_wants_a_client_certificate_signed_by_the_ca() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = certs(&tmp.path().join("certs"), "127.0.0.1", &[]);
    let other = certs(&tmp.path().join("other"), "127.0.0.1", &[]);
    let data = synth(tmp.path(), 16, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let (grpc, http) = (free_port(), free_port());
    let mut args = tls_args(&dir);
    args.extend([
        "--tls-client-ca".into(),
        dir.join("ca.pem").to_string_lossy().into(),
    ]);
    let _coord = start(&cfg, grpc, http, &args);
    let p = |d: &Path, f: &str| d.join(f).to_string_lossy().to_string();
    let ca = p(&dir, "ca.pem");
    let start = Instant::now();
    loop {
        let out = status_cmd(
            grpc,
            TOKEN,
            &[
                "--tls-ca",
                &ca,
                "--tls-cert",
                &p(&dir, "worker.pem"),
                "--tls-key",
                &p(&dir, "worker-key.pem"),
            ],
        );
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "mutual TLS: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let none = status_cmd(grpc, TOKEN, &["--tls-ca", &ca]);
    assert!(!none.status.success(), "no client certificate");
    let foreign = status_cmd(
        grpc,
        TOKEN,
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &p(&other, "worker.pem"),
            "--tls-key",
            &p(&other, "worker-key.pem"),
        ],
    );
    assert!(
        !foreign.status.success(),
        "a client certificate of another CA"
    );
}

/// With only the viewer token: every member RPC is PERMISSION_DENIED, Status and /api/status
/// work (plaintext here: the credentials are independent of TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_viewer_token_reads_but_never_acts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 16, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let (grpc, http) = (free_port(), free_port());
    let args = vec!["--viewer-token-file".to_string(), viewer_file(tmp.path())];
    let _coord = start(&cfg, grpc, http, &args);
    let start = Instant::now();
    while get(http, "/api/status", Some(VIEWER)).map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the viewer token reads /api/status"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _) = get(http, "/api/status", Some(TOKEN)).expect("http");
    assert_eq!(code, 401, "the worker token no longer views");
    let (code, _) = get(http, "/metrics", Some(VIEWER)).expect("http");
    assert_eq!(code, 200);

    let mut c = CoordinatorClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .expect("connect");
    fn viewer<T>(msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            ferroclip_proto::AUTH_HEADER,
            format!("Bearer {VIEWER}").parse().expect("header"),
        );
        r
    }
    let id = || "w-viewer".to_string();
    let denied = |name: &str, r: Result<(), tonic::Status>| {
        let e = r.expect_err(name);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{name}: {e:?}");
    };
    denied(
        "Join",
        c.join(viewer(v1::JoinRequest {
            worker_id: id(),
            collective_addr: "127.0.0.1:1".into(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    denied(
        "Heartbeat",
        c.heartbeat(viewer(v1::HeartbeatRequest {
            worker_id: id(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    denied(
        "NextStep",
        c.next_step(viewer(v1::NextStepRequest {
            worker_id: id(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    denied(
        "CommitStep",
        c.commit_step(viewer(v1::CommitStepRequest {
            worker_id: id(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    denied(
        "ReportFailure",
        c.report_failure(viewer(v1::ReportFailureRequest {
            worker_id: id(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    denied(
        "CommitCheckpoint",
        c.commit_checkpoint(viewer(v1::CommitCheckpointRequest {
            worker_id: id(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    denied(
        "Leave",
        c.leave(viewer(v1::LeaveRequest {
            worker_id: id(),
            ..Default::default()
        }))
        .await
        .map(|_| ()),
    );
    c.status(viewer(v1::StatusRequest {}))
        .await
        .expect("Status with the viewer token");
    let out = status_cmd(grpc, VIEWER, &[]);
    assert!(out.status.success(), "ferroclip status: {}", stderr(&out));
}

/// A member's session secret: issued at Join, wanted by every later member RPC; a Join reusing
/// a live member's id without it is refused (ABORTED: a restarted worker retries until the
/// old process's lease runs out) and leaves the member's generation alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reusing_a_live_members_id_cannot_take_its_place() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 16, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let (grpc, http) = (free_port(), free_port());
    let _coord = start(&cfg, grpc, http, &[]);
    let url = format!("http://127.0.0.1:{grpc}");
    let start = Instant::now();
    let mut c = loop {
        if let Ok(c) = CoordinatorClient::connect(url.clone()).await {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "coordinator up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    fn member<T>(msg: T, session: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            ferroclip_proto::AUTH_HEADER,
            format!("Bearer {TOKEN}").parse().expect("header"),
        );
        if let Some(s) = session {
            r.metadata_mut()
                .insert(ferroclip_proto::SESSION_HEADER, s.parse().expect("header"));
        }
        r
    }
    let join = || v1::JoinRequest {
        worker_id: "w-x".into(),
        host: "h".into(),
        device: "cpu".into(),
        collective_addr: "127.0.0.1:1".into(),
        ..Default::default()
    };
    let placed = c
        .join(member(join(), None))
        .await
        .expect("join")
        .into_inner();
    assert_eq!(placed.world_size, 1);
    let session = placed.session.clone();
    assert!(session.len() >= 32, "a session secret: {session:?}");
    let hb = || v1::HeartbeatRequest {
        worker_id: "w-x".into(),
        generation: placed.generation,
        ..Default::default()
    };
    for (what, s) in [
        ("no session", None),
        ("a wrong session", Some("not-the-session-0123456789")),
    ] {
        let e = c.heartbeat(member(hb(), s)).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
        let e = c
            .leave(member(
                v1::LeaveRequest {
                    worker_id: "w-x".into(),
                    generation: placed.generation,
                    ..Default::default()
                },
                s,
            ))
            .await
            .expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
    }
    c.heartbeat(member(hb(), Some(&session)))
        .await
        .expect("the member's own heartbeat");
    // Another process with the worker token and the same id cannot take the member's place.
    let e = c
        .join(member(join(), Some("a-guess-of-the-session-0123")))
        .await
        .expect_err("a second w-x");
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(e.message().contains("live member"), "{}", e.message());
    let s = c
        .status(member(v1::StatusRequest {}, None))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        s.generation, placed.generation,
        "the member's generation goes on"
    );
    c.heartbeat(member(hb(), Some(&session)))
        .await
        .expect("still the member");
}

/// A worker that does not trust the coordinator's certificate stops at once (no 2-minute retry
/// loop) and says why.
#[test]
fn a_worker_that_does_not_trust_the_coordinator_stops_at_once_naming_why() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = certs(&tmp.path().join("certs"), "127.0.0.1", &[]);
    let other = certs(&tmp.path().join("other"), "127.0.0.1", &[]);
    let data = synth(tmp.path(), 16, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let (grpc, http) = (free_port(), free_port());
    let _coord = start(&cfg, grpc, http, &tls_args(&dir));
    // Wait for the coordinator (its HTTPS port answers).
    let client = ca_client(&dir.join("ca.pem"));
    let t = Instant::now();
    while https_get(&client, http, "/healthz", "").is_err() {
        assert!(t.elapsed() < Duration::from_secs(60), "coordinator up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    let out = Command::new(bin("ferroclip-worker"))
        .args(["join", "--coordinator", &format!("127.0.0.1:{grpc}")])
        .args([
            "--device",
            "cpu",
            "--threads",
            "1",
            "--worker-id",
            "w-untrusting",
        ])
        .args(["--advertise-host", "127.0.0.1", "--tls-ca"])
        .arg(other.join("ca.pem"))
        .env("FERROCLIP_TOKEN", TOKEN)
        .output()
        .expect("run the worker");
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "stopped at once, not after the retry budget: {:?}",
        t.elapsed()
    );
    assert!(
        stderr(&out).contains("invalid peer certificate"),
        "{}",
        stderr(&out)
    );
}

/// `ferroclip train` serves TLS by default and prints a one-time dashboard link: it sets the
/// session cookie once (and only once) and redirects to the dashboard.
#[test]
fn the_local_launchers_dashboard_link_logs_in_once() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = synth(tmp.path(), 16, 1);
    let run_dir = tmp.path().join("run").to_string_lossy().to_string();
    let cfg = run_config(tmp.path(), &run_dir, &data, 8, "");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("steps = 0", "steps = 100000");
    std::fs::write(&cfg, text).expect("cfg");
    let mut train = Command::new(bin("ferroclip"))
        .args(["train", "--workers", "1", "--threads", "1", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ferroclip train");
    let lines = std::io::BufReader::new(train.stderr.take().expect("stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (mut link, mut ca) = (None, None);
    let t = Instant::now();
    while link.is_none() || ca.is_none() {
        let l = rx
            .recv_timeout(Duration::from_secs(60).saturating_sub(t.elapsed()))
            .expect("the dashboard link and its CA");
        if let Some(u) = l.strip_prefix("dashboard: ") {
            link = Some(u.trim().to_string());
        }
        if let Some(i) = l.find("own CA, ") {
            ca = Some(
                l[i + "own CA, ".len()..]
                    .split(':')
                    .next()
                    .expect("path")
                    .to_string(),
            );
        }
    }
    let link = link.expect("link");
    let rest = link
        .strip_prefix("https://127.0.0.1:")
        .expect("https on loopback");
    let (port, path) = rest.split_once('/').expect("port/path");
    let port: u16 = port.parse().expect("port");
    let path = format!("/{path}");
    assert!(path.starts_with("/login?once="), "{link}");
    let client = ca_client(Path::new(&ca.expect("ca")));
    let (code, head, _) = https_get(&client, port, &path, "").expect("the link");
    assert_eq!(code, 303, "{head}");
    assert!(head.to_ascii_lowercase().contains("location: /"), "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or(l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .expect("a cookie")
        .to_string();
    let (code, _, _) = https_get(
        &client,
        port,
        "/api/status",
        &format!("Cookie: {cookie}\r\n"),
    )
    .expect("api");
    assert_eq!(code, 200, "the cookie opens the dashboard's API");
    let (code, _, _) = https_get(&client, port, &path, "").expect("the link again");
    assert_eq!(code, 401, "the link works once");
    let _ = Command::new("kill")
        .args(["-INT", &train.id().to_string()])
        .status();
    let t = Instant::now();
    while train.try_wait().expect("wait").is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = train.kill();
            panic!("ferroclip train did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
