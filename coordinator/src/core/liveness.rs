//! What the periodic tick checks: workers whose lease ran out, and attempts that hang
//! (`policy::hang` decides).

use super::Core;
use crate::error::CoordinatorError;
use crate::policy::hang::{self, Hang};
use crate::state::WorkerState;
use gantry_core::{JobId, WorkerId};

impl Core {
    /// Periodic work: expire leases, then place waiting jobs.
    pub fn tick(&mut self, now_ms: i64) -> Result<(), CoordinatorError> {
        let expired: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.lease_expired(now_ms))
            .map(|w| w.id.clone())
            .collect();
        for id in expired {
            let w = self.workers.get_mut(&id).expect("listed above");
            w.state = WorkerState::Lost { since_ms: now_ms };
            self.store.put_worker(w)?;
            self.sessions.remove(&id);
            tracing::warn!(worker = %id, "worker lease expired");
            let affected: Vec<JobId> = self
                .jobs
                .values()
                .filter(|j| j.state.placement().is_some_and(|p| p.contains(&id)))
                .map(|j| j.id.clone())
                .collect();
            self.record_worker_failure(&id, now_ms);
            for job in affected {
                self.fail_attempt(&job, format!("worker {id} lost (lease expired)"), now_ms)?;
            }
        }
        let hung: Vec<(JobId, String)> = self
            .jobs
            .values()
            .filter(|j| j.state.placement().is_some())
            .filter_map(|j| {
                let last_life = self.last_progress_ms.get(&j.id).copied();
                match hang::check(now_ms, last_life, j.spec.fault_tolerance.hang_timeout_secs) {
                    Hang::Hung { cause } => Some((j.id.clone(), cause)),
                    Hang::Alive { .. } | Hang::Unwatched { .. } => None,
                }
            })
            .collect();
        for (job, cause) in hung {
            self.last_progress_ms.remove(&job);
            self.fail_attempt(&job, cause, now_ms)?;
        }
        self.schedule(now_ms)
    }
}
