//! One step of the distributed loop once its batch is in hand: audit what is fed, compute the
//! gradients over the global batch, apply the update, audit it, and assemble the figures that
//! CommitStep carries (and rank 0 writes to TensorBoard).

use std::time::Instant;

use anyhow::Result;
use ferroclip_proto::metrics as m;
use ferroclip_proto::v1;

use super::audit::Record;
use super::{state, Session};
use crate::collective::{Collective, CollectiveError};
use crate::data::{Batch, SampleRef};
use crate::fault;
use crate::train::TrainError;

/// What a step ended in.
pub(super) enum Outcome {
    /// Applied; the CommitStep request to send.
    Applied(v1::CommitStepRequest),
    /// A collective failed: the step is abandoned (no update happened).
    Abandoned(CollectiveError),
}

/// Where the step sits: its number, generation and rank, and how long its data took.
pub(super) struct StepInfo<'a> {
    pub worker_id: &'a str,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub step: u64,
    pub started: Instant,
    pub data_wait_s: f64,
}

impl Session {
    pub(super) fn train_step(
        &mut self,
        at: &StepInfo<'_>,
        global_batch: usize,
        refs: &[SampleRef],
        batch: &Batch,
        coll: &mut dyn Collective,
    ) -> Result<Outcome> {
        let (gen, step) = (at.generation, at.step);
        if let Some(a) = self.audit.as_mut() {
            a.write(&Record::Fed {
                generation: gen,
                step,
                rank: at.rank,
                keys: batch.keys.clone(),
            })?;
        }
        let t1 = Instant::now();
        // Forward, backward and the all-reduce run inside the trainer: their times are recorded
        // on this span (exported over OTLP when it is configured).
        let compute_span = tracing::info_span!(
            "compute_grads",
            forward_s = tracing::field::Empty,
            backward_s = tracing::field::Empty,
            allreduce_s = tracing::field::Empty
        )
        .entered();
        let losses = match self.trainer.compute_grads(batch, global_batch, coll) {
            Ok(l) => l,
            Err(TrainError::Collective(ce)) => return Ok(Outcome::Abandoned(ce)),
            Err(e) => return Err(e.into()),
        };
        let compute = t1.elapsed().as_secs_f64();
        let phases = self.trainer.last_times;
        let allreduce_s = (compute - phases.forward_s - phases.backward_s).max(0.0);
        compute_span.record("forward_s", phases.forward_s);
        compute_span.record("backward_s", phases.backward_s);
        compute_span.record("allreduce_s", allreduce_s);
        drop(compute_span);
        let t2 = Instant::now();
        let update = tracing::info_span!("optimizer").in_scope(|| self.trainer.apply_update())?;
        let optimizer_s = t2.elapsed().as_secs_f64();
        fault::point("applied");
        if let Some(a) = self.audit.as_mut() {
            a.write(&Record::Applied {
                generation: gen,
                step,
                checksum: state::checksum(&self.trainer),
            })?;
        }
        let mut metrics: Vec<(String, f64)> = vec![
            (m::LOSS_TOTAL.into(), losses.total),
            (m::LR.into(), update.lr),
            (m::GRAD_NORM.into(), update.grad_norm),
            (m::LOGIT_SCALE.into(), state::logit_scale(&self.trainer)),
        ];
        let o = &self.cfg.objectives;
        for (name, w, v) in [
            (m::LOSS_CONTRASTIVE, o.contrastive, losses.contrastive),
            (m::LOSS_SIGLIP, o.siglip, losses.siglip),
            (m::LOSS_MLM, o.mlm, losses.mlm),
            (m::LOSS_MAE, o.mae, losses.mae),
            (m::LOSS_ITM, o.itm, losses.itm),
        ] {
            if w > 0.0 {
                metrics.push((name.into(), v));
            }
        }
        metrics.push((m::STEP_S.into(), at.started.elapsed().as_secs_f64()));
        metrics.push((m::DATA_WAIT_S.into(), at.data_wait_s));
        metrics.push((m::COMPUTE_S.into(), compute));
        metrics.push((m::FORWARD_S.into(), phases.forward_s));
        metrics.push((m::BACKWARD_S.into(), phases.backward_s));
        metrics.push((m::OPTIMIZER_S.into(), optimizer_s));
        if at.world_size > 1 {
            // compute_grads = forward + backward + the gradient all-reduce.
            let n = at.world_size as f64;
            let bytes = state::grad_bytes(&self.trainer) as f64;
            metrics.push((m::ALLREDUCE_S.into(), allreduce_s));
            metrics.push((m::ALLREDUCE_BYTES.into(), bytes));
            if allreduce_s > 0.0 {
                let busbw = bytes * 2.0 * (n - 1.0) / n / allreduce_s;
                metrics.push((m::ALLREDUCE_BUSBW.into(), busbw));
            }
        }
        if at.rank == 0 {
            // A rank without rows reports losses of 0, which are no estimate: left out.
            let scalars: Vec<(String, f64)> = metrics
                .iter()
                .filter(|(k, _)| !refs.is_empty() || !k.starts_with(m::LOSS_PREFIX))
                .cloned()
                .collect();
            self.log_scalars(at.worker_id, step, &scalars);
        }
        Ok(Outcome::Applied(v1::CommitStepRequest {
            worker_id: at.worker_id.to_string(),
            generation: gen,
            step,
            samples: refs.len() as u32,
            metrics: metrics
                .into_iter()
                .map(|(name, value)| v1::Metric { name, value })
                .collect(),
            // The step loop asks for the step after next with the commit.
            next_step: 0,
        }))
    }

    /// Rank 0's scalars to TensorBoard; a failing disk must not stop training.
    fn log_scalars(&mut self, worker_id: &str, step: u64, metrics: &[(String, f64)]) {
        let run_dir = &self.cfg.run.dir;
        let writer = self.tensorboard.get_or_insert_with(|| {
            let dir = super::tensorboard::events_dir(run_dir)
                .map_err(|e| tracing::warn!("no TensorBoard events: {e}"))
                .ok()?;
            super::tensorboard::EventWriter::create(&dir, worker_id)
                .map_err(|e| tracing::warn!("no TensorBoard events in {}: {e}", dir.display()))
                .ok()
        });
        if let Some(w) = writer {
            if let Err(e) = w.scalars(step, metrics) {
                tracing::warn!("TensorBoard event write failed: {e}");
            }
        }
    }
}
