//! What a rank's exit means for its attempt, and whether a failed attempt is restarted (after
//! which backoff) or the job gives up.

use crate::message::RankExit;
use gantry_core::spec::FaultToleranceSpec;
use gantry_core::{Attempt, ExitCode};

/// The longest wait before a restart, however many came before.
pub const MAX_BACKOFF_MS: f64 = 60_000.0;

/// What one rank's exit does to its live attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitVerdict {
    /// The rank trained all its steps; the attempt succeeds once every rank has.
    Finished,
    /// The rank saved a checkpoint and stopped because a worker is draining: start again
    /// elsewhere at once, without using the restart budget.
    Drained { cause: String },
    /// The attempt failed. `blames_worker`: a rank killed by a signal, or orphaned by its
    /// daemon, says something about the worker it ran on; a peer's broken collective does not.
    Failed { cause: String, blames_worker: bool },
}

/// Judges the exit of a rank of the live attempt.
pub fn judge_exit(exit: &RankExit) -> ExitVerdict {
    let rank = exit.key.rank;
    if ExitCode::Finished.is(exit.exit_code) {
        ExitVerdict::Finished
    } else if ExitCode::Drained.is(exit.exit_code) {
        ExitVerdict::Drained {
            cause: if exit.message.is_empty() {
                format!("a worker is draining; rank {rank} checkpointed and stopped")
            } else {
                format!("a worker is draining; rank {rank}: {}", exit.message)
            },
        }
    } else {
        ExitVerdict::Failed {
            cause: format!("rank {rank} {}", describe_exit(exit)),
            blames_worker: exit.signal.is_some() || ExitCode::Orphaned.is(exit.exit_code),
        }
    }
}

/// Whether the exit of a rank of an attempt that already ended goes into the job's history,
/// and the line it gets there. An attempt ends on the first failure reported, often a peer
/// that saw a broken collective; the rank that really died may report after, and that is
/// worth keeping. `newest` is the job's newest attempt (`None`: the job is unknown); equal to
/// the exit's attempt when that attempt ended and the next waits out its backoff.
pub fn late_exit_line(exit: &RankExit, newest: Option<Attempt>) -> Option<String> {
    let failed_on_its_own = !exit.stopped
        && !ExitCode::Finished.is(exit.exit_code)
        && !ExitCode::Drained.is(exit.exit_code);
    (failed_on_its_own && newest.is_some_and(|a| a >= exit.key.attempt)).then(|| {
        format!(
            "attempt {}: rank {} {} (reported after the attempt ended)",
            exit.key.attempt,
            exit.key.rank,
            describe_exit(exit)
        )
    })
}

/// What follows a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterFailure {
    /// Start attempt number `restart` since the last manual resume, not before `not_before_ms`.
    Restart {
        restart: u32,
        max_restarts: u32,
        delay_ms: i64,
        not_before_ms: i64,
        reason: String,
    },
    /// The restart budget is spent: the job fails with `error`.
    GiveUp { error: String, reason: String },
}

/// Decides at `now_ms` what follows an attempt that failed with `cause`, after
/// `restarts_since_resume` automatic restarts. The backoff starts at `restart_backoff_secs` and
/// doubles with each further restart, up to [`MAX_BACKOFF_MS`].
pub fn after_failure(
    now_ms: i64,
    cause: &str,
    restarts_since_resume: u32,
    ft: &FaultToleranceSpec,
) -> AfterFailure {
    if restarts_since_resume >= ft.max_restarts {
        return AfterFailure::GiveUp {
            error: format!("{cause} (after {restarts_since_resume} restarts)"),
            reason: format!("all {} restarts used", ft.max_restarts),
        };
    }
    let doublings = restarts_since_resume.min(16);
    let base = ft.restart_backoff_secs * 1000.0;
    let delay_ms = (base * f64::from(1u32 << doublings)).min(MAX_BACKOFF_MS) as i64;
    let restart = restarts_since_resume + 1;
    AfterFailure::Restart {
        restart,
        max_restarts: ft.max_restarts,
        delay_ms,
        not_before_ms: now_ms + delay_ms,
        reason: format!(
            "restart {restart} of {} after a backoff of {delay_ms} ms",
            ft.max_restarts
        ),
    }
}

/// How a rank ended, for people: "was killed by signal 9", "exited with code 1: …".
pub fn describe_exit(exit: &RankExit) -> String {
    let how = match (exit.exit_code, exit.signal) {
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        (Some(code), None) => format!("exited with code {code}"),
        (None, None) => "exited".to_string(),
    };
    if exit.message.is_empty() {
        how
    } else {
        format!("{how}: {}", exit.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RankKey;
    use gantry_core::Rank;

    fn exit(code: Option<i32>, signal: Option<i32>, message: &str) -> RankExit {
        RankExit {
            key: RankKey {
                job: "j".into(),
                attempt: Attempt(2),
                rank: Rank(3),
            },
            exit_code: code,
            signal,
            message: message.into(),
            stopped: false,
        }
    }

    fn ft(max_restarts: u32, restart_backoff_secs: f64) -> FaultToleranceSpec {
        FaultToleranceSpec {
            max_restarts,
            restart_backoff_secs,
            ..FaultToleranceSpec::default()
        }
    }

    #[test]
    fn exits_are_judged_by_their_code_and_signal() {
        assert_eq!(judge_exit(&exit(Some(0), None, "")), ExitVerdict::Finished);
        assert_eq!(
            judge_exit(&exit(Some(76), None, "")),
            ExitVerdict::Drained {
                cause: "a worker is draining; rank 3 checkpointed and stopped".into()
            }
        );
        assert_eq!(
            judge_exit(&exit(Some(76), None, "saved step 40")),
            ExitVerdict::Drained {
                cause: "a worker is draining; rank 3: saved step 40".into()
            }
        );
        assert_eq!(
            judge_exit(&exit(Some(1), None, "peer closed")),
            ExitVerdict::Failed {
                cause: "rank 3 exited with code 1: peer closed".into(),
                blames_worker: false
            },
            "a broken collective is not the worker's fault"
        );
        assert_eq!(
            judge_exit(&exit(None, Some(9), "")),
            ExitVerdict::Failed {
                cause: "rank 3 was killed by signal 9".into(),
                blames_worker: true
            }
        );
        assert_eq!(
            judge_exit(&exit(Some(70), None, "")),
            ExitVerdict::Failed {
                cause: "rank 3 exited with code 70".into(),
                blames_worker: true
            },
            "an orphaned rank lost its daemon"
        );
    }

    #[test]
    fn a_late_failure_is_kept_and_a_late_success_or_stop_is_not() {
        let failed = exit(Some(3), None, "");
        assert_eq!(
            late_exit_line(&failed, Some(Attempt(2))).as_deref(),
            Some("attempt 2: rank 3 exited with code 3 (reported after the attempt ended)"),
            "the attempt ended and the next waits out its backoff"
        );
        assert!(late_exit_line(&failed, Some(Attempt(5))).is_some());
        assert_eq!(
            late_exit_line(&failed, Some(Attempt(1))),
            None,
            "from the future"
        );
        assert_eq!(late_exit_line(&failed, None), None, "unknown job");
        assert_eq!(
            late_exit_line(&exit(Some(0), None, ""), Some(Attempt(2))),
            None
        );
        assert_eq!(
            late_exit_line(&exit(Some(76), None, ""), Some(Attempt(2))),
            None
        );
        let stopped = RankExit {
            stopped: true,
            ..exit(None, Some(15), "")
        };
        assert_eq!(
            late_exit_line(&stopped, Some(Attempt(2))),
            None,
            "stopped on our order"
        );
    }

    #[test]
    fn the_backoff_doubles_up_to_a_minute() {
        let delays: Vec<i64> = (0..9)
            .map(|n| match after_failure(1_000, "x", n, &ft(10, 1.0)) {
                AfterFailure::Restart {
                    delay_ms,
                    not_before_ms,
                    ..
                } => {
                    assert_eq!(not_before_ms, 1_000 + delay_ms);
                    delay_ms
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            delays,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000
            ]
        );
        assert_eq!(
            after_failure(0, "x", 1_000, &ft(u32::MAX, 1.0)),
            AfterFailure::Restart {
                restart: 1_001,
                max_restarts: u32::MAX,
                delay_ms: 60_000,
                not_before_ms: 60_000,
                reason: format!("restart 1001 of {} after a backoff of 60000 ms", u32::MAX),
            },
            "many restarts do not overflow the doubling"
        );
    }

    #[test]
    fn the_restart_budget_is_counted_since_the_last_resume() {
        assert_eq!(
            after_failure(500, "rank 0 exited with code 1", 1, &ft(2, 0.0)),
            AfterFailure::Restart {
                restart: 2,
                max_restarts: 2,
                delay_ms: 0,
                not_before_ms: 500,
                reason: "restart 2 of 2 after a backoff of 0 ms".into(),
            }
        );
        assert_eq!(
            after_failure(500, "rank 0 exited with code 1", 2, &ft(2, 0.0)),
            AfterFailure::GiveUp {
                error: "rank 0 exited with code 1 (after 2 restarts)".into(),
                reason: "all 2 restarts used".into(),
            }
        );
        assert!(matches!(
            after_failure(0, "x", 0, &ft(0, 1.0)),
            AfterFailure::GiveUp { .. }
        ));
    }
}
