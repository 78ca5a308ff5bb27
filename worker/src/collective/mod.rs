//! Collective communication behind one trait: the TCP ring on CPUs, NCCL on GPUs.
//! Sums (not means): losses are already normalised by the global batch.

use tch::Tensor;

pub mod buckets;
mod handshake;
mod host;
pub mod nccl;
mod pipe;
mod rendezvous;
pub mod ring;
mod shm;
mod wire;

#[cfg(test)]
mod fuzz_tests;

pub use buckets::GradBuckets;
pub use ring::{RingCollective, RingOptions, Transport, WireDtype};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("peer rank {peer} did not answer within {timeout_s:.1}s during {op}")]
    Timeout {
        peer: usize,
        op: &'static str,
        timeout_s: f64,
    },
    #[error("connection to peer rank {peer} failed during {op}: {source}")]
    Io {
        peer: usize,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("collective {op}: {message}")]
    Invalid { op: &'static str, message: String },
}

impl CollectiveError {
    /// The rank to report to the coordinator as suspect, if the error names one.
    pub fn suspect(&self) -> Option<usize> {
        match self {
            CollectiveError::Timeout { peer, .. } | CollectiveError::Io { peer, .. } => Some(*peer),
            CollectiveError::Invalid { .. } => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// A process group. Every member must call the same operations in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum across ranks, in place.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()>;
    /// Concatenation of every rank's tensor along dim 0, in rank order. Dim-0 lengths may differ.
    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor>;
    /// Overwrite `t` on every rank with root's `t`.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// World size 1: every operation is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
    fn broadcast(&mut self, _t: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
