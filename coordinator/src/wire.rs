//! The run's answers as `ferroclip.v1` messages and gRPC status codes.

use ferroclip_proto::v1;
use tonic::Status;

use crate::run::{Placement, Refusal, RunStatus, StepPlan};

pub fn status_of(r: Refusal) -> Status {
    match r {
        // The worker's generation is over: it joins again.
        Refusal::Stale(m) => Status::failed_precondition(m),
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::NotYet(m) => Status::out_of_range(m),
    }
}

/// A placement, with the run's whole config (the worker's one source of truth); the member's
/// session secret is added by the service.
pub fn join_response(p: Placement, run_config_toml: &str) -> v1::JoinResponse {
    v1::JoinResponse {
        generation: p.generation,
        rank: p.rank,
        world_size: p.world_size,
        peers: p
            .peers
            .iter()
            .map(|peer| v1::Peer {
                rank: peer.rank,
                worker_id: peer.worker_id.clone(),
                collective_addr: peer.collective_addr.clone(),
            })
            .collect(),
        run_config_toml: run_config_toml.to_string(),
        next_step: p.next_step,
        state_source_rank: p.state_source_rank,
        needs_state: p.needs_state,
        session: String::new(),
        resume_checkpoint: p.resume_checkpoint.unwrap_or_default(),
        total_steps: p.total_steps,
    }
}

pub fn next_step_response(step: u64, plan: StepPlan) -> v1::NextStepResponse {
    match plan {
        StepPlan::Samples {
            step,
            samples,
            rank_batches,
            prefetch_blocks,
        } => v1::NextStepResponse {
            step,
            samples: samples
                .into_iter()
                .map(|s| v1::SampleRef {
                    epoch: s.epoch,
                    block: s.block,
                    row: s.row,
                })
                .collect(),
            global_batch: rank_batches.iter().sum(),
            end_of_run: false,
            regroup: false,
            prefetch_blocks,
            rank_batches,
        },
        StepPlan::Regroup => v1::NextStepResponse {
            step,
            regroup: true,
            ..Default::default()
        },
        StepPlan::End => v1::NextStepResponse {
            step,
            end_of_run: true,
            ..Default::default()
        },
    }
}

pub fn status_response(s: RunStatus, store_wait_s: f64) -> v1::StatusResponse {
    v1::StatusResponse {
        generation: s.generation,
        step: s.step,
        epoch: s.epoch,
        epoch_progress: s.epoch_progress,
        workers: s
            .workers
            .into_iter()
            .map(|w| v1::WorkerStatus {
                rank: w.rank,
                worker_id: w.worker_id,
                host: w.host,
                device: w.device,
                seconds_since_heartbeat: w.seconds_since_heartbeat,
                step_time_s: w.step_time_s,
                data_wait_s: w.data_wait_s,
                allreduce_s: w.allreduce_s,
                store_wait_s: w.store_wait_s,
            })
            .collect(),
        metrics: s
            .metrics
            .into_iter()
            .map(|(name, value)| v1::Metric { name, value })
            .collect(),
        state: s.state.to_string(),
        last_checkpoint: s.last_checkpoint.unwrap_or_default(),
        total_steps: s.total_steps,
        store_wait_s,
    }
}
