//! Memory admission: a job whose ranks cannot fit a worker slot (or, for a cuda job, any GPU)
//! is refused at submit and resume, with the knobs that would make it fit, rather than left
//! pending forever.

use super::Core;
use crate::error::CoordinatorError;
use gantry_core::JobSpec;
use gantry_core::spec::DeviceKind;

impl Core {
    /// Refuses a job whose ranks cannot fit the memory of a slot on the live workers that said
    /// how much they have (the smallest such slot; no information, no refusal). A cuda rank
    /// lives in its GPU's memory instead, and placement puts it only on a GPU that holds it, so
    /// a cuda job is refused only when no GPU that said its size is big enough: smaller GPUs
    /// may sit beside bigger ones, and the job waits for those.
    pub(super) fn check_memory(&self, spec: &JobSpec) -> Result<(), CoordinatorError> {
        let live = self.workers.values().filter(|w| w.is_alive());
        let (have, what) = match spec.resources.device {
            DeviceKind::Cpu => (
                live.filter(|w| w.memory_bytes > 0)
                    .map(|w| w.memory_bytes / u64::from(w.slots))
                    .min(),
                "a worker slot",
            ),
            DeviceKind::Cuda => (
                live.flat_map(|w| &w.gpus)
                    .map(|g| g.memory_bytes)
                    .filter(|m| *m > 0)
                    .max(),
                "the largest GPU",
            ),
        };
        let need = spec.memory_per_rank();
        match have {
            Some(have) if need > have => {
                Err(CoordinatorError::InvalidSpec(gantry_core::SpecError::new(
                    "resources",
                    format!(
                        "each rank needs about {:.1} GiB but {what} has {:.1} GiB; lower \
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
