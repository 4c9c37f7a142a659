//! The control flags that ride each training step's all-reduces, so every rank of a job learns
//! them in the same step without a message of their own: a SIGTERM seen (drain), and the
//! state of this rank's background checkpoint upload.
//!
//! Each flag is 0 or 1 on a rank. The step adds them after the loss in its gradient buffer,
//! which is scaled and all-reduced over the data-parallel group, then unscaled and rounded
//! ([`Control::unscale`]), and then summed over the tensor- and pipeline-parallel groups
//! beside the gradient norm: so each ends as a count of the job's ranks that raised it.

use std::sync::atomic::{AtomicBool, Ordering};

/// One rank's flags for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    /// This rank was asked (SIGTERM) to checkpoint and stop.
    pub drain: bool,
    /// This rank's checkpoint upload has finished well.
    pub uploaded: bool,
    /// This rank's checkpoint upload has failed.
    pub upload_failed: bool,
}

/// The flags summed over every rank of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlSums {
    pub draining: u32,
    pub uploaded: u32,
    pub upload_failed: u32,
}

impl Control {
    /// How many slots the flags take in a buffer.
    pub const LEN: usize = 3;

    /// The flags as the values a rank adds to the all-reduce.
    pub fn encode(self) -> [f32; Self::LEN] {
        let one = |b: bool| if b { 1.0 } else { 0.0 };
        [one(self.drain), one(self.uploaded), one(self.upload_failed)]
    }

    /// Sums of the flags after an all-reduce that scaled every value by `scale`: whole counts.
    pub fn unscale(reduced: &[f32], scale: f32) -> [f32; Self::LEN] {
        let mut out = [0.0; Self::LEN];
        for (o, v) in out.iter_mut().zip(reduced) {
            *o = (v / scale).round();
        }
        out
    }

    /// The counts, from the flags summed over every group.
    pub fn decode(sums: &[f32]) -> ControlSums {
        ControlSums {
            draining: sums[0] as u32,
            uploaded: sums[1] as u32,
            upload_failed: sums[2] as u32,
        }
    }
}

static DRAIN: AtomicBool = AtomicBool::new(false);

/// Whether this rank was asked (SIGTERM) to checkpoint and stop at the next step.
pub fn drain_requested() -> bool {
    DRAIN.load(Ordering::SeqCst)
}

extern "C" fn on_sigterm(_: libc::c_int) {
    DRAIN.store(true, Ordering::SeqCst);
}

/// From now on, SIGTERM (from a draining worker) asks for a checkpoint and a clean stop at the
/// next step, instead of ending the process.
pub fn drain_on_sigterm() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// The error a rank ends with after a drain checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("checkpointed at step {0} and stopped: a worker is draining")]
pub struct Drained(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_survive_a_scaled_sum_as_counts() {
        let ranks = [
            Control {
                drain: true,
                uploaded: true,
                upload_failed: false,
            },
            Control {
                drain: false,
                uploaded: true,
                upload_failed: true,
            },
            Control::default(),
        ];
        // Scaled by 1/(micro · dp) as the step scales its buffer, then summed.
        let scale = 1.0 / 12.0f32;
        let mut reduced = [0.0f32; Control::LEN];
        for r in ranks {
            for (slot, v) in reduced.iter_mut().zip(r.encode()) {
                *slot += v * scale;
            }
        }
        let sums = Control::decode(&Control::unscale(&reduced, scale));
        assert_eq!(
            sums,
            ControlSums {
                draining: 1,
                uploaded: 2,
                upload_failed: 1
            }
        );
    }
}
