//! The gRPC face of the coordinator (`ferroclip.v1.Coordinator`): checks the token and the
//! request, hands over to `Run` under one lock (pure state, no I/O), stages the changed state
//! with the journal writer, releases the lock, and answers only once that state is durable.
//! So anything a worker is told survives a coordinator crash, retries get the same answer, and
//! heartbeats never wait on the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroclip_proto::v1::{self, coordinator_server::Coordinator};
use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status};

use crate::membership::WorkerInfo;
use crate::run::{Answer, Committed, Run, StepReport};
use crate::wire;
use crate::writer::{Batch, Writer};

/// Longest an RPC waits for its state to be durable before answering UNAVAILABLE (the worker
/// retries; every call is idempotent).
const DURABLE_WAIT: Duration = Duration::from_secs(10);

pub struct Shared {
    pub run: Mutex<Run>,
    /// Woken whenever a generation forms.
    pub formed: Notify,
    writer: Writer,
    /// The version last handed to the writer (taken while `run` is locked).
    staged: std::sync::Mutex<u64>,
    journal_url: String,
    /// The run's config as workers get it at Join.
    config_toml: String,
    token: String,
    /// The read-only credential of `/`, `/metrics`, `/api/status` and Status; without one the
    /// worker token serves for viewing too.
    viewer_token: Option<String>,
    /// Dashboard logins: browser sessions (HttpOnly cookies) and one-time login codes.
    pub logins: crate::login::Logins,
    /// worker id → (session secret issued at Join, last call carrying it).
    sessions: std::sync::Mutex<HashMap<String, (String, Instant)>>,
    /// A member silent this long (`cluster.heartbeat_timeout_s`) no longer holds its id.
    session_ttl: Duration,
    pub rejected: AtomicU64,
    /// The heartbeat port (`crate::liveness`) Join answers name; 0 while there is none.
    pub heartbeat_port: std::sync::atomic::AtomicU32,
    /// Beats that arrived while the run was locked, to apply before the next silence check.
    deferred: std::sync::Mutex<Vec<Beat>>,
    /// Whether the run is finished, as of the last staged change (a deferred beat's answer).
    finished: AtomicBool,
    /// How to reach object stores (deleting old checkpoints).
    pub store: ferroclip_shards::StoreOptions,
}

impl Shared {
    /// The writer was started with version 1.
    pub fn new(
        run: Run,
        writer: Writer,
        journal_url: String,
        token: String,
        viewer_token: Option<String>,
        store: ferroclip_shards::StoreOptions,
    ) -> Arc<Self> {
        let session_ttl = Duration::from_secs_f64(run.config.cluster.heartbeat_timeout_s.max(1.0));
        let run_finished = run.finished();
        Arc::new(Self {
            config_toml: run.config.to_toml(),
            run: Mutex::new(run),
            formed: Notify::new(),
            writer,
            staged: std::sync::Mutex::new(1),
            journal_url,
            token,
            viewer_token,
            logins: crate::login::Logins::default(),
            sessions: std::sync::Mutex::new(HashMap::new()),
            session_ttl,
            rejected: AtomicU64::new(0),
            heartbeat_port: Default::default(),
            deferred: Default::default(),
            finished: AtomicBool::new(run_finished),
            store,
        })
    }

    pub fn journal_url(&self) -> &str {
        &self.journal_url
    }

    /// Whether `presented` is the worker token (constant time).
    pub fn token_ok(&self, presented: &str) -> bool {
        same_secret(presented, &self.token)
    }

    /// Whether `presented` may view the run: the viewer token, or the worker token when no
    /// viewer token is configured.
    pub fn viewer_ok(&self, presented: &str) -> bool {
        match &self.viewer_token {
            Some(v) => same_secret(presented, v),
            None => self.token_ok(presented),
        }
    }

    fn bearer<T>(req: &Request<T>) -> Option<&str> {
        req.metadata()
            .get(ferroclip_proto::AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
    }

    /// Status: the viewer's credential or the worker token.
    fn auth_view<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match Self::bearer(req) {
            Some(t) if self.viewer_ok(t) || self.token_ok(t) => Ok(()),
            Some(_) => Err(self.reject(Status::unauthenticated("wrong run token"))),
            None => Err(self.reject(Status::unauthenticated(
                "missing run token (metadata `authorization: Bearer <token>`)",
            ))),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn presented_session<T>(req: &Request<T>) -> Option<&str> {
        req.metadata()
            .get(ferroclip_proto::SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|s| s.len() >= SESSION_MIN_LEN)
    }

    /// The session a Join gets: its own again when it presents it; a new one when its id is
    /// free (never joined, or its holder silent for `session_ttl`). A Join reusing the id of a
    /// live member without that member's session is ABORTED (retried: a restarted worker gets
    /// in once its previous process's lease has run out), so it cannot take the member's place.
    fn session_for_join<T>(&self, req: &Request<T>, worker_id: &str) -> Result<String, Status> {
        let presented = Self::presented_session(req);
        let now = Instant::now();
        let mut m = self.sessions();
        match m.get(worker_id) {
            Some((s, _)) if presented.is_some_and(|p| same_secret(p, s)) => {
                let s = s.clone();
                m.insert(worker_id.to_string(), (s.clone(), now));
                Ok(s)
            }
            Some((_, seen)) if now.duration_since(*seen) < self.session_ttl => {
                drop(m);
                Err(self.reject(Status::aborted(format!(
                    "worker id {worker_id} belongs to a live member: a Join with its id needs that                      member's session secret (retry once it has been silent for {:.0} s)",
                    self.session_ttl.as_secs_f64()
                ))))
            }
            held => {
                // After a coordinator restart nobody holds the id: a member re-joining with its
                // session keeps it.
                let s = match (held, presented) {
                    (None, Some(p)) => p.to_string(),
                    _ => crate::login::random_secret(),
                };
                m.insert(worker_id.to_string(), (s.clone(), now));
                Ok(s)
            }
        }
    }

    /// Member RPCs other than Join: the session of the member with this id.
    fn session_ok<T>(&self, req: &Request<T>, worker_id: &str) -> Result<(), Status> {
        let presented = Self::presented_session(req);
        let now = Instant::now();
        let mut m = self.sessions();
        let why = match (m.get_mut(worker_id), presented) {
            (Some((s, seen)), Some(p)) if same_secret(p, s) => {
                *seen = now;
                return Ok(());
            }
            // After a coordinator restart: the first session presented for an id is its
            // member's (sessions live in memory, not in the journal).
            (None, Some(p)) => {
                m.insert(worker_id.to_string(), (p.to_string(), now));
                return Ok(());
            }
            (_, None) => format!(
                "missing session secret for worker {worker_id} (metadata `{}`, issued by Join)",
                ferroclip_proto::SESSION_HEADER
            ),
            (Some(_), Some(_)) => format!(
                "wrong session secret for worker {worker_id}: only the process that joined with                  this id may act for it"
            ),
        };
        drop(m);
        Err(self.reject(Status::permission_denied(why)))
    }

    /// A member that left frees its id at once.
    fn end_session(&self, worker_id: &str) {
        self.sessions().remove(worker_id);
    }

    fn reject(&self, status: Status) -> Status {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(code = ?status.code(), "rejected RPC: {}", status.message());
        status
    }

    /// Member RPCs: the worker token only; the viewer token is read-only.
    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match Self::bearer(req) {
            Some(t) if self.token_ok(t) => Ok(()),
            Some(t)
                if self
                    .viewer_token
                    .as_deref()
                    .is_some_and(|v| same_secret(t, v)) =>
            {
                Err(self.reject(Status::permission_denied(
                    "the viewer token is read-only: member RPCs need the worker token",
                )))
            }
            Some(_) => Err(self.reject(Status::unauthenticated("wrong run token"))),
            None => Err(self.reject(Status::unauthenticated(
                "missing run token (metadata `authorization: Bearer <token>`)",
            ))),
        }
    }

    /// UNAVAILABLE once the journal is lost (another coordinator took it, or its store stayed
    /// down): this coordinator must not acknowledge anything any more.
    fn alive(&self) -> Result<(), Status> {
        match self.writer.progress().fatal {
            Some(why) => Err(Status::unavailable(format!(
                "this coordinator has stopped acknowledging: {why}"
            ))),
            None => Ok(()),
        }
    }

    /// Hands the run's changes since the last call to the journal writer (with the whole
    /// state when the writer asks for a compaction); returns the version that must be durable
    /// before the caller answers. Without changes this costs nothing: most calls (heartbeats,
    /// all but the last CommitStep of a step) change nothing the journal keeps.
    pub fn stage(&self, run: &mut Run) -> u64 {
        self.stage_with(run, false)
    }

    /// `final_entry`: only a version for the final compaction, which covers the records.
    fn stage_with(&self, run: &mut Run, final_entry: bool) -> u64 {
        self.finished.store(run.finished(), Ordering::Relaxed);
        let records = run.take_records();
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        if final_entry {
            *staged += 1;
            return *staged;
        }
        if records.is_empty() {
            return *staged;
        }
        let batch = Batch {
            records,
            snapshot: self.writer.take_compaction_wish().then(|| run.snapshot()),
            summary: run.summary(),
            released: false,
        };
        *staged += 1;
        self.writer.submit(*staged, batch);
        *staged
    }

    /// Waits until `version` is durable; UNAVAILABLE (retry) when it is not in time.
    pub async fn durable(&self, version: u64) -> Result<(), Status> {
        self.writer
            .durable(version, DURABLE_WAIT)
            .await
            .map_err(Status::unavailable)
    }

    /// Seconds the journal has been failing to reach its store (0 when it is not).
    pub fn store_wait_s(&self) -> f64 {
        self.writer
            .progress()
            .failing_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// What the journal's writes have cost so far.
    pub fn journal_io(&self) -> crate::writer::WriteStats {
        self.writer.progress().io
    }

    /// Resolves when this coordinator has lost its journal for good.
    pub async fn fatal(&self) -> String {
        self.writer.fatal().await
    }

    /// Writes the final compaction (marked released) and stops the writer.
    pub async fn shutdown_journal(&self) {
        let mut run = self.run.lock().await;
        let version = self.stage_with(&mut run, true);
        let batch = Batch {
            records: Vec::new(),
            snapshot: Some(run.snapshot()),
            summary: run.summary(),
            released: true,
        };
        drop(run);
        self.writer
            .finish(version, batch, Duration::from_secs(10))
            .await;
    }

    /// Periodic work: failure detection and generation formation (journaled in the
    /// background; Join callers wait for it to be durable).
    pub async fn tick(&self) {
        let mut run = self.run.lock().await;
        self.apply_beats(&mut run);
        if run.tick(Instant::now()) {
            self.stage(&mut run);
            drop(run);
            self.formed.notify_waiters();
        } else {
            self.stage(&mut run);
        }
    }

    fn defer(&self, beat: Beat) {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(beat);
    }

    /// Applies the deferred beats, each as of its arrival. A beat of a generation that ended
    /// meanwhile changes nothing (its worker hears so at its next beat or step call).
    pub fn apply_beats(&self, run: &mut Run) {
        let beats = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        for b in beats {
            let _ = run.heartbeat(&b.worker_id, b.generation, b.store_wait_s, b.at);
        }
    }

    /// Deletes pruned checkpoints (after the journal stopped listing them). Failures are
    /// logged: a leftover directory costs space, never correctness.
    async fn delete_checkpoints(&self, root: &str, urls: Vec<String>) {
        for url in urls {
            match ferroclip_shards::checkpoints::delete_url(root, &url, &self.store).await {
                Ok(()) => tracing::info!("deleted old checkpoint {url}"),
                Err(e) => tracing::warn!("could not delete old checkpoint {url}: {e}"),
            }
        }
    }
}

/// A heartbeat, kept to apply later when it arrived while the run was locked.
struct Beat {
    worker_id: String,
    generation: u64,
    store_wait_s: f64,
    at: Instant,
}

/// Shorter session values are ignored (treated as absent).
const SESSION_MIN_LEN: usize = 16;

/// Constant-time comparison of two secrets (their lengths are not secret).
pub fn same_secret(presented: &str, expected: &str) -> bool {
    let a = presented.as_bytes();
    let b = expected.as_bytes();
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Join's checks: the worker token, a live coordinator, a worker id.
    fn check_join<T>(&self, req: &Request<T>, worker_id: &str) -> Result<(), Status> {
        self.shared.auth(req)?;
        self.shared.alive()?;
        if worker_id.is_empty() {
            return Err(self
                .shared
                .reject(Status::invalid_argument("worker_id is empty")));
        }
        Ok(())
    }

    /// Every other member RPC: Join's checks and the member's session secret.
    fn check<T>(&self, req: &Request<T>, worker_id: &str) -> Result<(), Status> {
        self.check_join(req, worker_id)?;
        self.shared.session_ok(req, worker_id)
    }

    /// The run's answer, a refusal counted and mapped to its gRPC status.
    fn counted<T>(&self, r: Answer<T>) -> Result<T, Status> {
        r.map_err(|refusal| self.shared.reject(wire::status_of(refusal)))
    }

    /// Applies `change` to the run; when it succeeds and `prune(answer)`, forgets the
    /// checkpoints beyond `checkpoint.keep`; answers once the new state is durable, and only
    /// then deletes those checkpoints (the journal no longer lists them).
    async fn pruning<T>(
        &self,
        change: impl FnOnce(&mut Run) -> Answer<T>,
        prune: impl FnOnce(&T) -> bool,
    ) -> Result<T, Status> {
        let mut run = self.shared.run.lock().await;
        let out = change(&mut run);
        let old = match &out {
            Ok(answer) if prune(answer) => run.prune_checkpoints(),
            _ => Vec::new(),
        };
        let root = run.checkpoint_root().to_string();
        let version = self.shared.stage(&mut run);
        drop(run);
        let answer = self.counted(out)?;
        self.shared.durable(version).await?;
        self.shared.delete_checkpoints(&root, old).await;
        Ok(answer)
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
        self.check_join(&req, &r.worker_id)?;
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
            // Workers from before the field: the generation they last joined.
            state_generation: if r.state_generation > 0 {
                r.state_generation
            } else {
                r.last_generation
            },
        };
        let session = self.shared.session_for_join(&req, &r.worker_id)?;
        let answer = |mut a: v1::JoinResponse| {
            a.session = session.clone();
            a.heartbeat_port = self.shared.heartbeat_port.load(Ordering::Relaxed);
            Response::new(a)
        };
        {
            let mut run = self.shared.run.lock().await;
            if run.finished() {
                return Ok(answer(v1::JoinResponse {
                    generation: run.members.generation(),
                    world_size: 0,
                    ..Default::default()
                }));
            }
            if let Some(p) = run.placed_again(&info, r.last_generation) {
                let first =
                    run.first_steps(&info.worker_id, p.generation, p.next_step, Instant::now());
                let version = self.shared.stage(&mut run);
                drop(run);
                self.shared.durable(version).await?;
                return Ok(answer(wire::join_response(
                    p,
                    first,
                    &self.shared.config_toml,
                )));
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
            let placed = {
                let mut run = self.shared.run.lock().await;
                let placed = run.placement(&guard.worker_id);
                placed.map(|p| {
                    // Its heartbeat clock starts as its answer goes out: answering thousands
                    // of Joins takes seconds, which is no silence of the worker's.
                    run.members.touch(&guard.worker_id, Instant::now());
                    let first = run.first_steps(
                        &guard.worker_id,
                        p.generation,
                        p.next_step,
                        Instant::now(),
                    );
                    (p, first, self.shared.stage(&mut run))
                })
            };
            if let Some((p, first, version)) = placed {
                guard.done = true;
                // The generation (and its first steps' assignments) is journaled before
                // anyone trains in it.
                self.shared.durable(version).await?;
                return Ok(answer(wire::join_response(
                    p,
                    first,
                    &self.shared.config_toml,
                )));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            self.shared.alive()?;
        }
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let beat = Beat {
            worker_id: r.worker_id.clone(),
            generation: r.generation,
            store_wait_s: r.store_wait_s,
            at: Instant::now(),
        };
        // A beat never waits for the run: while another call holds it, the beat is noted and
        // applied, with its arrival time, before the next look for silent members (`tick`).
        let Ok(mut run) = self.shared.run.try_lock() else {
            self.shared.defer(beat);
            let stop = self.shared.finished.load(Ordering::Relaxed);
            return Ok(Response::new(v1::HeartbeatResponse { stop }));
        };
        self.shared.apply_beats(&mut run);
        let out = run.heartbeat(&beat.worker_id, beat.generation, beat.store_wait_s, beat.at);
        drop(run);
        let stop = self.counted(out)?;
        Ok(Response::new(v1::HeartbeatResponse { stop }))
    }

    async fn next_step(
        &self,
        req: Request<v1::NextStepRequest>,
    ) -> Result<Response<v1::NextStepResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let out = run.next_step(&r.worker_id, r.generation, r.step, Instant::now());
        let version = self.shared.stage(&mut run);
        drop(run);
        let plan = self.counted(out)?;
        self.shared.durable(version).await?;
        Ok(Response::new(wire::next_step_response(r.step, plan)))
    }

    async fn commit_step(
        &self,
        req: Request<v1::CommitStepRequest>,
    ) -> Result<Response<v1::CommitStepResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let (committed, next) = self
            .pruning(
                |run| {
                    let report = StepReport {
                        step: r.step,
                        samples: r.samples,
                        metrics: r
                            .metrics
                            .iter()
                            .map(|m| (m.name.clone(), m.value))
                            .collect(),
                    };
                    let now = Instant::now();
                    let committed = run.commit_step(&r.worker_id, r.generation, report, now)?;
                    // The next step rides on the commit (journaled with it). A refusal is not
                    // this call's: the worker asks NextStep and hears it there.
                    let next = (r.next_step > 0)
                        .then(|| {
                            run.next_step(&r.worker_id, r.generation, r.next_step, now)
                                .ok()
                        })
                        .flatten();
                    Ok((committed, next))
                },
                |(c, _)| *c == Committed::Step,
            )
            .await?;
        Ok(Response::new(v1::CommitStepResponse {
            committed: committed == Committed::Step,
            next: next.map(|plan| wire::next_step_response(r.next_step, plan)),
        }))
    }

    async fn report_failure(
        &self,
        req: Request<v1::ReportFailureRequest>,
    ) -> Result<Response<v1::ReportFailureResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        self.shared.apply_beats(&mut run);
        let out = run.report_failure(
            &r.worker_id,
            r.generation,
            r.suspect_rank,
            &r.reason,
            Instant::now(),
        );
        let version = self.shared.stage(&mut run);
        drop(run);
        self.counted(out)?;
        self.shared.tick().await;
        self.shared.durable(version).await?;
        Ok(Response::new(v1::ReportFailureResponse {}))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<v1::CommitCheckpointRequest>,
    ) -> Result<Response<v1::CommitCheckpointResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        self.pruning(
            |run| run.commit_checkpoint(&r.worker_id, r.generation, r.step, &r.url),
            |_| true,
        )
        .await?;
        Ok(Response::new(v1::CommitCheckpointResponse {}))
    }

    async fn leave(
        &self,
        req: Request<v1::LeaveRequest>,
    ) -> Result<Response<v1::LeaveResponse>, Status> {
        let r = req.get_ref();
        self.check(&req, &r.worker_id)?;
        let mut run = self.shared.run.lock().await;
        let out = run.leave(&r.worker_id, r.generation, &r.reason, Instant::now());
        let version = self.shared.stage(&mut run);
        drop(run);
        self.counted(out)?;
        self.shared.end_session(&r.worker_id);
        self.shared.tick().await;
        self.shared.durable(version).await?;
        Ok(Response::new(v1::LeaveResponse {}))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.shared.auth_view(&req)?;
        let s = self.shared.run.lock().await.status();
        Ok(Response::new(wire::status_response(
            s,
            self.shared.store_wait_s(),
        )))
    }
}
