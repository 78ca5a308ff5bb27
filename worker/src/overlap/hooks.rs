//! Safe wrapper over csrc/hooks.cpp: a callback with the parameter's index each time autograd
//! has finished accumulating that parameter's `.grad` in a backward pass.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

type RawCallback = extern "C" fn(*mut c_void, i64);

extern "C" {
    fn ferroclip_set_grad_hook(
        tensor: *mut c_void,
        cb: Option<RawCallback>,
        ctx: *mut c_void,
        index: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

#[derive(Debug, thiserror::Error)]
#[error("grad hook on parameter {index}: {message}")]
pub struct HookError {
    pub index: usize,
    pub message: String,
}

type Callback = Box<dyn Fn(usize) + Send + Sync>;

/// Hooks on a list of parameters; dropping it removes them. Parameters that do not require
/// grad get none. The callback runs on autograd's thread and must not block for long.
pub struct GradHooks {
    hooked: Vec<(usize, Tensor)>,
    ctx: *mut Callback,
}

// SAFETY: the tensors are only used to remove the hooks; the callback is Send + Sync.
unsafe impl Send for GradHooks {}

extern "C" fn trampoline(ctx: *mut c_void, index: i64) {
    // SAFETY: ctx is the Box<Callback> owned by a live GradHooks (hooks go before the box).
    let f = unsafe { &*(ctx as *const Callback) };
    // A panic must not unwind into C++.
    if catch_unwind(AssertUnwindSafe(|| f(index as usize))).is_err() {
        tracing::error!(index, "grad hook callback panicked");
    }
}

fn set(
    t: &Tensor,
    cb: Option<RawCallback>,
    ctx: *mut c_void,
    index: usize,
) -> Result<(), HookError> {
    let mut err = [0 as c_char; 512];
    // SAFETY: t is a live tch tensor (a torch::Tensor*); err is a writable buffer.
    let r = unsafe {
        ferroclip_set_grad_hook(
            t.as_ptr() as *mut c_void,
            cb,
            ctx,
            index as i64,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated message (snprintf).
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Err(HookError { index, message })
}

impl GradHooks {
    pub fn new(
        params: &[Tensor],
        f: impl Fn(usize) + Send + Sync + 'static,
    ) -> Result<Self, HookError> {
        let ctx: *mut Callback = Box::into_raw(Box::new(Box::new(f)));
        let mut me = GradHooks {
            hooked: Vec::new(),
            ctx,
        };
        for (i, p) in params.iter().enumerate() {
            if !p.defined() || !p.requires_grad() {
                continue;
            }
            set(p, Some(trampoline), ctx.cast(), i)?;
            me.hooked.push((i, p.shallow_clone()));
        }
        Ok(me)
    }

    /// Indices of the parameters that have a hook.
    pub fn hooked(&self) -> Vec<usize> {
        self.hooked.iter().map(|(i, _)| *i).collect()
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        let mut all_removed = true;
        for (i, p) in &self.hooked {
            if let Err(e) = set(p, None, std::ptr::null_mut(), *i) {
                tracing::error!(%e, "removing a grad hook");
                all_removed = false;
            }
        }
        // A hook left in place may still call in: then the callback is leaked, not freed.
        if all_removed {
            // SAFETY: created by Box::into_raw in new; no hook refers to it any more.
            drop(unsafe { Box::from_raw(self.ctx) });
        }
    }
}
