//! What the run's rules answer, in the run's own terms: the service maps these to gRPC
//! messages and status codes, the HTTP page to JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferroclip_plan::SampleRef;

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The caller is not in the current generation: it must join again.
    #[error("{0}")]
    Stale(String),
    /// The request cannot be right (a step never assigned, a checkpoint elsewhere, …).
    #[error("{0}")]
    Invalid(String),
    /// Not yet: a step asked for too far ahead.
    #[error("{0}")]
    NotYet(String),
}

pub type Answer<T> = Result<T, Refusal>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub rank: u32,
    pub worker_id: String,
    pub collective_addr: String,
}

/// A worker's place in a generation that formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    /// Ordered by rank (shared by the generation's placements).
    pub peers: Arc<Vec<Peer>>,
    /// The step this generation starts at.
    pub next_step: u64,
    /// The rank whose parameters everyone takes by broadcast, when `needs_state`.
    pub state_source_rank: u32,
    pub needs_state: bool,
    /// A checkpoint to load before the first step (a rollback).
    pub resume_checkpoint: Option<String>,
    pub total_steps: u64,
}

/// How many samples each rank feeds into a step, computed once per step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepShape {
    pub rank_batches: Arc<Vec<u32>>,
    pub global_batch: u32,
    /// Whether the ranks share `global_batch` evenly (rank r feeds global / world, plus one
    /// when r < global % world): true except at the data's tail.
    pub even: bool,
}

impl StepShape {
    pub fn new(rank_batches: Vec<u32>) -> Self {
        let global_batch: u32 = rank_batches.iter().sum();
        let world = rank_batches.len().max(1) as u32;
        let even = rank_batches.iter().enumerate().all(|(r, &n)| {
            n == global_batch / world + u32::from((r as u32) < global_batch % world)
        });
        Self {
            rank_batches: Arc::new(rank_batches),
            global_batch,
            even,
        }
    }
}

/// What a rank feeds into a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPlan {
    Samples {
        step: u64,
        /// This rank's samples, in feed order.
        samples: Vec<SampleRef>,
        /// Samples of each rank in this step (shared by every rank's answer).
        shape: StepShape,
        /// Blocks this rank will likely read next.
        prefetch_blocks: Vec<u32>,
    },
    /// Membership changes at this step boundary: join again.
    Regroup,
    /// No such step: the run's last steps commit and rank 0 writes the final checkpoint.
    End,
}

/// A rank's report of an applied step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub samples: u32,
    pub metrics: Vec<(String, f64)>,
}

/// What CommitStep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This report completed the step (or a retry found it committed already).
    Step,
    /// Recorded; other ranks have not reported yet (or this was a retried report).
    Waiting,
}

/// One member as the status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub rank: u32,
    pub worker_id: String,
    pub host: String,
    pub device: String,
    pub seconds_since_heartbeat: f64,
    pub step_time_s: f64,
    pub data_wait_s: f64,
    pub allreduce_s: f64,
    pub store_wait_s: f64,
    /// The step of its last report.
    pub last_step: u64,
}

/// The run at a glance.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStatus {
    /// waiting, training, finishing or finished.
    pub state: &'static str,
    pub generation: u64,
    /// The last committed step.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u32,
    pub epoch_progress: f64,
    pub workers: Vec<WorkerView>,
    /// The last committed step's record.
    pub metrics: BTreeMap<String, f64>,
    pub last_checkpoint: Option<String>,
}
