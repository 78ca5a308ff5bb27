//! ferroclip's worker: everything that touches libtorch lives in this crate.
//! Data flows one way: data → model → loss → collective → optim (see ARCHITECTURE.md).
//!
//! The layers are the top-level modules; `cmd` holds the binary's commands built on them.

pub mod checkpoint;
pub mod cmd;
pub mod collective;
pub mod data;
pub mod device;
pub mod fault;
pub mod libtorch;
pub mod loss;
pub mod model;
pub mod optim;
pub mod overlap;
pub mod train;
