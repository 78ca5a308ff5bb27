//! The coordinator's HTTP port: Kubernetes probes, Prometheus metrics and the run's status.
//! Everything but the probes needs the run token (`Authorization: Bearer …` or `?token=`).

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::service::Shared;

pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
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

fn authorized(shared: &Shared, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let presented = bearer.or(query.get("token").map(String::as_str));
    let ok = presented.is_some_and(|t| shared.token_ok(t));
    if !ok {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "run token required: Authorization: Bearer <token> or ?token=\n",
    )
        .into_response()
}

async fn status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&shared, &headers, &q) {
        return unauthorized();
    }
    let run = shared.run.lock().await;
    let s = run.status();
    let body = serde_json::json!({
        "run": run.config.run.name,
        "state": s.state,
        "generation": s.generation,
        "step": s.step,
        "epoch": s.epoch,
        "epoch_progress": s.epoch_progress,
        "last_checkpoint": s.last_checkpoint,
        "workers": s.workers.iter().map(|w| serde_json::json!({
            "rank": w.rank, "worker_id": w.worker_id, "host": w.host, "device": w.device,
            "seconds_since_heartbeat": w.seconds_since_heartbeat,
            "step_time_s": w.step_time_s, "data_wait_s": w.data_wait_s,
        })).collect::<Vec<_>>(),
        "history": run.history,
        "events": run.events,
        "counters": run.counters,
    });
    axum::Json(body).into_response()
}

/// Prometheus text exposition format.
async fn metrics(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&shared, &headers, &q) {
        return unauthorized();
    }
    let run = shared.run.lock().await;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP ferroclip_{name} {help}\n# TYPE ferroclip_{name} gauge\nferroclip_{name} {value}");
    };
    let s = run.status();
    let (epoch, progress) = run.epoch_progress();
    gauge("step", "Last committed optimizer step.", s.step as f64);
    gauge("epoch", "Epoch of the data position.", epoch as f64);
    gauge(
        "epoch_progress",
        "Fraction of the current epoch used.",
        progress,
    );
    gauge("generation", "Membership generation.", s.generation as f64);
    gauge(
        "workers",
        "Workers in the current generation.",
        s.workers.len() as f64,
    );
    gauge(
        "worker_deaths_total",
        "Generations ended by a failure.",
        run.counters.worker_deaths as f64,
    );
    gauge(
        "recoveries_total",
        "Failures followed by a committed step.",
        run.counters.recoveries as f64,
    );
    gauge(
        "last_recovery_seconds",
        "Seconds from the last failure to the next committed step.",
        run.counters.last_recovery_s,
    );
    gauge(
        "rejected_rpcs_total",
        "Requests rejected (auth, stale generation, malformed).",
        shared.rejected.load(Ordering::Relaxed) as f64,
    );
    if let Some(last) = run.history.back() {
        for (k, v) in &last.metrics {
            let name: String = k
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            gauge(
                &name,
                &format!("Last committed step's {k} (mean over ranks)."),
                *v,
            );
        }
    }
    let _ = writeln!(out, "# HELP ferroclip_worker_step_seconds Step time per worker.\n# TYPE ferroclip_worker_step_seconds gauge");
    for w in &s.workers {
        let _ = writeln!(
            out,
            "ferroclip_worker_step_seconds{{rank=\"{}\",worker=\"{}\"}} {}",
            w.rank, w.worker_id, w.step_time_s
        );
    }
    let _ = writeln!(out, "# HELP ferroclip_worker_data_wait_seconds Data wait per worker and step.\n# TYPE ferroclip_worker_data_wait_seconds gauge");
    for w in &s.workers {
        let _ = writeln!(
            out,
            "ferroclip_worker_data_wait_seconds{{rank=\"{}\",worker=\"{}\"}} {}",
            w.rank, w.worker_id, w.data_wait_s
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
