//! ferroclip's worker: everything that touches libtorch lives in this crate.
//! Data flows one way: data → model → loss → collective → optim (see ARCHITECTURE.md).

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod device;
pub mod dist;
pub mod embed;
pub mod eval;
pub mod gpu_check;
pub mod libtorch;
pub mod loss;
pub mod model;
pub mod optim;
pub mod overlap;
pub mod single;
pub mod smoke;
pub mod train;
