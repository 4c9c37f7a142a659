//! Plain data shared by every Gantry component.

pub mod defaults;
pub mod ids;
pub mod mesh;
pub mod rank;
pub mod spec;
pub mod store_options;

pub use ids::{Attempt, JobId, Rank, WorkerId};
pub use mesh::{Coords, Mesh};
pub use rank::{EVENT_PREFIX, ExitCode, RankAssignment, RankEvent};
pub use spec::{
    CHECKPOINT_SCHEMES, CHECKPOINT_SCHEMES_HINT, JobSpec, ModelKind, PipelineSchedule, Precision,
    SpecError,
};

/// Reads a daemon's config file (TOML, YAML or JSON, by extension) into `T`, whose
/// `deny_unknown_fields` makes an unknown key an error naming it; no file gives `T::default()`.
pub fn read_config_file<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T, String> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    config::Config::builder()
        .add_source(config::File::from(path))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| format!("{}: {e}", path.display()))
}
