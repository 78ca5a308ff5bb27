//! The heartbeat port: the workers' service on a listener of its own, served by a thread of
//! its own. At thousands of ranks the main port's runtime spends a good part of each second on
//! the step's reports (~70 µs of the core per call, bench/README-coordinator.md), and a beat
//! queued behind them waits out the queue. Here a beat wakes a thread that was asleep, which
//! the kernel's scheduler runs ahead of the busy one, so liveness is answered within a
//! scheduler slice however busy the step path is: load never makes the living look dead.
//! Workers learn the port from their Join answer (`heartbeat_port`) and send only Heartbeat
//! to it; one that cannot reach it beats on the main port.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferroclip_proto::v1::coordinator_server::CoordinatorServer;
use tokio::sync::{oneshot, watch};

use crate::service::{CoordinatorService, Shared};
use crate::tls::ServerTls;

/// Binds `addr` and serves it on a new thread (a single-threaded runtime) until `stop` says
/// so; the thread's end is the returned task's. Join answers name the bound port from now on.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<&ServerTls>,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.grpc_config())
            .context("the heartbeat port's TLS configuration")?;
    }
    let svc = CoordinatorServer::new(CoordinatorService::new(shared.clone()));
    let (bound_tx, bound_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("heartbeats".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound_tx.send(Err(anyhow::Error::new(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match crate::listen(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(anyhow::Error::new(e)));
                        return;
                    }
                };
                let _ = bound_tx.send(listener.local_addr().map_err(anyhow::Error::new));
                let r = builder
                    .trace_fn(crate::rpc_span)
                    .add_service(svc)
                    .serve_with_incoming_shutdown(crate::no_delay(listener), async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!("heartbeat port stopped: {e}");
                }
            });
        })
        .context("starting the heartbeat thread")?;
    let bound = bound_rx
        .await
        .context("the heartbeat thread ended before binding")?
        .with_context(|| format!("binding the heartbeat address {addr}"))?;
    shared
        .heartbeat_port
        .store(u32::from(bound.port()), Ordering::Relaxed);
    let task = tokio::task::spawn_blocking(move || {
        let _ = thread.join();
    });
    Ok((bound, task))
}

/// How far the step path's threads stand below the heartbeat thread (nice levels; 10 is a
/// tenth of the CPU weight). Measured at 4,096 workers with every beat sent
/// (bench/README-coordinator.md): Heartbeat p99 3.2-4.8 ms, 5.0-7.7 ms at equal priority.
const STEP_NICE: i32 = 10;

/// Lowers the calling thread's priority by `STEP_NICE` (any process may lower its own). The
/// runtime that serves the main port calls it on each of its threads as they start, so a beat
/// waking the heartbeat thread (left at the process's priority) runs ahead of the step
/// work. Within a container's CPU share this orders the coordinator's own threads only.
pub fn yield_to_heartbeats() {
    // SAFETY: gettid and getpriority/setpriority take and return plain integers.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: as above; a thread id is a valid PRIO_PROCESS target.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, now + STEP_NICE) } != 0 {
        tracing::debug!(
            "step thread priority unchanged: {}",
            std::io::Error::last_os_error()
        );
    }
}
