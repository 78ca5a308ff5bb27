//! ferroclip's dataset shards: reading them (always: stores, retries, the manifest, block reads,
//! the checkpoint layout, JPEG decoding) and, with the `build` feature (the default), building
//! them from raw image-text data and the `ferroclip shards` CLI.

#[cfg(feature = "build")]
pub mod build;
pub mod checkpoints;
#[cfg(feature = "build")]
pub mod cli;
pub mod error;
#[cfg(feature = "build")]
pub mod head;
pub mod jpeg;
pub mod manifest;
mod page_headers;
mod pq;
pub mod reader;
#[cfg(feature = "build")]
pub mod resume;
pub mod retry;
#[cfg(feature = "build")]
pub mod source;
pub mod store;
#[cfg(feature = "build")]
pub mod synth;
#[cfg(feature = "build")]
pub mod validate;
#[cfg(feature = "build")]
pub mod verify;
#[cfg(feature = "build")]
pub mod writer;

pub use error::ShardsError;
pub use manifest::*;
pub use reader::{Block, Classes, Dataset, Label, Sample};
pub use store::{open_url, StoreArgs, StoreOptions};
