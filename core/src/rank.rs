//! The contract between a worker daemon and the rank processes it runs: what a rank is handed
//! (its assignment), what it reports back (events on stdout), and what its exit code means.
//! The coordinator reads the same exit codes, so they are written here once.

use crate::{Attempt, AttemptSecret, ClassMetrics, JobId, Rank};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the worker daemon hands a rank process (written to a file it passes by path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankAssignment {
    pub coordinator: String,
    /// The address other ranks reach this one on.
    pub advertise_host: String,
    pub job_id: JobId,
    pub attempt: Attempt,
    pub rank: Rank,
    pub world_size: u32,
    pub spec_json: String,
    pub resume_step: Option<u64>,
    /// What proves this rank is one of its attempt's, at rendezvous and to its peers.
    #[serde(default)]
    pub attempt_secret: AttemptSecret,
    /// The coordinator's CA certificate (PEM), for an `https://` coordinator.
    #[serde(default)]
    pub coordinator_ca: Option<String>,
    /// The worker's checkpoint store options (`object_store` in its config file).
    #[serde(default)]
    pub store_options: BTreeMap<String, String>,
    /// Whether the rank logs JSON lines (as its daemon does) rather than text.
    #[serde(default)]
    pub log_json: bool,
}

/// Why a rank process ended, as its exit code. Anything not listed is a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ExitCode {
    /// The rank trained all its steps.
    Finished = 0,
    /// The rank failed; its stderr says why.
    Failed = 1,
    /// The rank's worker daemon went away (EOF on its stdin), so it stopped.
    Orphaned = 70,
    /// The rank's attempt was superseded before it started (rendezvous answered ABORTED).
    Stale = 75,
    /// The rank saved a checkpoint and stopped because a worker of its attempt is draining
    /// (SIGTERM): the coordinator restarts the job elsewhere without using its restart budget.
    Drained = 76,
}

impl ExitCode {
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The known meaning of a process exit code, if it has one.
    pub fn from_code(code: i32) -> Option<Self> {
        [
            Self::Finished,
            Self::Failed,
            Self::Orphaned,
            Self::Stale,
            Self::Drained,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// Whether a process exit code (`None` when a signal ended it) means `self`.
    pub fn is(self, code: Option<i32>) -> bool {
        code == Some(self.code())
    }
}

/// The prefix of a rank's stdout line that carries a JSON [`RankEvent`]; other lines are logs.
pub const EVENT_PREFIX: &str = "@gantry ";

/// What a rank reports to its daemon, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankEvent {
    Progress {
        step: u64,
        loss: f64,
        eval_loss: Option<f64>,
        samples_per_sec: f64,
        /// Wall time of the step.
        #[serde(default)]
        step_seconds: f64,
        /// Bus bandwidth of the step's gradient all-reduce (GB/s), where there is one.
        #[serde(default)]
        allreduce_gbps: Option<f64>,
        /// A classifier's metrics on the validation split, at the steps it is evaluated.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eval_metrics: Option<ClassMetrics>,
    },
    Test {
        loss: f64,
        accuracy: Option<f64>,
        /// A classifier's metrics on the test split.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metrics: Option<ClassMetrics>,
    },
    Checkpoint {
        step: u64,
        url: String,
        size_bytes: u64,
        /// Older checkpoints retention deleted after this commit.
        #[serde(default)]
        deleted_steps: Vec<u64>,
        /// From the start of this rank's save to the commit.
        #[serde(default)]
        seconds: f64,
    },
}

impl RankEvent {
    /// Parses a stdout line; `None` for an ordinary log line.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.strip_prefix(EVENT_PREFIX)?).ok()
    }

    /// The stdout line that carries this event.
    pub fn to_line(&self) -> String {
        let json = serde_json::to_string(self).expect("events serialise");
        format!("{EVENT_PREFIX}{json}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_round_trip_and_unknown_codes_have_no_meaning() {
        for c in [
            ExitCode::Finished,
            ExitCode::Failed,
            ExitCode::Orphaned,
            ExitCode::Stale,
            ExitCode::Drained,
        ] {
            assert_eq!(ExitCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ExitCode::from_code(2), None);
        assert!(ExitCode::Drained.is(Some(76)));
        assert!(!ExitCode::Drained.is(None));
    }

    #[test]
    fn an_event_line_parses_back_and_a_log_line_is_not_an_event() {
        let e = RankEvent::Test {
            loss: 1.5,
            accuracy: None,
            metrics: Some(ClassMetrics {
                accuracy: 0.5,
                precision: 0.25,
                recall: 0.5,
                f1: 0.3,
                samples: 4,
            }),
        };
        assert_eq!(RankEvent::parse(&e.to_line()), Some(e));
        assert_eq!(RankEvent::parse("step 1/10 loss=2"), None);
    }
}
