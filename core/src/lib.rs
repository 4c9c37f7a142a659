//! Plain data shared by every Gantry component.

pub mod ids;
pub mod mesh;
pub mod spec;

pub use ids::{Attempt, JobId, Rank, WorkerId};
pub use mesh::{Coords, Mesh};
pub use spec::{JobSpec, ModelKind, SpecError};
