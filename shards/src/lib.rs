//! ferroclip's dataset shards: building them from raw image-text data, and reading them back.

pub mod cli;
