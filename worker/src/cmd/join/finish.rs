//! The end of the run for this worker: rank 0's checkpoints recorded with the coordinator
//! (CommitCheckpoint), the wait for the run to finish after its last step, and Leave.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferroclip_proto::v1;

use super::client::CallError;
use super::{state, Beat, Exit, Worker};

impl Worker {
    /// No step after `last_step`: rank 0 writes the final checkpoint (unless it already wrote
    /// that step's), then every rank waits until the coordinator says the run is finished (its
    /// final checkpoint recorded), or until the generation ends (a death in the last steps:
    /// the remaining steps run in a new generation).
    pub(super) fn finish(
        &mut self,
        place: &v1::JoinResponse,
        last_step: u64,
        beat: &Beat,
    ) -> Result<Exit> {
        let written = self
            .session
            .as_ref()
            .and_then(|s| s.last_checkpoint.clone());
        if place.rank == 0 && last_step > 0 {
            match written {
                Some((step, _, true)) if step == last_step => {}
                Some((step, url, false)) if step == last_step => {
                    self.record_checkpoint(place.generation, step, url)?
                }
                _ => self.checkpoint(place.generation, last_step)?,
            }
        }
        loop {
            if beat.finished.load(Ordering::Relaxed) {
                self.leave("finished")?;
                return Ok(Exit::Done);
            }
            if beat.over.load(Ordering::Relaxed) {
                return Ok(Exit::Regroup);
            }
            if self.opts.stop.load(Ordering::Relaxed) {
                self.leave("SIGTERM")?;
                return Ok(Exit::Done);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(super) fn checkpoint(&mut self, generation: u64, step: u64) -> Result<()> {
        let _span = tracing::info_span!("checkpoint", step).entered();
        let s = self.session.as_mut().context("session")?;
        let url =
            state::save_checkpoint(&s.trainer, &s.cfg, &s.store, step).with_context(|| {
                format!(
                    "writing the checkpoint of step {step} under {}",
                    s.cfg.run.dir
                )
            })?;
        s.last_checkpoint = Some((step, url.clone(), false));
        self.record_checkpoint(generation, step, url)
    }

    /// CommitCheckpoint: the coordinator records a checkpoint this worker wrote.
    pub(super) fn record_checkpoint(
        &mut self,
        generation: u64,
        step: u64,
        url: String,
    ) -> Result<()> {
        let req = v1::CommitCheckpointRequest {
            worker_id: self.opts.worker_id.clone(),
            generation,
            step,
            url: url.clone(),
        };
        let recorded = match self.rt.block_on(self.client.commit_checkpoint(req)) {
            Ok(()) => true,
            Err(CallError::Stale(_)) => false,
            Err(e) => return Err(e.into()),
        };
        if let Some(s) = self.session.as_mut() {
            s.last_checkpoint = Some((step, url, recorded));
        }
        Ok(())
    }

    pub(super) fn leave(&self, reason: &str) -> Result<()> {
        let req = v1::LeaveRequest {
            worker_id: self.opts.worker_id.clone(),
            generation: self.generation,
            reason: reason.into(),
        };
        // Leaving is a courtesy (missed heartbeats say the same, later): never outwait a pod's
        // termination grace period retrying it against a coordinator that is gone.
        // The timer must be created inside the runtime.
        let call = async { tokio::time::timeout(LEAVE_TIMEOUT, self.client.leave(req)).await };
        match self.rt.block_on(call) {
            Ok(Ok(())) | Ok(Err(CallError::Stale(_))) => Ok(()),
            Ok(Err(e)) => bail!("leaving the run: {e}"),
            Err(_) => {
                tracing::warn!(
                    "the coordinator did not answer Leave within {LEAVE_TIMEOUT:?}; exiting anyway"
                );
                Ok(())
            }
        }
    }
}

const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
