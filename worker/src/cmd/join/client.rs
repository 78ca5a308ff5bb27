//! The worker's side of `ferroclip.v1`: a gRPC client that adds the run token to every call and
//! retries with backoff while the coordinator is unreachable (it may be restarting) or answers
//! UNAVAILABLE (its journal is not durable yet). Every call but Join has a deadline; Join is a
//! long poll (it returns when a generation forms) on a channel of its own. Both channels send
//! HTTP/2 keepalive pings, so a black-holed coordinator is noticed in seconds, not when the
//! kernel gives up on the connection.

use std::time::Duration;

use ferroclip_proto::tls::describe;
use ferroclip_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// What a failed call means for the worker loop.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Our generation is over: join again.
    #[error("generation over: {0}")]
    Stale(String),
    /// The coordinator refused the call for good (bad token, malformed request).
    #[error("coordinator refused the call: {0}")]
    Refused(Status),
    #[error("coordinator unreachable at {url} for {waited_s:.0}s: {last}")]
    Unreachable {
        url: String,
        waited_s: f64,
        last: String,
    },
}

/// The coordinator's endpoint at `url`: short connect timeout, no Nagle, keepalive pings.
fn endpoint(url: &str, tls: Option<&ferroclip_proto::tls::ClientTls>) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("coordinator URL {url:?} is not valid: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.config())
            .map_err(|e| anyhow::anyhow!("TLS configuration for {url}: {e}"))?;
    }
    Ok(endpoint)
}

/// Longest a call other than Join may take (a slow journal write included).
pub const RPC_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Client {
    url: String,
    token: String,
    /// This member's session secret, from its first Join; every later call carries it.
    session: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    inner: CoordinatorClient<Channel>,
    /// Join's channel: no deadline (it waits for a generation to form), keepalive only.
    joiner: CoordinatorClient<Channel>,
    /// How long to keep retrying an unreachable coordinator.
    patience: Duration,
    /// When a step call (NextStep, CommitStep) or a Join was last answered: the coordinator
    /// counts it as a heartbeat, so the heartbeat task skips a beat that would follow one.
    answered: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// For the heartbeat port's channel.
    tls: Option<ferroclip_proto::tls::ClientTls>,
    /// The coordinator's heartbeat port (its Join answer's `heartbeat_port`), where beats go.
    lane: std::sync::Arc<std::sync::Mutex<Option<Lane>>>,
}

/// The heartbeat port's channel. A beat it fails goes to the main port, and the lane rests
/// for `LANE_REST` (a Service that does not expose the port costs one connect timeout, not
/// one per beat).
struct Lane {
    port: u32,
    client: CoordinatorClient<Channel>,
    rest_until: Option<std::time::Instant>,
}

const LANE_REST: Duration = Duration::from_secs(30);

/// A lane's beat: its own short deadline, as the main port is there to fall back on.
const LANE_DEADLINE: Duration = Duration::from_secs(2);

impl Client {
    pub fn new(
        url: &str,
        token: &str,
        tls: Option<&ferroclip_proto::tls::ClientTls>,
        patience: Duration,
    ) -> anyhow::Result<Self> {
        let url = &ferroclip_proto::tls::coordinator_url(url, tls.is_some())
            .map_err(anyhow::Error::msg)?;
        let endpoint = endpoint(url, tls)?;
        Ok(Self {
            url: url.to_string(),
            token: token.to_string(),
            session: Default::default(),
            inner: CoordinatorClient::new(endpoint.clone().timeout(RPC_DEADLINE).connect_lazy()),
            joiner: CoordinatorClient::new(endpoint.connect_lazy()),
            patience,
            answered: Default::default(),
            tls: tls.cloned(),
            lane: Default::default(),
        })
    }

    /// The same client, retrying an unreachable coordinator for `patience` (a run waits out a
    /// store outage of `store.retry_budget_s` on the coordinator's side too).
    pub fn with_patience(&self, patience: Duration) -> Self {
        Self {
            patience,
            ..self.clone()
        }
    }

    fn request<T>(&self, msg: T) -> Result<Request<T>, CallError> {
        let mut req = Request::new(msg);
        let value = MetadataValue::try_from(format!("Bearer {}", self.token)).map_err(|_| {
            CallError::Refused(Status::invalid_argument("run token has invalid characters"))
        })?;
        req.metadata_mut()
            .insert(ferroclip_proto::AUTH_HEADER, value);
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(s) = session.and_then(|s| MetadataValue::try_from(s).ok()) {
            req.metadata_mut()
                .insert(ferroclip_proto::SESSION_HEADER, s);
        }
        Ok(req)
    }

    /// Runs `call` until it succeeds, fails for good, or the coordinator stays away too long.
    async fn retry<T, M, F, Fut>(&self, msg: M, call: F) -> Result<T, CallError>
    where
        M: Clone,
        F: Fn(CoordinatorClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_on(self.inner.clone(), msg, call).await
    }

    async fn retry_on<T, M, F, Fut>(
        &self,
        channel: CoordinatorClient<Channel>,
        msg: M,
        call: F,
    ) -> Result<T, CallError>
    where
        M: Clone,
        F: Fn(CoordinatorClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = std::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let req = self.request(msg.clone())?;
            match call(channel.clone(), req).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == Code::FailedPrecondition => {
                    return Err(CallError::Stale(s.message().into()))
                }
                Err(s) if ferroclip_proto::tls::is_certificate_error(&describe(&s)) => {
                    // The coordinator's certificate (or ours) is refused: waiting cannot help.
                    return Err(CallError::Refused(Status::unavailable(format!(
                        "TLS with {}: {}",
                        self.url,
                        describe(&s)
                    ))));
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                            | Code::Aborted
                    ) =>
                {
                    if start.elapsed() > self.patience {
                        return Err(CallError::Unreachable {
                            url: self.url.clone(),
                            waited_s: start.elapsed().as_secs_f64(),
                            last: describe(&s),
                        });
                    }
                    tracing::debug!(
                        "coordinator unavailable ({}), retrying in {backoff:?}",
                        s.message()
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(s) => return Err(CallError::Refused(s)),
            }
        }
    }

    pub async fn join(&self, msg: v1::JoinRequest) -> Result<v1::JoinResponse, CallError> {
        let r = self
            .retry_on(self.joiner.clone(), msg, |mut c, r| async move {
                c.join(r).await
            })
            .await?;
        if !r.session.is_empty() {
            *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.session.clone());
        }
        self.use_heartbeat_port(r.heartbeat_port);
        // A generation's members are seen when it forms: the first beat would tell nothing,
        // and at thousands of ranks it would land on formation's burst of first steps.
        self.answered_now();
        Ok(r)
    }

    /// Whether a step call was answered within `period` (a heartbeat would add nothing).
    pub fn answered_within(&self, period: Duration) -> bool {
        let at = *self.answered.lock().unwrap_or_else(|p| p.into_inner());
        at.is_some_and(|t| t.elapsed() < period)
    }

    fn answered_now(&self) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    /// Beats go to `port` from now on (0: the main port). A channel is made (lazily) only
    /// when the port changes: a re-Join to the same coordinator keeps its connection.
    fn use_heartbeat_port(&self, port: u32) {
        let mut lane = self.lane.lock().unwrap_or_else(|p| p.into_inner());
        if lane.as_ref().map(|l| l.port) == Some(port) {
            return;
        }
        *lane = None;
        if port == 0 {
            return;
        }
        let made = ferroclip_proto::tls::with_port(&self.url, port)
            .map_err(anyhow::Error::msg)
            .and_then(|url| endpoint(&url, self.tls.as_ref()));
        match made {
            Ok(e) => {
                *lane = Some(Lane {
                    port,
                    client: CoordinatorClient::new(e.timeout(LANE_DEADLINE).connect_lazy()),
                    rest_until: None,
                })
            }
            Err(e) => tracing::warn!("heartbeat port {port}: {e:#}; beating on the main port"),
        }
    }

    /// The heartbeat port's client, unless there is none or it is resting after a failure.
    fn lane(&self) -> Option<CoordinatorClient<Channel>> {
        let lane = self.lane.lock().unwrap_or_else(|p| p.into_inner());
        let l = lane.as_ref()?;
        match l.rest_until {
            Some(t) if std::time::Instant::now() < t => None,
            _ => Some(l.client.clone()),
        }
    }

    /// One beat: on the heartbeat port where there is one (a beat there is not queued behind
    /// the coordinator's step work), else, or when that fails, on the main port with its
    /// retries.
    pub async fn heartbeat(
        &self,
        msg: v1::HeartbeatRequest,
    ) -> Result<v1::HeartbeatResponse, CallError> {
        if let Some(mut lane) = self.lane() {
            match lane.heartbeat(self.request(msg.clone())?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == Code::FailedPrecondition => {
                    return Err(CallError::Stale(s.message().into()))
                }
                Err(s) => {
                    tracing::info!(
                        "heartbeat port unanswered ({}): beating on the main port for {LANE_REST:?}",
                        describe(&s)
                    );
                    if let Some(l) = self.lane.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        l.rest_until = Some(std::time::Instant::now() + LANE_REST);
                    }
                }
            }
        }
        self.retry(msg, |mut c, r| async move { c.heartbeat(r).await })
            .await
    }

    pub async fn next_step(
        &self,
        msg: v1::NextStepRequest,
    ) -> Result<v1::NextStepResponse, CallError> {
        let r = self
            .retry(msg, |mut c, r| async move { c.next_step(r).await })
            .await?;
        self.answered_now();
        Ok(r)
    }

    pub async fn commit_step(
        &self,
        msg: v1::CommitStepRequest,
    ) -> Result<v1::CommitStepResponse, CallError> {
        let r = self
            .retry(msg, |mut c, r| async move { c.commit_step(r).await })
            .await?;
        self.answered_now();
        Ok(r)
    }

    pub async fn report_failure(&self, msg: v1::ReportFailureRequest) -> Result<(), CallError> {
        self.retry(msg, |mut c, r| async move { c.report_failure(r).await })
            .await
            .map(|_| ())
    }

    pub async fn commit_checkpoint(
        &self,
        msg: v1::CommitCheckpointRequest,
    ) -> Result<(), CallError> {
        self.retry(msg, |mut c, r| async move { c.commit_checkpoint(r).await })
            .await
            .map(|_| ())
    }

    pub async fn leave(&self, msg: v1::LeaveRequest) -> Result<(), CallError> {
        self.retry(msg, |mut c, r| async move { c.leave(r).await })
            .await
            .map(|_| ())
    }

    pub async fn status(&self) -> Result<v1::StatusResponse, CallError> {
        self.retry(
            v1::StatusRequest {},
            |mut c, r| async move { c.status(r).await },
        )
        .await
    }
}
