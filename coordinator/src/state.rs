//! Jobs and workers as the coordinator keeps them. States are enums whose variants carry that
//! state's data; a transition is a method, so an impossible one cannot be written.
//!
//! ```text
//!            schedule                 all ranks rendezvoused
//!  Pending ───────────▶ Scheduled ───────────────────────────▶ Running ──all ranks exit 0──▶ Succeeded
//!     ▲                     │  ▲                                  │
//!     │ resume              │  └──────── schedule ─────┐          │ rank exit / worker lost
//!     │                     ▼                          │          ▼
//!  Failed | Cancelled ◀── attempt ends, no restarts ── Restarting ◀┘ (restarts left)
//! ```

use gantry_core::{Attempt, JobId, JobSpec, WorkerId};
use serde::{Deserialize, Serialize};

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
    },
    Running {
        placement: Vec<WorkerId>,
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
            JobState::Scheduled { placement } | JobState::Running { placement } => Some(placement),
            _ => None,
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
    pub last_checkpoint: Option<CheckpointRecord>,
    /// Checkpoint step the attempts of a manual `resume --from-step` start from; cleared when an
    /// attempt fails, so automatic restarts take the newest checkpoint.
    pub resume_step: Option<u64>,
    /// Ranks of the live attempt that exited successfully.
    pub finished_ranks: Vec<u32>,
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
            attempt: 0,
            restarts: 0,
            restarts_since_resume: 0,
            step: 0,
            loss: None,
            eval_loss: None,
            test_loss: None,
            test_accuracy: None,
            last_checkpoint: None,
            resume_step: None,
            finished_ranks: Vec::new(),
            not_before_ms: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        }
    }

    /// Starts the next attempt on `placement`.
    pub fn to_scheduled(&mut self, placement: Vec<WorkerId>) {
        debug_assert!(self.state.wants_slots());
        self.attempt += 1;
        self.finished_ranks.clear();
        self.state = JobState::Scheduled { placement };
    }

    pub fn to_running(&mut self) {
        if let JobState::Scheduled { placement } = &self.state {
            self.state = JobState::Running {
                placement: placement.clone(),
            };
        }
    }

    /// The live attempt ended with an error: restart if the budget allows (after the backoff
    /// of this many restarts), otherwise fail. Returns whether the job will restart.
    pub fn end_attempt_with_error(&mut self, cause: String, now_ms: i64) -> bool {
        if self.restarts_since_resume < self.spec.fault_tolerance.max_restarts {
            self.restarts += 1;
            self.restarts_since_resume += 1;
            let base = self.spec.fault_tolerance.restart_backoff_secs * 1000.0;
            let doublings = self.restarts_since_resume.saturating_sub(1).min(16);
            let delay = (base * f64::from(1u32 << doublings)).min(60_000.0);
            self.not_before_ms = now_ms + delay as i64;
            // A restart resumes from the newest checkpoint, not a pinned one.
            self.resume_step = None;
            self.state = JobState::Restarting {
                cause,
                reason: None,
            };
            true
        } else {
            self.state = JobState::Failed {
                error: format!("{cause} (after {} restarts)", self.restarts_since_resume),
            };
            false
        }
    }

    /// The live attempt ended because a worker it ran on is shutting down (its ranks saved a
    /// checkpoint first): start again at once, without using the restart budget.
    pub fn requeue(&mut self, cause: String) {
        self.resume_step = None;
        self.state = JobState::Restarting {
            cause,
            reason: None,
        };
    }

    pub fn to_succeeded(&mut self) {
        self.state = JobState::Succeeded;
    }

    pub fn to_cancelled(&mut self) {
        self.state = JobState::Cancelled;
    }

    /// A manual resume of a failed or cancelled job.
    pub fn to_resumed(&mut self, from_step: Option<u64>) {
        debug_assert!(matches!(
            self.state,
            JobState::Failed { .. } | JobState::Cancelled
        ));
        self.restarts_since_resume = 0;
        self.resume_step = from_step;
        self.state = JobState::Pending { reason: None };
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub hostname: String,
    pub slots: u32,
    pub devices: Vec<String>,
    /// 0 when the worker did not say.
    #[serde(default)]
    pub memory_bytes: u64,
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
