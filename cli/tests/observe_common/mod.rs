//! What the observe tests read a run through.

pub mod dashboard;
pub mod otlp;
pub mod prometheus;
pub mod tensorboard;
