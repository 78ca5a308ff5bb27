//! Gradients in flat buckets, as DDP does it: one collective per ~25 MB instead of one per
//! parameter (hundreds of small messages would be latency-bound).
//!
//! [`Bucket`] (a flat buffer, its members, pack and unpack) is the one bucket type of both
//! reducers: [`GradBuckets`] all-reduces the buckets after backward, the overlapped reducer
//! (`crate::overlap`) during it. Both lay them out with [`Bucket::layout`], so their sums are
//! bit-identical by construction.

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, Result};

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// One parameter's place in a bucket: `param` (`params[index]` of the list laid out) at
/// `offset..offset + numel` of the flat buffer.
pub(crate) struct Member {
    pub index: usize,
    pub param: Tensor,
    pub offset: i64,
    pub numel: i64,
}

/// Some parameters' gradients as one flat buffer, allocated once and reused every step.
pub(crate) struct Bucket {
    pub flat: Tensor,
    pub members: Vec<Member>,
    /// The operation its errors name.
    op: &'static str,
}

pub struct GradBuckets {
    buckets: Vec<Bucket>,
}

fn invalid(message: String) -> CollectiveError {
    CollectiveError::Invalid {
        op: "all_reduce_grads",
        message,
    }
}

fn tch_err(e: tch::TchError) -> CollectiveError {
    invalid(e.to_string())
}

impl GradBuckets {
    /// Group the parameters that require grad into buckets of about `bucket_bytes`, starting
    /// from the last registered (their grads are ready first in backward). A parameter larger
    /// than `bucket_bytes` gets a bucket of its own. All parameters must share one float kind
    /// (f32 in training, f64 in exactness tests) and one device.
    pub fn new(params: &[Tensor], bucket_bytes: usize) -> Result<Self> {
        let buckets = Bucket::layout(params, bucket_bytes, "all_reduce_grads")?;
        Ok(GradBuckets { buckets })
    }

    /// Elements per bucket, in all-reduce order.
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.flat.numel()).collect()
    }

    /// Replace every parameter's grad by its sum over the ranks of `coll`. A parameter with no
    /// grad counts as zeros and gets a grad (every rank must end with the same grads).
    pub fn all_reduce_grads(&mut self, coll: &mut dyn Collective) -> Result<()> {
        for bucket in &mut self.buckets {
            bucket.pack()?;
            crate::fault::point("allreduce");
            coll.all_reduce_sum(&mut bucket.flat)?;
            bucket.unpack()?;
        }
        Ok(())
    }
}

impl Bucket {
    /// The parameters that require grad, from the last registered (their grads are ready first
    /// in backward), grouped into buckets of about `bucket_bytes` (a larger parameter gets its
    /// own), in all-reduce order. All of them must share one device and one float kind (f32 or
    /// f64), else an error. `op` names the reducer in the buckets' errors.
    pub(crate) fn layout(
        params: &[Tensor],
        bucket_bytes: usize,
        op: &'static str,
    ) -> Result<Vec<Bucket>> {
        let mut first: Option<(Device, Kind)> = None;
        let mut groups = Vec::new();
        let mut members: Vec<Member> = Vec::new();
        let mut filled: i64 = 0;
        let mut limit = 1;
        for (i, p) in params.iter().enumerate().rev() {
            if !p.defined() || !p.requires_grad() {
                continue;
            }
            let kind = p.f_kind().map_err(tch_err)?;
            if !matches!(kind, Kind::Float | Kind::Double) {
                return Err(invalid(format!(
                    "parameter {i} is {kind:?}, not f32 or f64"
                )));
            }
            match first {
                None => {
                    first = Some((p.device(), kind));
                    limit = (bucket_bytes / kind.elt_size_in_bytes()).max(1) as i64;
                }
                Some((d, k)) if d != p.device() || k != kind => {
                    return Err(invalid(format!(
                        "parameter {i} is {kind:?} on {:?}, the others {k:?} on {d:?}",
                        p.device()
                    )));
                }
                Some(_) => {}
            }
            let numel = p.numel() as i64;
            if filled > 0 && filled + numel > limit {
                groups.push((std::mem::take(&mut members), filled));
                filled = 0;
            }
            members.push(Member {
                index: i,
                param: p.shallow_clone(),
                offset: filled,
                numel,
            });
            filled += numel;
        }
        if !members.is_empty() {
            groups.push((members, filled));
        }
        let (device, kind) = first.unwrap_or((Device::Cpu, Kind::Float));
        groups
            .into_iter()
            .map(|(members, numel)| {
                let flat = Tensor::f_zeros([numel], (kind, device)).map_err(|e| {
                    CollectiveError::Invalid {
                        op,
                        message: e.to_string(),
                    }
                })?;
                Ok(Bucket { flat, members, op })
            })
            .collect()
    }

    fn err(&self, e: tch::TchError) -> CollectiveError {
        CollectiveError::Invalid {
            op: self.op,
            message: e.to_string(),
        }
    }

    /// Copy the members' grads into the flat buffer (zeros for a missing grad).
    pub(crate) fn pack(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for m in &self.members {
            let mut dst = self
                .flat
                .f_narrow(0, m.offset, m.numel)
                .map_err(|e| self.err(e))?;
            let grad = m.param.grad();
            if grad.defined() {
                dst.f_copy_(&grad.f_reshape([-1]).map_err(|e| self.err(e))?)
                    .map_err(|e| self.err(e))?;
            } else {
                let _ = dst.f_zero_().map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Copy the sums back into every member's grad; a member without one gets one.
    pub(crate) fn unpack(&self) -> Result<()> {
        for m in &self.members {
            let mut grad = m.param.grad();
            if !grad.defined() {
                grad = materialize_grad(&m.param)?;
            }
            self.write_grad(m, &mut grad)?;
        }
        Ok(())
    }

    /// Copy the sums back into the grads that exist (autograd may still be running: no grad is
    /// created here); returns whether some member had none.
    pub(crate) fn unpack_defined(&self) -> Result<bool> {
        let mut missing = false;
        for m in &self.members {
            let mut grad = m.param.grad();
            if !grad.defined() {
                missing = true;
                continue;
            }
            self.write_grad(m, &mut grad)?;
        }
        Ok(missing)
    }

    /// What `unpack_defined` left out: the members without a grad get one, holding their sum.
    pub(crate) fn unpack_missing(&self) -> Result<()> {
        for m in &self.members {
            if m.param.grad().defined() {
                continue;
            }
            let mut grad = materialize_grad(&m.param)?;
            self.write_grad(m, &mut grad)?;
        }
        Ok(())
    }

    /// `grad` = member `m`'s part of the flat buffer.
    fn write_grad(&self, m: &Member, grad: &mut Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let src = self
            .flat
            .f_narrow(0, m.offset, m.numel)
            .and_then(|s| s.f_view(grad.size().as_slice()))
            .map_err(|e| self.err(e))?;
        grad.f_copy_(&src).map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// tch cannot assign `.grad`; a backward pass through `sum(p * 0)` makes autograd create a
/// zero grad that we then overwrite in place.
pub(crate) fn materialize_grad(param: &Tensor) -> Result<Tensor> {
    tch::with_grad(|| {
        param
            .f_mul_scalar(0.0)
            .and_then(|z| z.f_sum(z.kind()))
            .and_then(|s| s.f_backward())
    })
    .map_err(tch_err)?;
    let grad = param.grad();
    if grad.defined() {
        Ok(grad)
    } else {
        Err(invalid("could not create a grad for a parameter".into()))
    }
}
