//! All-reduce overlapped with backward, as DDP's reducer does it: a grad hook per parameter
//! counts down its bucket; a full bucket is packed on autograd's thread and handed to a
//! communication thread that all-reduces buckets strictly in bucket order (every rank issues
//! the same collectives in the same order) while backward goes on.
//!
//! The buckets are `collective::buckets::Bucket`s laid out by `Bucket::layout`, as
//! `GradBuckets`'s are (last parameters first), packed and unpacked by the same code: the sums
//! are bit-identical to the plain path (backward, then `GradBuckets::all_reduce_grads`).

pub mod hooks;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::Tensor;

use crate::collective::buckets::Bucket;
use crate::collective::{Collective, CollectiveError, Result};
use hooks::GradHooks;

/// A bucket and whether it was packed in this backward.
struct Staged {
    bucket: Bucket,
    packed: bool,
}

struct Shared {
    buckets: Vec<Mutex<Staged>>,
    /// Parameter index → its bucket.
    bucket_of: Vec<Option<usize>>,
    /// Members whose grad is not final yet, per bucket, this backward.
    remaining: Vec<AtomicUsize>,
    /// Hooks count only while a backward of ours runs (not when we materialise grads).
    active: AtomicBool,
    fired: AtomicUsize,
    tx: Mutex<Option<Sender<usize>>>,
    pack_error: Mutex<Option<String>>,
}

/// What one overlapped backward did.
#[derive(Debug, Clone, Default)]
pub struct OverlapStats {
    /// Hook calls (parameters whose grad autograd produced).
    pub fired: usize,
    /// Buckets handed over by hooks during backward, in the order they became full.
    pub ready_during_backward: Vec<usize>,
    /// Buckets packed after backward (some member got no grad).
    pub flushed: Vec<usize>,
    pub backward_s: f64,
    /// Seconds the communication thread spent in all-reduce.
    pub comm_s: f64,
    /// From the start of backward until the last bucket was reduced.
    pub total_s: f64,
}

/// The operation this reducer's errors name.
const OP: &str = "overlapped_all_reduce";

fn invalid(message: String) -> CollectiveError {
    CollectiveError::Invalid { op: OP, message }
}

fn tch_err(e: tch::TchError) -> CollectiveError {
    invalid(e.to_string())
}

impl Staged {
    /// Pack the bucket (zeros for a missing grad) and mark it packed.
    fn pack(&mut self) -> Result<()> {
        self.bucket.pack()?;
        self.packed = true;
        Ok(())
    }
}

impl Shared {
    fn lock(&self, b: usize) -> Result<std::sync::MutexGuard<'_, Staged>> {
        self.buckets[b]
            .lock()
            .map_err(|_| invalid(format!("bucket {b} lock poisoned")))
    }

    fn on_grad(&self, index: usize) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let Some(Some(b)) = self.bucket_of.get(index).copied() else {
            return;
        };
        self.fired.fetch_add(1, Ordering::Relaxed);
        if self.remaining[b].fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let packed = self.buckets[b]
            .lock()
            .map_err(|e| e.to_string())
            .and_then(|mut bk| bk.pack().map_err(|e| e.to_string()));
        if let Err(e) = packed {
            if let Ok(mut slot) = self.pack_error.lock() {
                slot.get_or_insert(e);
            }
            return;
        }
        if let Ok(tx) = self.tx.lock() {
            if let Some(tx) = tx.as_ref() {
                let _ = tx.send(b);
            }
        }
    }
}

pub struct OverlappedReducer {
    // Declared first: the hooks go before the state they point into.
    hooks: GradHooks,
    shared: Arc<Shared>,
}

impl OverlappedReducer {
    /// Buckets of about `bucket_bytes` over the parameters that require grad (one float kind,
    /// one device), laid out as `GradBuckets::new` lays them out, and a grad hook on each.
    pub fn new(params: &[Tensor], bucket_bytes: usize) -> Result<Self> {
        let mut bucket_of = vec![None; params.len()];
        let mut buckets = Vec::new();
        for (b, bucket) in Bucket::layout(params, bucket_bytes, OP)?
            .into_iter()
            .enumerate()
        {
            for m in &bucket.members {
                bucket_of[m.index] = Some(b);
            }
            buckets.push(Mutex::new(Staged {
                bucket,
                packed: false,
            }));
        }
        let remaining = (0..buckets.len()).map(|_| AtomicUsize::new(0)).collect();
        let shared = Arc::new(Shared {
            buckets,
            bucket_of,
            remaining,
            active: AtomicBool::new(false),
            fired: AtomicUsize::new(0),
            tx: Mutex::new(None),
            pack_error: Mutex::new(None),
        });
        let s = shared.clone();
        let hooks =
            GradHooks::new(params, move |i| s.on_grad(i)).map_err(|e| invalid(e.to_string()))?;
        Ok(Self { hooks, shared })
    }

    /// Elements per bucket, in all-reduce order (as `GradBuckets::bucket_sizes`).
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.shared
            .buckets
            .iter()
            .map(|b| b.lock().map(|b| b.bucket.flat.numel()).unwrap_or(0))
            .collect()
    }

    /// Parameter indices with a hook.
    pub fn hooked(&self) -> Vec<usize> {
        self.hooks.hooked()
    }

    /// `loss.backward()` with every bucket's grads summed over `coll` as soon as they are
    /// final. Grads must be zero (or absent) before, as for the plain path. Every bucket is
    /// reduced even when backward fails, so peers are not left waiting.
    pub fn backward(&mut self, loss: &Tensor, coll: &mut dyn Collective) -> Result<OverlapStats> {
        let sh: &Shared = &self.shared;
        for (b, r) in sh.remaining.iter().enumerate() {
            let mut bk = sh.lock(b)?;
            bk.packed = false;
            r.store(bk.bucket.members.len(), Ordering::Release);
        }
        sh.fired.store(0, Ordering::Relaxed);
        let (tx, rx) = channel::<usize>();
        *sh.tx
            .lock()
            .map_err(|_| invalid("tx lock poisoned".into()))? = Some(tx.clone());
        let n = sh.buckets.len();
        let t0 = Instant::now();
        let mut stats = OverlapStats::default();
        let (backward, comm) = std::thread::scope(|scope| {
            let comm = scope.spawn(|| {
                let mut ready = vec![false; n];
                let mut order = Vec::new();
                let (mut next, mut busy) = (0, 0.0);
                let mut err: Option<CollectiveError> = None;
                for b in rx {
                    order.push(b);
                    ready[b] = true;
                    while next < n && ready[next] {
                        if err.is_none() {
                            crate::fault::point("allreduce");
                            let t = Instant::now();
                            let r = sh.lock(next).and_then(|mut bk| {
                                coll.all_reduce_sum(&mut bk.bucket.flat)?;
                                bk.bucket.unpack_defined().map(|_| ())
                            });
                            busy += t.elapsed().as_secs_f64();
                            err = r.err();
                        }
                        next += 1;
                    }
                }
                if err.is_none() && next < n {
                    err = Some(invalid(format!("only {next} of {n} buckets became ready")));
                }
                (err, order, busy, t0.elapsed().as_secs_f64())
            });
            sh.active.store(true, Ordering::Release);
            let r = loss.f_backward();
            sh.active.store(false, Ordering::Release);
            let backward_s = t0.elapsed().as_secs_f64();
            // Buckets some member of which got no grad: pack (zeros) and send them now.
            let mut flushed = Vec::new();
            for b in 0..n {
                if sh.remaining[b].load(Ordering::Acquire) > 0 {
                    if let Ok(mut bk) = sh.buckets[b].lock() {
                        if !bk.packed {
                            if let Err(e) = bk.pack() {
                                if let Ok(mut slot) = sh.pack_error.lock() {
                                    slot.get_or_insert(e.to_string());
                                }
                            }
                        }
                    }
                    flushed.push(b);
                    let _ = tx.send(b);
                }
            }
            drop(tx);
            if let Ok(mut slot) = sh.tx.lock() {
                *slot = None;
            }
            let comm = comm.join();
            ((r, backward_s, flushed), comm)
        });
        let (r, backward_s, flushed) = backward;
        let (err, order, comm_s, total_s) =
            comm.map_err(|_| invalid("communication thread panicked".into()))?;
        stats.fired = sh.fired.load(Ordering::Relaxed);
        stats.flushed = flushed.clone();
        stats.ready_during_backward = order.into_iter().filter(|b| !flushed.contains(b)).collect();
        stats.backward_s = backward_s;
        stats.comm_s = comm_s;
        stats.total_s = total_s;
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(e) = sh.pack_error.lock().ok().and_then(|mut s| s.take()) {
            return Err(invalid(format!("packing a bucket: {e}")));
        }
        r.map_err(tch_err)?;
        // Members that got no grad: autograd must create one (hooks are inactive now).
        for b in &flushed {
            sh.lock(*b)?.bucket.unpack_missing()?;
        }
        Ok(stats)
    }
}
