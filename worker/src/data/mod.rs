//! Blocks → decoded, augmented, tokenised batches (in progress).
