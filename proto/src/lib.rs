//! The gantry.v1 wire contract, generated at build time, plus the protocol version that every
//! worker and rank message carries.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// Bumped on any change a peer of another version could misread. Workers and ranks send it on
/// every message; the coordinator refuses a mismatch with FAILED_PRECONDITION.
pub const PROTOCOL_VERSION: u32 = 1;

/// The core's classifier metrics on the wire and back: the worker sends what its ranks report,
/// the coordinator keeps and serves them.
impl From<gantry_core::ClassMetrics> for v1::ClassMetrics {
    fn from(m: gantry_core::ClassMetrics) -> Self {
        Self {
            accuracy: m.accuracy,
            precision: m.precision,
            recall: m.recall,
            f1: m.f1,
            samples: m.samples,
        }
    }
}

impl From<v1::ClassMetrics> for gantry_core::ClassMetrics {
    fn from(m: v1::ClassMetrics) -> Self {
        Self {
            accuracy: m.accuracy,
            precision: m.precision,
            recall: m.recall,
            f1: m.f1,
            samples: m.samples,
        }
    }
}
