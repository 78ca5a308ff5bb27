//! The gRPC face of the coordinator (`ferroclip.v1.Coordinator`): checks the token and the
//! request, then hands over to `Run` under one lock. Anything a worker is told is journaled first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroclip_proto::v1::{self, coordinator_server::Coordinator};
use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status};

use crate::journal::Journal;
use crate::membership::WorkerInfo;
use crate::run::Run;

pub struct Shared {
    pub run: Mutex<Run>,
    /// Woken whenever a generation forms.
    pub formed: Notify,
    pub journal: Journal,
    token: String,
    pub rejected: AtomicU64,
    /// How to reach object stores (deleting old checkpoints).
    pub store: ferroclip_shards::StoreOptions,
}

impl Shared {
    pub fn new(
        run: Run,
        journal: Journal,
        token: String,
        store: ferroclip_shards::StoreOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            run: Mutex::new(run),
            formed: Notify::new(),
            journal,
            token,
            rejected: AtomicU64::new(0),
            store,
        })
    }

    /// Constant-time comparison of a presented token with the run's.
    pub fn token_ok(&self, presented: &str) -> bool {
        let a = presented.as_bytes();
        let b = self.token.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    fn reject(&self, status: Status) -> Status {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(code = ?status.code(), "rejected RPC: {}", status.message());
        status
    }

    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let header = req
            .metadata()
            .get(ferroclip_proto::AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match header.strip_prefix("Bearer ") {
            Some(t) if self.token_ok(t) => Ok(()),
            Some(_) => Err(self.reject(Status::unauthenticated("wrong run token"))),
            None => Err(self.reject(Status::unauthenticated(
                "missing run token (metadata `authorization: Bearer <token>`)",
            ))),
        }
    }

    async fn save(&self, run: &Run) -> Result<(), Status> {
        self.journal
            .save(&run.snapshot())
            .await
            .map_err(|e| Status::unavailable(format!("coordinator cannot write its journal: {e}")))
    }

    /// Periodic work: failure detection and generation formation.
    pub async fn tick(&self) {
        let mut run = self.run.lock().await;
        if run.tick(Instant::now()) {
            if let Err(e) = self.save(&run).await {
                tracing::error!("{}", e.message());
            }
            drop(run);
            self.formed.notify_waiters();
        }
    }
}

#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn check<T>(&self, req: &Request<T>, worker_id: &str) -> Result<(), Status> {
        self.shared.auth(req)?;
        if worker_id.is_empty() {
            return Err(self
                .shared
                .reject(Status::invalid_argument("worker_id is empty")));
        }
        Ok(())
    }

    fn counted<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        r.map_err(|s| self.shared.reject(s))
    }
}

/// Removes a waiting worker whose Join call was dropped (its process died).
struct JoinGuard {
    shared: Arc<Shared>,
    worker_id: String,
    done: bool,
}

impl Drop for JoinGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let shared = self.shared.clone();
        let id = std::mem::take(&mut self.worker_id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                shared.run.lock().await.abandon_join(&id, Instant::now());
            });
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(
        &self,
        req: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        if r.collective_addr.parse::<std::net::SocketAddr>().is_err()
            && !r.collective_addr.contains(':')
        {
            return Err(self.shared.reject(Status::invalid_argument(format!(
                "collective_addr {:?} is not host:port",
                r.collective_addr
            ))));
        }
        let info = WorkerInfo {
            worker_id: r.worker_id.clone(),
            host: r.host.clone(),
            device: r.device.clone(),
            collective_addr: r.collective_addr.clone(),
            last_applied: r.last_applied_step,
        };
        {
            let mut run = self.shared.run.lock().await;
            if run.finished() {
                return Ok(Response::new(v1::JoinResponse {
                    generation: run.members.generation(),
                    world_size: 0,
                    ..Default::default()
                }));
            }
            run.join(info, Instant::now());
        }
        self.shared.tick().await;
        let mut guard = JoinGuard {
            shared: self.shared.clone(),
            worker_id: r.worker_id.clone(),
            done: false,
        };
        loop {
            let notified = self.shared.formed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.shared.run.lock().await.placement(&guard.worker_id) {
                guard.done = true;
                return Ok(Response::new(p));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let out = run.heartbeat(&r.worker_id, r.generation, Instant::now());
        drop(run);
        self.counted(out).map(Response::new)
    }

    async fn next_step(
        &self,
        req: Request<v1::NextStepRequest>,
    ) -> Result<Response<v1::NextStepResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let out = run.next_step(&r.worker_id, r.generation, r.step, Instant::now());
        let (resp, changed) = self.counted(out)?;
        if changed || resp.regroup || resp.end_of_run {
            self.shared.save(&run).await?;
        }
        Ok(Response::new(resp))
    }

    async fn commit_step(
        &self,
        req: Request<v1::CommitStepRequest>,
    ) -> Result<Response<v1::CommitStepResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let committed = self.counted(run.commit_step(r, Instant::now()))?;
        if committed {
            let old = run.prune_checkpoints();
            self.shared.save(&run).await?;
            drop(run);
            crate::delete_checkpoints(old, &self.shared.store).await;
        }
        Ok(Response::new(v1::CommitStepResponse { committed }))
    }

    async fn report_failure(
        &self,
        req: Request<v1::ReportFailureRequest>,
    ) -> Result<Response<v1::ReportFailureResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let out = run.report_failure(r, Instant::now());
        drop(run);
        self.counted(out)?;
        self.shared.tick().await;
        Ok(Response::new(v1::ReportFailureResponse {}))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<v1::CommitCheckpointRequest>,
    ) -> Result<Response<v1::CommitCheckpointResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let recorded = self.counted(run.commit_checkpoint(r))?;
        if recorded {
            let old = run.prune_checkpoints();
            self.shared.save(&run).await?;
            drop(run);
            crate::delete_checkpoints(old, &self.shared.store).await;
        }
        Ok(Response::new(v1::CommitCheckpointResponse {}))
    }

    async fn leave(
        &self,
        req: Request<v1::LeaveRequest>,
    ) -> Result<Response<v1::LeaveResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let out = run.leave(r, Instant::now());
        self.counted(out)?;
        self.shared.save(&run).await?;
        drop(run);
        self.shared.tick().await;
        Ok(Response::new(v1::LeaveResponse {}))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.shared.auth(&req)?;
        Ok(Response::new(self.shared.run.lock().await.status()))
    }
}
