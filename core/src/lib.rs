//! Plain data shared by every Gantry component.

pub mod defaults;
pub mod ids;
pub mod mesh;
pub mod metrics;
pub mod rank;
pub mod secret;
pub mod spec;
pub mod store_options;

pub use ids::{Attempt, JobId, Rank, WorkerId};

/// Bytes in lower-case hex (digests, secrets, tokens).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
pub use mesh::{Coords, Mesh};
pub use metrics::ClassMetrics;
pub use rank::{EVENT_PREFIX, ExitCode, RankAssignment, RankEvent};
pub use secret::AttemptSecret;
pub use spec::{
    CHECKPOINT_SCHEMES, CHECKPOINT_SCHEMES_HINT, JobSpec, ModelKind, PipelineSchedule, Precision,
    SpecError, Task,
};
