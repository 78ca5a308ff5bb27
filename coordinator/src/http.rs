//! The coordinator's HTTP port (HTTPS with `--tls-cert`): Kubernetes probes, Prometheus
//! metrics and the run's status. Everything but the probes and the login needs the viewer's
//! credential: `Authorization: Bearer <viewer token>` (Prometheus, scripts) or the browser
//! session cookie that `/login` sets (the dashboard), never a token in the URL. The viewer
//! token is `--viewer-token-file`; without one, the worker token serves for viewing too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::Request;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::service::Shared;
use ferroclip_proto::metrics as metric;

pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<&crate::tls::ServerTls>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let secure = tls.is_some();
    let guarded = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/login", get(login_page).post(login_form))
        .merge(guarded)
        .layer(axum::Extension(Secure(secure)))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding HTTP address {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let task = match tls {
        Some(tls) => {
            let listener = crate::tls::TlsListener::new(listener, tls.rustls_config()?)?;
            tokio::spawn(async move {
                // axum::serve's own result type is infallible for a custom listener.
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await;
            })
        }
        None => tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
            if let Err(e) = r {
                tracing::error!("HTTP server stopped: {e}");
            }
        }),
    };
    Ok((local, task))
}

/// Whether the port serves HTTPS (the session cookie is then `Secure`).
#[derive(Clone, Copy)]
struct Secure(bool);

/// The browser session id from the `Cookie` header, if any.
fn session_cookie(req: &Request) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == crate::login::COOKIE)
        .map(|(_, v)| v.to_string())
}

/// A redirect to the dashboard that sets a fresh browser session.
fn logged_in(shared: &Shared, secure: bool) -> Response {
    let id = shared.logins.open_session();
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        crate::login::COOKIE,
        crate::login::SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}

const LOGIN_FORM: &str = "<!doctype html><meta charset=utf-8><title>ferroclip: log in</title>\
<style>body{font:15px system-ui,sans-serif;margin:4em auto;max-width:28em}input{font:inherit;padding:.3em;width:100%;box-sizing:border-box;margin:.4em 0}</style>\
<h1>ferroclip</h1><form method=post action=/login autocomplete=off>\
<label>Viewer token<input type=password name=token autofocus required></label>\
<input type=submit value='Open the dashboard'></form>\n";

/// `GET /login`: the form; `GET /login?once=CODE`: a one-time link (from `ferroclip train`)
/// that sets the session cookie and redirects to the dashboard.
async fn login_page(
    State(shared): State<Arc<Shared>>,
    axum::Extension(Secure(secure)): axum::Extension<Secure>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(code) = q.get("once") {
        if shared.logins.redeem(code) {
            return logged_in(&shared, secure);
        }
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            format!("<p>This login link was used already or has expired.</p>{LOGIN_FORM}"),
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        LOGIN_FORM,
    )
        .into_response()
}

/// `POST /login` (form field `token`): the viewer's credential for a session cookie.
async fn login_form(
    State(shared): State<Arc<Shared>>,
    axum::Extension(Secure(secure)): axum::Extension<Secure>,
    body: String,
) -> Response {
    let token = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| form_decode(v))
        .unwrap_or_default();
    if shared.viewer_ok(token.trim()) {
        return logged_in(&shared, secure);
    }
    shared.rejected.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("<p>Wrong token.</p>{LOGIN_FORM}"),
    )
        .into_response()
}

/// `application/x-www-form-urlencoded` value decoding (`+` is a space, `%XX` a byte).
fn form_decode(v: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every route but the probes and the login: the viewer's credential as
/// `Authorization: Bearer …` or the browser session cookie. An old-style dashboard link
/// `/?token=…` logs the browser in and redirects to `/`, so the token leaves the address bar.
async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|t| shared.viewer_ok(t))
        || session_cookie(&req).is_some_and(|id| shared.logins.session_ok(&id))
    {
        return next.run(req).await;
    }
    if req.uri().path() == "/" {
        let query = Query::<HashMap<String, String>>::try_from_uri(req.uri())
            .map(|q| q.0)
            .unwrap_or_default();
        if query.get("token").is_some_and(|t| shared.viewer_ok(t)) {
            let secure = req.extensions().get::<Secure>().is_some_and(|s| s.0);
            return logged_in(&shared, secure);
        }
    }
    shared.rejected.fetch_add(1, Ordering::Relaxed);
    if req.uri().path() == "/" {
        // A person opened the dashboard without a session: the login form.
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            LOGIN_FORM,
        )
            .into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        "viewer token required: Authorization: Bearer <token> (or log in at /login)\n",
    )
        .into_response()
}

async fn status(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // `?history=N`: only the last N step records (the dashboard polls every few seconds).
    let keep = q
        .get("history")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(usize::MAX);
    let run = shared.run.lock().await;
    let s = run.status();
    let skip = run.history.len().saturating_sub(keep);
    let bound = match run.bound() {
        ferroclip_plan::Bound::Steps(n) => serde_json::json!({"steps": n}),
        ferroclip_plan::Bound::Epochs(e) => serde_json::json!({"epochs": e}),
    };
    let body = serde_json::json!({
        "run": run.config.run.name,
        "state": s.state,
        "generation": s.generation,
        "step": s.step,
        "total_steps": run.total_steps(),
        "bound": bound,
        "epoch": s.epoch,
        "epochs": run.config.run.epochs,
        "epoch_progress": s.epoch_progress,
        "samples_per_s": run.throughput(),
        // Per source of data.sources (one entry for data.root): samples used by committed steps.
        "sources": run.source_samples().iter().zip(run.config.data.sources()).map(|((root, n), s)| {
            serde_json::json!({"root": root, "weight": s.weight, "samples": n})
        }).collect::<Vec<_>>(),
        "uptime_s": run.started.elapsed().as_secs_f64(),
        "last_checkpoint": s.last_checkpoint,
        "checkpoint_age_s": run.checkpoint_age_s(),
        "journal": shared.journal_url(),
        "store_wait_s": shared.store_wait_s(),
        "journal_io": shared.journal_io(),
        "workers": s.workers.iter().map(|w| {
            serde_json::json!({
                "rank": w.rank, "worker_id": w.worker_id, "host": w.host, "device": w.device,
                "seconds_since_heartbeat": w.seconds_since_heartbeat,
                "step_time_s": w.step_time_s, "data_wait_s": w.data_wait_s,
                "allreduce_s": w.allreduce_s, "last_step": w.last_step,
                "store_wait_s": w.store_wait_s,
            })
        }).collect::<Vec<_>>(),
        "history": run.history.iter().skip(skip).collect::<Vec<_>>(),
        "events": run.events,
        "counters": run.counters,
        "rejected_rpcs": shared.rejected.load(Ordering::Relaxed),
        // The dashboard charts these keys of the step records (one list with the workers').
        "metric_names": {
            "loss_prefix": metric::LOSS_PREFIX,
            "lr": metric::LR,
            "logit_scale": metric::LOGIT_SCALE,
            "samples_per_s": metric::SAMPLES_PER_S,
            "step_s": metric::STEP_S,
            "phases": metric::PHASES,
            "allreduce_busbw": metric::ALLREDUCE_BUSBW,
        },
    });
    axum::Json(body).into_response()
}

/// Prometheus text exposition format.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let service = crate::metrics::Service {
        rejected: shared.rejected.load(Ordering::Relaxed),
        journal_store_wait_s: shared.store_wait_s(),
    };
    let run = shared.run.lock().await;
    let body = crate::metrics::render(&run, service);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The live dashboard: one self-contained page that polls /api/status with the same token.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        DASHBOARD,
    )
        .into_response()
}

const DASHBOARD: &str = include_str!("dashboard.html");
