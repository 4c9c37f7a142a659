//! The gantry.v1 wire contract, generated at build time, plus the protocol version that every
//! worker and rank message carries.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// Bumped on any change a peer of another version could misread. Workers and ranks send it on
/// every message; the coordinator refuses a mismatch with FAILED_PRECONDITION.
pub const PROTOCOL_VERSION: u32 = 1;
