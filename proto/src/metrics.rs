//! The names of the figures a worker reports with each CommitStep and the coordinator keeps per
//! step: one list both sides (and the dashboard, through `/api/status`) use.

/// Weighted sum of the enabled objectives, and each objective's loss (`loss/<objective>`).
pub const LOSS_TOTAL: &str = "loss/total";
pub const LOSS_CONTRASTIVE: &str = "loss/contrastive";
pub const LOSS_SIGLIP: &str = "loss/siglip";
pub const LOSS_MLM: &str = "loss/mlm";
pub const LOSS_MAE: &str = "loss/mae";
pub const LOSS_ITM: &str = "loss/itm";
/// Every loss key starts with this (losses are weighted by the rank's samples).
pub const LOSS_PREFIX: &str = "loss/";

pub const LR: &str = "lr";
pub const GRAD_NORM: &str = "grad_norm";
/// exp of the contrastive temperature parameter.
pub const LOGIT_SCALE: &str = "logit_scale";

/// Wall time of the whole step and of its phases (seconds).
pub const STEP_S: &str = "time/step_s";
pub const DATA_WAIT_S: &str = "time/data_wait_s";
pub const COMPUTE_S: &str = "time/compute_s";
pub const FORWARD_S: &str = "time/forward_s";
pub const BACKWARD_S: &str = "time/backward_s";
pub const ALLREDUCE_S: &str = "time/allreduce_s";
pub const OPTIMIZER_S: &str = "time/optimizer_s";
/// The phases of a step, in order, with their short names (Prometheus `phase` label, charts).
pub const PHASES: &[(&str, &str)] = &[
    (DATA_WAIT_S, "data_wait"),
    (FORWARD_S, "forward"),
    (BACKWARD_S, "backward"),
    (ALLREDUCE_S, "allreduce"),
    (OPTIMIZER_S, "optimizer"),
];

/// Gradient bytes one all-reduce moves, and its bus bandwidth (bytes per second).
pub const ALLREDUCE_BYTES: &str = "allreduce/bytes";
pub const ALLREDUCE_BUSBW: &str = "allreduce/busbw_bytes_per_s";

/// Added by the coordinator to each committed step's record.
pub const SAMPLES_TOTAL: &str = "samples_total";
pub const SAMPLES_PER_S: &str = "samples_per_s";
pub const WORKERS: &str = "workers";
