//! Memory admission: a job whose ranks cannot fit a worker slot is refused at submit and
//! resume, with the knobs that would make it fit, rather than left pending forever.

use super::Core;
use crate::error::CoordinatorError;
use gantry_core::JobSpec;

impl Core {
    /// Refuses a job whose ranks cannot fit the memory of a slot on the live workers that said
    /// how much they have (the smallest such slot; no information, no refusal).
    pub(super) fn check_memory(&self, spec: &JobSpec) -> Result<(), CoordinatorError> {
        let per_slot = self
            .workers
            .values()
            .filter(|w| w.is_alive() && w.memory_bytes > 0)
            .map(|w| w.memory_bytes / u64::from(w.slots))
            .min();
        let need = spec.memory_per_rank();
        match per_slot {
            Some(have) if need > have => {
                Err(CoordinatorError::InvalidSpec(gantry_core::SpecError::new(
                    "resources",
                    format!(
                        "each rank needs about {:.1} GiB but a worker slot has {:.1} GiB; lower \
                     train.global_batch or raise train.micro_batches, set \
                     train.activation_checkpointing = true, or raise parallel.tp or \
                     parallel.pp",
                        need as f64 / f64::from(1u32 << 30),
                        have as f64 / f64::from(1u32 << 30)
                    ),
                )))
            }
            _ => Ok(()),
        }
    }
}
