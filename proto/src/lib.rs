//! The wire protocol between coordinator and workers, and the run configuration they share.

pub mod config;
pub mod metrics;
pub mod ports;
pub mod stagger;
pub mod tls;
pub mod token;

/// Generated from `proto/ferroclip/v1/coordinator.proto`.
pub mod v1 {
    tonic::include_proto!("ferroclip.v1");
}

/// gRPC metadata key that carries the run token.
pub const AUTH_HEADER: &str = "authorization";

/// gRPC metadata key that carries a member's session secret (issued by Join).
pub const SESSION_HEADER: &str = "x-ferroclip-session";
