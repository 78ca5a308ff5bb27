//! Getting a step's batch: ask the coordinator for this rank's samples (NextStep, or the answer
//! that comes with the previous CommitStep), start the hinted blocks, load and collate. Runs on
//! the step loop, or one step ahead on a lookahead thread so the next batch is ready when the
//! current step ends.

use std::sync::Arc;

use anyhow::Result;
use ferroclip_proto::v1;
use tch::Device;

use super::client::{CallError, Client};
use super::commit::Commit;
use crate::data::{Batch, Loader, SampleRef};
use crate::fault;

/// What the coordinator says of a step, with its batch loaded.
pub(super) enum Next {
    /// The generation is over: join again.
    Regroup,
    /// No step `step`: the run's data or step limit is reached.
    End,
    Batch {
        global_batch: usize,
        refs: Vec<SampleRef>,
        batch: Batch,
    },
}

/// Asks for a step's samples and loads them.
pub(super) struct Fetcher {
    pub client: Client,
    pub rt: tokio::runtime::Handle,
    pub loader: Arc<Loader>,
    pub worker_id: String,
    pub device: Device,
    pub generation: u64,
}

impl Fetcher {
    pub fn fetch(&self, step: u64) -> Result<Next> {
        let req = v1::NextStepRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step,
        };
        match self.rt.block_on(self.client.next_step(req)) {
            Ok(resp) => self.load(resp),
            Err(CallError::Stale(_)) => Ok(Next::Regroup),
            Err(e) => Err(e.into()),
        }
    }

    /// Loads the batch of a NextStep answer (asked here, or carried by a CommitStep answer).
    pub fn load(&self, resp: v1::NextStepResponse) -> Result<Next> {
        if resp.regroup {
            return Ok(Next::Regroup);
        }
        if resp.end_of_run {
            return Ok(Next::End);
        }
        self.loader.prefetch(&resp.prefetch_blocks);
        let refs: Vec<SampleRef> = resp
            .samples
            .iter()
            .map(|s| SampleRef {
                epoch: s.epoch,
                block: s.block,
                row: s.row,
            })
            .collect();
        fault::point("load");
        let batch = self.loader.load(&refs)?.to_device(self.device)?;
        Ok(Next::Batch {
            global_batch: resp.global_batch as usize,
            refs,
            batch,
        })
    }
}

/// The lookahead thread; waited for when the step loop ends, so no fetch outlives its generation.
pub(super) struct Ahead(Option<std::thread::JoinHandle<Result<Next>>>);

impl Ahead {
    pub fn none() -> Self {
        Ahead(None)
    }

    /// Starts fetching `step` on a thread: loading the answer the Join carried for it, or what
    /// the coordinator answers to the report in flight (which asks for `step`), or asking for
    /// it when the answer could not carry it. A report refused as stale ends the generation
    /// here; its other errors are the step loop's to raise (this does not ask a coordinator
    /// that just failed a call again).
    pub fn start(
        fetcher: Fetcher,
        step: u64,
        carried: Option<v1::NextStepResponse>,
        report: Option<Commit>,
    ) -> Self {
        Ahead(Some(std::thread::spawn(move || {
            if let Some(resp) = carried {
                return fetcher.load(resp);
            }
            let answered = report.map(|c| c.wait(&fetcher.rt));
            match answered.as_deref() {
                Some(Err(CallError::Stale(_))) => Ok(Next::Regroup),
                Some(Err(e)) => anyhow::bail!("the report carrying step {step} failed: {e}"),
                Some(Ok(v1::CommitStepResponse {
                    next: Some(resp), ..
                })) if resp.step == step => fetcher.load(resp.clone()),
                _ => fetcher.fetch(step),
            }
        })))
    }

    /// The fetched step, or None when there was no lookahead or it failed (then the caller
    /// fetches again: a lookahead is refused while a slower rank has not committed).
    pub fn take(&mut self, step: u64) -> Option<Next> {
        match self.0.take().map(|h| h.join()) {
            Some(Ok(Ok(n))) => Some(n),
            Some(Ok(Err(e))) => {
                tracing::debug!(step, "lookahead fetch not taken: {e:#}");
                None
            }
            Some(Err(_)) => {
                tracing::warn!(step, "the lookahead thread panicked");
                None
            }
            None => None,
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}
