//! The coordinator's HTTP port: Kubernetes probes, Prometheus metrics and the run's status.
//! Everything but the probes needs the run token (`Authorization: Bearer …` or `?token=`).

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
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
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
        .merge(guarded)
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
    Ok((local, task))
}

/// Every route but the probes: the run token as `Authorization: Bearer …` or `?token=`.
async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let query = Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default();
    let presented = bearer.or_else(|| query.get("token").cloned());
    if presented.is_some_and(|t| shared.token_ok(&t)) {
        return next.run(req).await;
    }
    shared.rejected.fetch_add(1, Ordering::Relaxed);
    if req.uri().path() == "/" {
        // A person opened the dashboard without the token: say how to.
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<!doctype html><title>ferroclip</title><p>Open this page as <code>/?token=&lt;run token&gt;</code>.</p>\n",
        )
            .into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        "run token required: Authorization: Bearer <token> or ?token=\n",
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
