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
pub use mesh::{Coords, Mesh};
pub use metrics::ClassMetrics;
pub use rank::{EVENT_PREFIX, ExitCode, RankAssignment, RankEvent};
pub use secret::AttemptSecret;
pub use spec::{
    CHECKPOINT_SCHEMES, CHECKPOINT_SCHEMES_HINT, JobSpec, ModelKind, PipelineSchedule, Precision,
    SpecError, Task,
};
