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
pub fn join_response(
    p: Placement,
    first_steps: Vec<(u64, StepPlan)>,
    run_config_toml: &str,
) -> v1::JoinResponse {
    v1::JoinResponse {
        generation: p.generation,
        rank: p.rank,
        world_size: p.world_size,
        // Only the peer this rank dials (its right neighbour): all N peers in each of N answers
        // made forming a generation O(N²) (0.6 GB of answers at 4,096 ranks).
        peers: right_neighbour(&p)
            .into_iter()
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
        first_steps: first_steps
            .into_iter()
            .map(|(step, plan)| next_step_response(step, plan))
            .collect(),
        heartbeat_port: 0,
    }
}

/// The peer `p`'s rank connects to when it forms the ring (none in a world of one).
fn right_neighbour(p: &Placement) -> Option<&crate::run::Peer> {
    if p.world_size < 2 {
        return None;
    }
    let right = (p.rank + 1) % p.world_size;
    p.peers
        .get(right as usize)
        .filter(|peer| peer.rank == right)
}

pub fn next_step_response(step: u64, plan: StepPlan) -> v1::NextStepResponse {
    match plan {
        StepPlan::Samples {
            step,
            samples,
            shape,
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
            global_batch: shape.global_batch,
            end_of_run: false,
            regroup: false,
            prefetch_blocks,
            // N numbers in each of N answers would be O(N²) per step: only the tail's uneven
            // shares are spelled out.
            rank_batches: if shape.even {
                Vec::new()
            } else {
                shape.rank_batches.to_vec()
            },
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::run::{Peer, StepShape};

    #[test]
    fn a_join_answer_names_only_the_right_neighbour() {
        let peers: Vec<Peer> = (0..3)
            .map(|r| Peer {
                rank: r,
                worker_id: format!("w{r}"),
                collective_addr: format!("10.0.0.{r}:7000"),
            })
            .collect();
        let place = |rank, world_size| Placement {
            generation: 4,
            rank,
            world_size,
            peers: Arc::new(peers[..world_size as usize].to_vec()),
            next_step: 1,
            state_source_rank: 0,
            needs_state: false,
            resume_checkpoint: None,
            total_steps: 10,
        };
        for (rank, right) in [(0, 1), (1, 2), (2, 0)] {
            let r = join_response(place(rank, 3), vec![], "");
            assert_eq!(r.world_size, 3);
            assert_eq!(r.peers.len(), 1);
            assert_eq!(r.peers[0].rank, right);
            assert_eq!(r.peers[0].collective_addr, format!("10.0.0.{right}:7000"));
        }
        assert!(join_response(place(0, 1), vec![], "").peers.is_empty());
    }

    #[test]
    fn only_uneven_shares_are_spelled_out() {
        let answer = |batches: Vec<u32>| {
            next_step_response(
                7,
                StepPlan::Samples {
                    step: 7,
                    samples: Vec::new(),
                    shape: StepShape::new(batches),
                    prefetch_blocks: Vec::new(),
                },
            )
        };
        // 10 over 3 ranks: 4, 3, 3 is the even split.
        let even = answer(vec![4, 3, 3]);
        assert_eq!(even.global_batch, 10);
        assert!(even.rank_batches.is_empty());
        // The data's tail: rank 1 ran dry.
        let tail = answer(vec![4, 2, 3]);
        assert_eq!(tail.global_batch, 9);
        assert_eq!(tail.rank_batches, vec![4, 2, 3]);
        assert_eq!(answer(vec![3, 4, 3]).rank_batches, vec![3, 4, 3]);
    }
}
