//! A step's CommitStep, sent off the step loop: the next step computes while the report
//! travels, so the coordinator's latency is never on the training path. Each rank sends its
//! report after the delay `ferroclip_proto::stagger` gives its rank, so thousands of ranks that
//! finish a step in the same instant reach the coordinator spread over part of the next step.
//!
//! The report carries the step after next's NextStep; its answer is what the lookahead of the
//! next step loads. The step loop waits for a report's answer before sending the next one, so
//! a rank's reports arrive in step order and at most one is in flight.

use std::sync::Arc;
use std::time::Duration;

use ferroclip_proto::v1;
use tokio::sync::watch;
use tracing::Instrument;

use super::client::{CallError, Client};

/// A CommitStep's answer, shared by the step loop and the lookahead that loads its `next`.
pub(super) type Answer = Arc<Result<v1::CommitStepResponse, CallError>>;

/// A report on its way.
#[derive(Clone)]
pub(super) struct Commit {
    rx: watch::Receiver<Option<Answer>>,
}

impl Commit {
    /// Sends `req` on the runtime after `delay`.
    pub fn send(
        rt: &tokio::runtime::Handle,
        client: Client,
        req: v1::CommitStepRequest,
        delay: Duration,
    ) -> Self {
        let (tx, rx) = watch::channel(None);
        let step = req.step;
        rt.spawn(async move {
            tokio::time::sleep(delay).await;
            let answer = client
                .commit_step(req)
                .instrument(tracing::info_span!("commit", step))
                .await;
            let _ = tx.send(Some(Arc::new(answer)));
        });
        Self { rx }
    }

    /// The coordinator's answer (or the call's error), once it came; called from threads
    /// outside the runtime (the step loop, the lookahead).
    pub fn wait(&self, rt: &tokio::runtime::Handle) -> Answer {
        let mut rx = self.rx.clone();
        let answered = rt
            .block_on(rx.wait_for(Option::is_some))
            .ok()
            .and_then(|a| a.clone());
        answered.unwrap_or_else(|| {
            // The task ended without an answer: only a runtime shutting down does that.
            Arc::new(Err(CallError::Refused(tonic::Status::cancelled(
                "the CommitStep task was cancelled",
            ))))
        })
    }
}
