//! ferroclip's dataset shards: building them from raw image-text data, and reading them back.

pub mod build;
pub mod checkpoints;
pub mod cli;
pub mod error;
pub mod head;
pub mod jpeg;
pub mod manifest;
mod pq;
pub mod reader;
pub mod resume;
pub mod retry;
pub mod source;
pub mod store;
pub mod synth;
pub mod validate;
pub mod verify;
pub mod writer;

pub use error::ShardsError;
pub use manifest::*;
pub use reader::{Block, Classes, Dataset, Sample};
pub use store::{open_url, StoreArgs, StoreOptions};
