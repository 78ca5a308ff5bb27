//! ferroclip's coordinator: owns a run's membership, data plan, step commits and checkpoints.
//! Never links libtorch.

pub mod http;
pub mod journal;
pub mod ledger;
pub mod membership;
pub mod plan;
pub mod run;
pub mod service;
