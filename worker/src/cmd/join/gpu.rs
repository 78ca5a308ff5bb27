//! What a distributed worker needs for its device: the backend and precision the run's config
//! asks for must fit it (checked once, before anything is built), and on GPUs an NCCL group per
//! generation, whose id rank 0 makes and hands to the others over the TCP ring that the
//! rendezvous has just formed (the ring is the generation's membership, so the id reaches exactly
//! its members, and a new generation gets a new id).

use std::time::Duration;

use ferroclip_proto::config::{Backend, Precision, RunConfig};
use tch::Device;

use crate::collective::nccl::{self, NcclCollective, NcclId, ID_BYTES};
use crate::collective::ring::RingCollective;
use crate::collective::{Collective, CollectiveError};

/// How this worker computes, from (device, config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Gradients over NCCL (GPU) rather than the TCP ring (CPU).
    pub nccl: bool,
    /// Forward and backward under bf16 autocast, fp32 master weights.
    pub autocast_bf16: bool,
}

/// The run's `cluster.backend` and `optim.precision` on this device, or an error naming the key.
pub fn plan(device: Device, cfg: &RunConfig) -> anyhow::Result<Plan> {
    let gpu = matches!(device, Device::Cuda(_));
    let nccl = match (cfg.cluster.backend, gpu) {
        (Backend::Nccl, true) => true,
        (Backend::Ring, false) => false,
        (Backend::Nccl, false) => anyhow::bail!(
            "cluster.backend = \"nccl\" all-reduces GPU memory, but this worker runs on the CPU: \
             start it with --device cuda (one process per GPU), or use backend \"ring\" for CPU workers"
        ),
        (Backend::Ring, true) => anyhow::bail!(
            "cluster.backend = \"ring\" all-reduces host memory, but this worker runs on {device:?}: \
             GPU workers need backend \"nccl\""
        ),
    };
    let autocast_bf16 = match (cfg.optim.precision, gpu) {
        (Precision::Auto, gpu) => gpu,
        (Precision::Fp32, _) => false,
        (Precision::AmpBf16, true) => true,
        (Precision::AmpBf16, false) => anyhow::bail!(
            "optim.precision = \"amp_bf16\" is CUDA autocast; this worker runs on the CPU (use \"auto\" or \"fp32\")"
        ),
    };
    Ok(Plan {
        nccl,
        autocast_bf16,
    })
}

/// Rank 0's id (from `make`), as every rank of `ring` receives it.
pub fn share_id(
    ring: &mut RingCollective,
    make: impl FnOnce() -> Result<NcclId, CollectiveError>,
) -> Result<NcclId, CollectiveError> {
    let mut bytes = [0u8; ID_BYTES];
    if ring.rank() == 0 {
        bytes = make()?.0;
    }
    ring.broadcast_bytes(&mut bytes, 0)?;
    Ok(NcclId(bytes))
}

/// This generation's NCCL communicator on GPU `gpu`, its id carried over `ring`.
pub fn nccl_group(
    ring: &mut RingCollective,
    gpu: usize,
    timeout: Duration,
) -> Result<NcclCollective, CollectiveError> {
    let id = share_id(ring, nccl::unique_id)?;
    NcclCollective::new(&id, ring.rank(), ring.world_size(), gpu, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::RingOptions;
    use std::net::TcpListener;

    fn cfg(backend: &str, precision: &str) -> RunConfig {
        let text =
            format!("[cluster]\nbackend = \"{backend}\"\n[optim]\nprecision = \"{precision}\"\n");
        RunConfig::parse(&text, "test").expect("config")
    }

    #[test]
    fn backend_and_precision_must_fit_the_device() {
        let cpu = Device::Cpu;
        let gpu = Device::Cuda(0);
        assert_eq!(
            plan(cpu, &cfg("ring", "auto")).unwrap(),
            Plan {
                nccl: false,
                autocast_bf16: false
            }
        );
        assert_eq!(
            plan(gpu, &cfg("nccl", "auto")).unwrap(),
            Plan {
                nccl: true,
                autocast_bf16: true
            }
        );
        assert!(!plan(gpu, &cfg("nccl", "fp32")).unwrap().autocast_bf16);
        let err = |d, b, p| plan(d, &cfg(b, p)).unwrap_err().to_string();
        let e = err(cpu, "nccl", "auto");
        assert!(
            e.contains("cluster.backend") && e.contains("--device cuda"),
            "{e}"
        );
        let e = err(gpu, "ring", "auto");
        assert!(e.contains("cluster.backend") && e.contains("nccl"), "{e}");
        let e = err(cpu, "ring", "amp_bf16");
        assert!(e.contains("optim.precision"), "{e}");
    }

    #[test]
    fn rank_zeros_id_reaches_every_rank_over_the_ring() {
        let world = 3;
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let want: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let got: Vec<NcclId> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let peers = peers.clone();
                    s.spawn(move || {
                        let mut ring =
                            RingCollective::connect(rank, &peers, l, RingOptions::default())
                                .unwrap();
                        share_id(&mut ring, || {
                            // Only rank 0 may create the id: NCCL ids are single-use secrets.
                            assert_eq!(rank, 0, "rank {rank} made an id");
                            Ok(NcclId(want))
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, vec![NcclId(want); world]);
    }

    #[test]
    fn without_nccl_the_group_fails_with_a_clear_error_not_a_hang() {
        // CI machines have no libcuda: rank 0's id cannot be made, and it says why.
        if nccl::probe().is_ok() {
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![l.local_addr().unwrap().to_string()];
        let mut ring = RingCollective::connect(0, &peers, l, RingOptions::default()).unwrap();
        let e = match nccl_group(&mut ring, 0, Duration::from_secs(1)) {
            Ok(_) => panic!("an NCCL group formed without NCCL"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("CUDA driver") || e.contains("libnccl"), "{e}");
    }
}
