//! Safe wrapper over csrc/optim.cpp: libtorch's fused AdamW kernel (`_fused_adamw_`), one pass
//! over each parameter instead of the eight tensor ops of the unfused update, and dropping a
//! gradient (tch only zero-fills them).

use std::ffi::{c_char, c_void, CStr};

use tch::Tensor;

extern "C" {
    fn ferroclip_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        exp_avgs: *mut *mut c_void,
        exp_avg_sqs: *mut *mut c_void,
        n: i64,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn ferroclip_clear_grad(tensor: *mut c_void) -> i32;
}

/// Drops `p`'s gradient (set to None, as torch's `zero_grad(set_to_none=True)`); the next
/// backward gives it a fresh one instead of zero-filling and adding. False if libtorch refused.
pub fn clear_grad(p: &Tensor) -> bool {
    // SAFETY: p is a live tch tensor (a torch::Tensor*).
    unsafe { ferroclip_clear_grad(p.as_ptr() as *mut c_void) == 0 }
}

/// The tensors of one update: parameters, their grads and moments, in the same order.
pub struct Group<'a> {
    pub params: Vec<&'a Tensor>,
    pub grads: Vec<Tensor>,
    pub exp_avgs: Vec<&'a Tensor>,
    pub exp_avg_sqs: Vec<&'a Tensor>,
}

pub struct Hyper {
    /// Updates including this one (bias correction).
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

fn ptrs<T: std::borrow::Borrow<Tensor>>(v: &[T]) -> Vec<*mut c_void> {
    v.iter()
        .map(|t| t.borrow().as_ptr() as *mut c_void)
        .collect()
}

/// One fused AdamW update of `g`, in place. Errors carry libtorch's message (e.g. a dtype the
/// kernel does not take).
pub fn adamw(g: &Group<'_>, h: &Hyper) -> Result<(), String> {
    let n = g.params.len();
    if g.grads.len() != n || g.exp_avgs.len() != n || g.exp_avg_sqs.len() != n {
        return Err("fused AdamW: lists of different lengths".into());
    }
    let (mut p, mut gr, mut m, mut v) = (
        ptrs(&g.params),
        ptrs(&g.grads),
        ptrs(&g.exp_avgs),
        ptrs(&g.exp_avg_sqs),
    );
    let mut err = [0 as c_char; 512];
    // SAFETY: every pointer is a live tch tensor (a torch::Tensor*) borrowed for this call;
    // err is a writable buffer of the given length.
    let r = unsafe {
        ferroclip_fused_adamw(
            p.as_mut_ptr(),
            gr.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            n as i64,
            h.step as f64,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        // SAFETY: the shim wrote a NUL-terminated message into err.
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }
}
