//! Gradient all-reduce in flat buckets, as DDP does it: one collective per ~25 MB instead of one
//! per parameter (hundreds of small messages would be latency-bound).

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, Result};

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// One parameter's place in a bucket.
struct Member {
    param: Tensor,
    offset: i64,
    numel: i64,
}

struct Bucket {
    /// Allocated once and reused every step.
    flat: Tensor,
    members: Vec<Member>,
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
        let Layout {
            groups,
            device,
            kind,
        } = layout(params, bucket_bytes)?;
        let buckets = groups
            .into_iter()
            .map(|(slots, numel)| {
                let members = slots
                    .iter()
                    .map(|s| Member {
                        param: params[s.index].shallow_clone(),
                        offset: s.offset,
                        numel: s.numel,
                    })
                    .collect();
                Bucket::new(members, numel, kind, device)
            })
            .collect::<Result<_>>()?;
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
    fn new(members: Vec<Member>, numel: i64, kind: Kind, device: Device) -> Result<Self> {
        let flat = Tensor::f_zeros([numel], (kind, device)).map_err(tch_err)?;
        Ok(Bucket { flat, members })
    }

    fn pack(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for m in &self.members {
            let mut dst = self.flat.f_narrow(0, m.offset, m.numel).map_err(tch_err)?;
            let grad = m.param.grad();
            if grad.defined() {
                dst.f_copy_(&grad.f_reshape([-1]).map_err(tch_err)?)
                    .map_err(tch_err)?;
            } else {
                let _ = dst.f_zero_().map_err(tch_err)?;
            }
        }
        Ok(())
    }

    fn unpack(&mut self) -> Result<()> {
        for m in &self.members {
            let mut grad = m.param.grad();
            if !grad.defined() {
                grad = materialize_grad(&m.param)?;
            }
            let _guard = tch::no_grad_guard();
            let src = self
                .flat
                .f_narrow(0, m.offset, m.numel)
                .and_then(|s| s.f_view(grad.size().as_slice()))
                .map_err(tch_err)?;
            grad.f_copy_(&src).map_err(tch_err)?;
        }
        Ok(())
    }
}

/// One parameter's place in a bucket: `params[index]` at `offset..offset + numel` of the flat buffer.
pub(crate) struct Slot {
    pub index: usize,
    pub offset: i64,
    pub numel: i64,
}

/// One bucket's slots and its element count.
pub(crate) type SlotGroup = (Vec<Slot>, i64);

/// The bucket layout shared by `GradBuckets` and the overlapped reducer.
pub(crate) struct Layout {
    /// Each bucket's slots and element count, in all-reduce order.
    pub groups: Vec<SlotGroup>,
    pub device: Device,
    /// The parameters' one float kind (f32 in training; f64 for exactness tests).
    pub kind: Kind,
}

/// The parameters that require grad, from the last registered (their grads are ready first in
/// backward), grouped into buckets of about `bucket_bytes` (a larger parameter gets its own).
/// All of them must share one device and one float kind (f32 or f64), else an error.
pub(crate) fn layout(params: &[Tensor], bucket_bytes: usize) -> Result<Layout> {
    let mut first: Option<(Device, Kind)> = None;
    let mut groups = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
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
            groups.push((std::mem::take(&mut slots), filled));
            filled = 0;
        }
        slots.push(Slot {
            index: i,
            offset: filled,
            numel,
        });
        filled += numel;
    }
    if !slots.is_empty() {
        groups.push((slots, filled));
    }
    let (device, kind) = first.unwrap_or((Device::Cpu, Kind::Float));
    Ok(Layout {
        groups,
        device,
        kind,
    })
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
