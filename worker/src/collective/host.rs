//! Borrowing a CPU tensor's memory as a slice, with the checks that make it sound.

use tch::{Device, Kind, Tensor};

use super::ring::invalid;
use super::Result;

/// A CPU f32 tensor's elements, checked.
pub(crate) fn f32_data<'t>(t: &'t mut Tensor, op: &'static str) -> Result<&'t mut [f32]> {
    check_cpu(t, op)?;
    let kind = t.f_kind().map_err(|e| invalid(op, e.to_string()))?;
    if kind != Kind::Float {
        return Err(invalid(op, format!("needs an f32 tensor, got {kind:?}")));
    }
    if !t.is_contiguous() {
        return Err(invalid(op, "needs a contiguous tensor"));
    }
    let n = t.numel();
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: a defined, contiguous CPU f32 tensor with n > 0 elements owns n f32s from
    // data_ptr (storage offset included); `&mut Tensor` keeps them ours for 't.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) })
}

/// A contiguous CPU tensor's bytes, checked.
pub(crate) fn tensor_bytes<'t>(t: &'t mut Tensor, op: &'static str) -> Result<&'t mut [u8]> {
    check_cpu(t, op)?;
    let kind = t.f_kind().map_err(|e| invalid(op, e.to_string()))?;
    if !t.is_contiguous() {
        return Err(invalid(op, "needs a contiguous tensor"));
    }
    let n = t.numel() * kind.elt_size_in_bytes();
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in f32_data, for n bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) })
}

pub(crate) fn check_cpu(t: &Tensor, op: &'static str) -> Result<()> {
    if !t.defined() {
        return Err(invalid(op, "the tensor is undefined"));
    }
    if t.device() != Device::Cpu {
        return Err(invalid(
            op,
            format!("the TCP ring needs CPU tensors, got {:?}", t.device()),
        ));
    }
    Ok(())
}

/// Identifies (dtype, trailing dims) so ranks gathering different row shapes fail loudly.
pub(crate) fn row_key(kind: Kind, rows_shape: &[i64]) -> u64 {
    // FNV-1a over the dtype code and the dims.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in std::iter::once(kind as i64).chain(rows_shape.iter().copied()) {
        for b in x.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
