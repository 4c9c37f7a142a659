//! Everything that runs inside a rank process: the rank entry point, the step loop, gradients,
//! the control flags of each step, stages and pipeline schedules, the burn models, data,
//! resharding and export. A rank process is this crate behind a binary entry point
//! ([`rank::run`]); collectives come from `gantry-collective` through its `World` trait and
//! checkpoints from `gantry-checkpoint`.

pub mod bert;
pub mod control;
pub mod corpus;
pub mod data;
pub mod device;
pub mod export;
pub mod finetune;
pub mod gradients;
pub mod hf;
pub mod job;
pub mod layout;
pub mod llama;
pub mod model;
pub mod precision;
pub mod pretrained;
pub mod rank;
pub mod records;
pub mod report;
pub mod reshard;
pub mod restore;
pub mod stage;
pub mod train;
pub mod upload;
pub mod world;

/// burn's random initialisation draws from one process-wide generator, so a test that seeds it
/// and compares two initialisations fails whenever another test initialises a model meanwhile:
/// every test that initialises one holds this.
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
