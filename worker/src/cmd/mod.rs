//! The worker binary's commands, one module each (`main.rs` parses the command line and
//! dispatches here). They are built from the layers at the crate's top level (data, model,
//! loss, optim, collective, overlap, train, checkpoint, device) and never the other way round.

pub mod bench_step;
pub mod embed;
pub mod eval;
pub mod gpu_check;
pub mod join;
pub mod smoke;
pub mod train;
