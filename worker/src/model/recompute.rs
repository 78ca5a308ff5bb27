//! Activation checkpointing (`model.grad_checkpointing`): a block's forward keeps only its input
//! and the backward recomputes the block, through csrc/checkpoint.cpp's autograd Function (tch
//! has none). The blocks draw no random numbers (no dropout; masks are drawn outside them), so
//! the recomputation is the forward's exact function.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::Tensor;

use super::transformer::{Attend, Block};

type RawForward = extern "C" fn(*mut c_void, *mut c_void, i32, *mut c_char, usize) -> *mut c_void;
type RawDrop = extern "C" fn(*mut c_void);

extern "C" {
    fn ferroclip_checkpoint(
        x: *mut c_void,
        params: *const *mut c_void,
        n_params: i64,
        fwd: RawForward,
        drop: RawDrop,
        ctx: *mut c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// What the backward needs to run the block again: owned handles (sharing the parameters'
/// storage and autograd identity), since the graph may outlive the caller's borrows.
struct Recompute {
    block: Block,
    mask: Option<Tensor>,
    causal: bool,
}

impl Recompute {
    fn attend(&self) -> Attend<'_> {
        match (&self.mask, self.causal) {
            (Some(m), _) => Attend::Mask(m),
            (None, true) => Attend::Causal,
            (None, false) => Attend::All,
        }
    }
}

fn write_err(err: *mut c_char, len: usize, msg: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: err is the shim's writable buffer of `len` bytes; n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr() as *const c_char, err, n);
        *err.add(n) = 0;
    }
}

static RECOMPUTED: AtomicU64 = AtomicU64::new(0);

/// Blocks run again in a backward since the process started: what tests and benchmarks read to
/// see that checkpointing is on.
pub fn recomputed_blocks() -> u64 {
    RECOMPUTED.load(Ordering::Relaxed)
}

extern "C" fn forward(
    ctx: *mut c_void,
    x: *mut c_void,
    recompute: i32,
    err: *mut c_char,
    len: usize,
) -> *mut c_void {
    if recompute != 0 {
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: ctx is the Box<Recompute> the shim holds until its last autograd node is freed;
    // x is a new torch::Tensor* whose ownership the shim hands over.
    let (r, x) = unsafe { (&*(ctx as *const Recompute), Tensor::from_ptr(x as *mut _)) };
    // A panic (a failing tch op) must not unwind into C++: it becomes the shim's exception.
    match catch_unwind(AssertUnwindSafe(|| r.block.forward(&x, r.attend()))) {
        Ok(y) => {
            // The shim takes the torch::Tensor* and frees it.
            let y = std::mem::ManuallyDrop::new(y);
            y.as_ptr() as *mut c_void
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("the block's forward panicked");
            write_err(err, len, msg);
            std::ptr::null_mut()
        }
    }
}

extern "C" fn drop_ctx(ctx: *mut c_void) {
    // SAFETY: ctx came from Box::into_raw in `checkpointed`; the shim drops it exactly once.
    drop(unsafe { Box::from_raw(ctx as *mut Recompute) });
}

/// `block.forward(x, attend)` with its activations recomputed in backward. Without grad mode
/// or with nothing requiring grad it is the plain forward.
///
/// Panics when libtorch fails, as the plain forward's tch ops do.
pub(super) fn checkpointed(block: &Block, x: &Tensor, attend: Attend) -> Tensor {
    let (mask, causal) = match attend {
        Attend::All => (None, false),
        Attend::Causal => (None, true),
        Attend::Mask(m) => (Some(m.shallow_clone()), false),
    };
    let params: Vec<*mut c_void> = block
        .params()
        .into_iter()
        .filter(|p| p.requires_grad())
        .map(|p| p.as_ptr() as *mut c_void)
        .collect();
    let ctx = Box::into_raw(Box::new(Recompute {
        block: block.shallow_clone(),
        mask,
        causal,
    }));
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    // SAFETY: x and the parameters are live tch tensors (torch::Tensor*), borrowed for the
    // call; ctx's ownership passes to the shim; out and err are writable.
    let rc = unsafe {
        ferroclip_checkpoint(
            x.as_ptr() as *mut c_void,
            params.as_ptr(),
            params.len() as i64,
            forward,
            drop_ctx,
            ctx as *mut c_void,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        // SAFETY: the shim wrote a NUL-terminated message (snprintf).
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        panic!("activation checkpointing: {}", msg.to_string_lossy());
    }
    // SAFETY: out is a new torch::Tensor* that we now own.
    unsafe { Tensor::from_ptr(out as *mut _) }
}
