//! Blocks → decoded, augmented, tokenised batches.
//!
//! `tokenizer` (CLIP BPE / HF tokenizer.json) and `image` (decode, crop, normalise) are pure
//! functions of their input; `loader` fetches blocks from a shards `Dataset`, keeps them in a
//! bounded cache, and turns a list of sample references into a [`Batch`] on a thread pool.

pub mod image;
pub mod loader;
pub mod pipeline;
pub mod tokenizer;

use tch::{Device, Tensor};

pub use image::{
    sample_seed, ImageError, ImageTransform, Interpolation, ResizeMode, CLIP_MEAN, CLIP_STD,
};
pub use loader::{Loader, LoaderError, LoaderOptions};
pub use tokenizer::{Tokenizer, TokenizerError};

/// One training/eval batch, rows in the order they were asked for.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, S, S]` f32, CLIP mean/std normalised.
    pub images: Tensor,
    /// `[B, context_length]` i64, zero-padded.
    pub tokens: Tensor,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    pub labels: Vec<Option<ferroclip_shards::Label>>,
    /// Each row's image id, where the dataset groups several captions per image.
    pub image_ids: Vec<Option<i64>>,
}

/// One use of a sample: (epoch, block, row), the plan's own type.
pub use ferroclip_plan::SampleRef;

impl Batch {
    /// The batch on `device`. On a GPU the host tensors are pinned and copied without blocking,
    /// so the copy queues behind the GPU work already issued instead of stalling the host.
    pub fn to_device(self, device: Device) -> Result<Batch, tch::TchError> {
        if device == Device::Cpu {
            return Ok(self);
        }
        let copy = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            t.f_pin_memory(device)?
                .f_to_device_(device, t.kind(), true, false)
        };
        Ok(Batch {
            images: copy(&self.images)?,
            tokens: copy(&self.tokens)?,
            ..self
        })
    }
}
