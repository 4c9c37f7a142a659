//! Jobs and workers as the coordinator keeps them. States are enums whose variants carry that
//! state's data; a transition is a method, so an impossible one cannot be written.
//!
//! ```text
//!            schedule                 all ranks rendezvoused
//!  Pending ───────────▶ Scheduled ───────────────────────────▶ Running ──all ranks exit 0──▶ Succeeded
//!     ▲                     │  ▲                                  │
//!     │ resume              │  └──────── schedule ─────┐          │ rank exit / worker lost
//!     │                     ▼                          │          ▼
//!  Failed | Cancelled ◀── attempt ends, no restarts ── Restarting ◀┘ (restarts left, or drained)
//! ```
//!
//! Any job that has not ended can be cancelled. A transition the diagram lacks returns a
//! [`TransitionError`] and leaves the job unchanged.

use gantry_core::{Attempt, JobId, JobSpec, Rank, WorkerId};
use serde::{Deserialize, Serialize};

/// A transition the state diagram does not have; the job is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {from} job cannot become {to}")]
pub struct TransitionError {
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum JobState {
    /// Waiting for slots.
    Pending {
        reason: Option<String>,
    },
    /// An attempt ended; waiting for slots to start the next one.
    Restarting {
        cause: String,
        reason: Option<String>,
    },
    /// Assignments sent; ranks are starting and meeting at the rendezvous.
    Scheduled {
        placement: Vec<WorkerId>,
        /// Each rank's GPU on its worker, by rank; empty for a cpu job (and in jobs stored
        /// before GPUs were scheduled).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<u32>,
    },
    Running {
        placement: Vec<WorkerId>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<u32>,
    },
    Succeeded,
    Failed {
        error: String,
    },
    Cancelled,
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Pending { .. } => "Pending",
            JobState::Restarting { .. } => "Restarting",
            JobState::Scheduled { .. } => "Scheduled",
            JobState::Running { .. } => "Running",
            JobState::Succeeded => "Succeeded",
            JobState::Failed { .. } => "Failed",
            JobState::Cancelled => "Cancelled",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled
        )
    }

    /// The workers of the live attempt, indexed by rank.
    pub fn placement(&self) -> Option<&[WorkerId]> {
        match self {
            JobState::Scheduled { placement, .. } | JobState::Running { placement, .. } => {
                Some(placement)
            }
            _ => None,
        }
    }

    /// The GPU index of each rank of the live attempt on its worker, by rank; empty when the
    /// job is not placed or runs on the cpu.
    pub fn gpus(&self) -> &[u32] {
        match self {
            JobState::Scheduled { gpus, .. } | JobState::Running { gpus, .. } => gpus,
            _ => &[],
        }
    }

    /// Waiting for placement (first start or restart).
    pub fn wants_slots(&self) -> bool {
        matches!(self, JobState::Pending { .. } | JobState::Restarting { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// The live or last attempt; 0 before the first start.
    pub attempt: Attempt,
    /// Automatic restarts over the job's life.
    pub restarts: u32,
    /// Automatic restarts since the last manual resume; bounded by `max_restarts`.
    pub restarts_since_resume: u32,
    pub step: u64,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    /// The final evaluation on the test split.
    #[serde(default)]
    pub test_loss: Option<f64>,
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    /// A classifier's metrics at its latest validation, and on the test split.
    #[serde(default)]
    pub eval_metrics: Option<gantry_core::ClassMetrics>,
    #[serde(default)]
    pub test_metrics: Option<gantry_core::ClassMetrics>,
    pub last_checkpoint: Option<CheckpointRecord>,
    /// The name of the token that submitted it (empty for jobs from before tokens).
    #[serde(default)]
    pub submitted_by: String,
    /// Checkpoint step the attempts of a manual `resume --from-step` start from; cleared when an
    /// attempt fails, so automatic restarts take the newest checkpoint.
    pub resume_step: Option<u64>,
    /// Ranks of the live attempt that exited successfully.
    pub finished_ranks: Vec<Rank>,
    /// A restarting job is not placed before this time (restart backoff).
    #[serde(default)]
    pub not_before_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub url: String,
    pub attempt: Attempt,
    pub size_bytes: u64,
    pub committed_at_ms: i64,
}

impl Job {
    pub fn new(id: JobId, spec: JobSpec, now_ms: i64) -> Self {
        Self {
            id,
            spec,
            state: JobState::Pending { reason: None },
            attempt: Attempt(0),
            restarts: 0,
            restarts_since_resume: 0,
            step: 0,
            loss: None,
            eval_loss: None,
            test_loss: None,
            test_accuracy: None,
            eval_metrics: None,
            test_metrics: None,
            last_checkpoint: None,
            submitted_by: String::new(),
            resume_step: None,
            finished_ranks: Vec::new(),
            not_before_ms: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        }
    }

    /// Starts the next attempt on `placement`, the ranks of a cuda job on `gpus` (by rank;
    /// empty for a cpu job).
    pub fn to_scheduled(
        &mut self,
        placement: Vec<WorkerId>,
        gpus: Vec<u32>,
    ) -> Result<(), TransitionError> {
        self.guard("Scheduled", self.state.wants_slots())?;
        self.attempt = self.attempt.next();
        self.finished_ranks.clear();
        self.state = JobState::Scheduled { placement, gpus };
        Ok(())
    }

    /// Every rank of the live attempt met at the rendezvous (or reported a step).
    pub fn to_running(&mut self) -> Result<(), TransitionError> {
        let JobState::Scheduled { placement, gpus } = &mut self.state else {
            return Err(self.refuse("Running"));
        };
        let (placement, gpus) = (std::mem::take(placement), std::mem::take(gpus));
        self.state = JobState::Running { placement, gpus };
        Ok(())
    }

    /// The live attempt failed and the job will start again, not before `not_before_ms`
    /// (the restart backoff). This uses one restart of the budget.
    pub fn to_restarting(
        &mut self,
        cause: String,
        not_before_ms: i64,
    ) -> Result<(), TransitionError> {
        self.guard("Restarting", self.state.placement().is_some())?;
        self.restarts += 1;
        self.restarts_since_resume += 1;
        self.not_before_ms = not_before_ms;
        // A restart resumes from the newest checkpoint, not a pinned one.
        self.resume_step = None;
        self.state = JobState::Restarting {
            cause,
            reason: None,
        };
        Ok(())
    }

    /// The live attempt failed and no restarts are left.
    pub fn to_failed(&mut self, error: String) -> Result<(), TransitionError> {
        self.guard("Failed", self.state.placement().is_some())?;
        self.state = JobState::Failed { error };
        Ok(())
    }

    /// The live attempt ended because a worker it ran on is shutting down (its ranks saved a
    /// checkpoint first): start again at once, without using the restart budget.
    pub fn requeue(&mut self, cause: String) -> Result<(), TransitionError> {
        self.guard("Restarting", self.state.placement().is_some())?;
        self.resume_step = None;
        self.state = JobState::Restarting {
            cause,
            reason: None,
        };
        Ok(())
    }

    /// Every rank of the live attempt exited successfully.
    pub fn to_succeeded(&mut self) -> Result<(), TransitionError> {
        self.guard("Succeeded", self.state.placement().is_some())?;
        self.state = JobState::Succeeded;
        Ok(())
    }

    pub fn to_cancelled(&mut self) -> Result<(), TransitionError> {
        self.guard("Cancelled", !self.state.is_terminal())?;
        self.state = JobState::Cancelled;
        Ok(())
    }

    /// A manual resume of a failed or cancelled job.
    pub fn to_resumed(&mut self, from_step: Option<u64>) -> Result<(), TransitionError> {
        self.guard(
            "Pending",
            matches!(self.state, JobState::Failed { .. } | JobState::Cancelled),
        )?;
        self.restarts_since_resume = 0;
        self.resume_step = from_step;
        self.state = JobState::Pending { reason: None };
        Ok(())
    }

    fn guard(&self, to: &'static str, allowed: bool) -> Result<(), TransitionError> {
        if allowed {
            Ok(())
        } else {
            Err(self.refuse(to))
        }
    }

    fn refuse(&self, to: &'static str) -> TransitionError {
        TransitionError {
            from: self.state.name(),
            to,
        }
    }

    pub fn set_waiting_reason(&mut self, why: Option<String>) -> bool {
        match &mut self.state {
            JobState::Pending { reason, .. } | JobState::Restarting { reason, .. } => {
                let changed = *reason != why;
                *reason = why;
                changed
            }
            _ => false,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match &self.state {
            JobState::Failed { error } => Some(error),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum WorkerState {
    Alive { lease_expires_at_ms: i64 },
    Lost { since_ms: i64 },
}

/// One CUDA GPU of a worker, as it reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// The CUDA device index on that worker, which assignments name.
    pub index: u32,
    pub name: String,
    /// 0 when the worker did not say (a GPU declared in its config).
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub hostname: String,
    pub slots: u32,
    pub devices: Vec<String>,
    /// 0 when the worker did not say.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Empty for a worker without GPUs, or one stored before GPUs were reported.
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    pub state: WorkerState,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
}

impl Worker {
    pub fn is_alive(&self) -> bool {
        matches!(self.state, WorkerState::Alive { .. })
    }

    pub fn renew_lease(&mut self, now_ms: i64, ttl_ms: i64) {
        self.last_seen_ms = now_ms;
        self.state = WorkerState::Alive {
            lease_expires_at_ms: now_ms + ttl_ms,
        };
    }

    /// Pure lease decision: has this worker's lease run out at `now_ms`?
    pub fn lease_expired(&self, now_ms: i64) -> bool {
        matches!(self.state, WorkerState::Alive { lease_expires_at_ms } if now_ms >= lease_expires_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_in(state: &JobState) -> Job {
        let spec = JobSpec::from_json(
            r#"{"name":"j","model":{"kind":"mlp"},"train":{"steps":1,"global_batch":2,"lr":0.1}}"#,
        )
        .unwrap();
        Job {
            state: state.clone(),
            attempt: Attempt(3),
            ..Job::new(JobId("j".into()), spec, 0)
        }
    }

    fn states() -> Vec<JobState> {
        let placement = vec![WorkerId("w".into())];
        vec![
            JobState::Pending { reason: None },
            JobState::Restarting {
                cause: "c".into(),
                reason: None,
            },
            JobState::Scheduled {
                placement: placement.clone(),
                gpus: vec![],
            },
            JobState::Running {
                placement,
                gpus: vec![0],
            },
            JobState::Succeeded,
            JobState::Failed { error: "e".into() },
            JobState::Cancelled,
        ]
    }

    type Transition = fn(&mut Job) -> Result<(), TransitionError>;

    /// Every transition, the state it leads to, and the states it may start from.
    fn transitions() -> Vec<(Transition, &'static str, &'static [&'static str])> {
        const WAITING: &[&str] = &["Pending", "Restarting"];
        const SCHEDULED: &[&str] = &["Scheduled"];
        const LIVE: &[&str] = &["Scheduled", "Running"];
        const NOT_ENDED: &[&str] = &["Pending", "Restarting", "Scheduled", "Running"];
        const ENDED_BADLY: &[&str] = &["Failed", "Cancelled"];
        let scheduled: Transition = |j| j.to_scheduled(vec![WorkerId("w".into())], vec![]);
        let running: Transition = |j| j.to_running();
        let restarting: Transition = |j| j.to_restarting("c".into(), 5);
        let failed: Transition = |j| j.to_failed("e".into());
        let requeued: Transition = |j| j.requeue("c".into());
        let succeeded: Transition = |j| j.to_succeeded();
        let cancelled: Transition = |j| j.to_cancelled();
        let resumed: Transition = |j| j.to_resumed(None);
        vec![
            (scheduled, "Scheduled", WAITING),
            (running, "Running", SCHEDULED),
            (restarting, "Restarting", LIVE),
            (failed, "Failed", LIVE),
            (requeued, "Restarting", LIVE),
            (succeeded, "Succeeded", LIVE),
            (cancelled, "Cancelled", NOT_ENDED),
            (resumed, "Pending", ENDED_BADLY),
        ]
    }

    #[test]
    fn every_transition_runs_only_from_the_states_that_allow_it() {
        for (transition, to, from) in transitions() {
            for state in states() {
                let before = job_in(&state);
                let mut job = before.clone();
                let outcome = transition(&mut job);
                if from.contains(&state.name()) {
                    assert_eq!(outcome, Ok(()), "{} -> {to}", state.name());
                    assert_eq!(job.state.name(), to);
                } else {
                    assert_eq!(
                        outcome,
                        Err(TransitionError {
                            from: state.name(),
                            to
                        }),
                        "{} -> {to} must be refused",
                        state.name()
                    );
                    assert_eq!(job, before, "a refused transition changes nothing");
                }
            }
        }
    }

    #[test]
    fn a_refused_transition_says_what_was_asked() {
        let mut job = job_in(&JobState::Succeeded);
        assert_eq!(
            job.to_cancelled().unwrap_err().to_string(),
            "a Succeeded job cannot become Cancelled"
        );
    }

    #[test]
    fn transitions_keep_the_attempt_bookkeeping() {
        let mut job = job_in(&JobState::Restarting {
            cause: "c".into(),
            reason: None,
        });
        job.finished_ranks = vec![Rank(0)];
        job.to_scheduled(vec![WorkerId("w".into())], vec![])
            .unwrap();
        assert_eq!((job.attempt, job.finished_ranks.len()), (Attempt(4), 0));
        job.resume_step = Some(7);
        job.to_restarting("c".into(), 1_500).unwrap();
        assert_eq!(
            (
                job.restarts,
                job.restarts_since_resume,
                job.not_before_ms,
                job.resume_step
            ),
            (1, 1, 1_500, None),
            "a restart uses the budget and takes the newest checkpoint"
        );
        job.to_scheduled(vec![WorkerId("w".into())], vec![])
            .unwrap();
        job.requeue("drained".into()).unwrap();
        assert_eq!(job.restarts, 1, "a drained attempt costs no restart");
        job.to_scheduled(vec![WorkerId("w".into())], vec![])
            .unwrap();
        job.to_failed("e".into()).unwrap();
        job.to_resumed(Some(3)).unwrap();
        assert_eq!((job.restarts_since_resume, job.resume_step), (0, Some(3)));
    }
}
