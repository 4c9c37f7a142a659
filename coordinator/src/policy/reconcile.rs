//! What to do with the ranks a reconnecting worker reports running: it may have missed stops
//! (its attempt ended while it was away), missed assignments (sent while its stream was down),
//! or lost ranks (it restarted). The coordinator's record of live attempts is the truth.

use crate::message::RankKey;
use crate::state::{Job, JobState};
use gantry_core::{Attempt, JobId, Rank, WorkerId};
use std::collections::BTreeMap;

/// One decision about one rank (or one attempt) on the reconnected worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The worker runs a rank of an attempt that is not live: stop the job's ranks below
    /// `below_attempt` there.
    Stop {
        job: JobId,
        below_attempt: Attempt,
        reason: &'static str,
    },
    /// A rank of a scheduled attempt never started there: send its assignment again.
    Resend {
        job: JobId,
        rank: Rank,
        reason: &'static str,
    },
    /// A rank of a running attempt is gone: the attempt cannot go on.
    FailAttempt { job: JobId, cause: String },
    /// The rank runs as it should.
    Continue { key: RankKey },
}

/// Decides what to do about `worker`, which reports running `running`, given every job.
/// Stops come first, then one decision per rank the worker should be running, in job order.
/// An attempt is failed once, for its first missing rank.
pub fn reconcile(
    worker: &WorkerId,
    running: &[RankKey],
    jobs: &BTreeMap<JobId, Job>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for key in running {
        let job = jobs.get(&key.job);
        let live = job.is_some_and(|j| j.attempt == key.attempt && j.state.placement().is_some());
        if !live {
            // Stop everything of this job below its live attempt, and at least this one.
            let below = job
                .filter(|j| !j.state.is_terminal())
                .map_or(Attempt(u64::MAX), |j| j.attempt);
            actions.push(Action::Stop {
                job: key.job.clone(),
                below_attempt: below.max(key.attempt.next()),
                reason: "stale attempt",
            });
        }
    }
    for job in jobs.values() {
        let Some(placement) = job.state.placement() else {
            continue;
        };
        let expected = placement
            .iter()
            .enumerate()
            .filter(|(_, w)| *w == worker)
            .map(|(rank, _)| Rank(rank as u32))
            .filter(|rank| !job.finished_ranks.contains(rank));
        for rank in expected {
            let key = RankKey {
                job: job.id.clone(),
                attempt: job.attempt,
                rank,
            };
            if running.contains(&key) {
                actions.push(Action::Continue { key });
            } else if matches!(job.state, JobState::Running { .. }) {
                actions.push(Action::FailAttempt {
                    job: job.id.clone(),
                    cause: format!("rank {rank} is no longer running on worker {worker}"),
                });
                break;
            } else {
                actions.push(Action::Resend {
                    job: job.id.clone(),
                    rank,
                    reason: "its assignment never started",
                });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::JobSpec;

    fn job(id: &str, attempt: u64, state: JobState) -> Job {
        let spec = JobSpec::from_json(
            r#"{"name":"j","model":{"kind":"mlp"},"train":{"steps":1,"global_batch":2,"lr":0.1}}"#,
        )
        .unwrap();
        Job {
            attempt: Attempt(attempt),
            state,
            ..Job::new(JobId(id.into()), spec, 0)
        }
    }

    fn key(job: &str, attempt: u64, rank: u32) -> RankKey {
        RankKey {
            job: JobId(job.into()),
            attempt: Attempt(attempt),
            rank: Rank(rank),
        }
    }

    fn on(workers: &[&str]) -> Vec<WorkerId> {
        workers.iter().map(|w| WorkerId(w.to_string())).collect()
    }

    fn jobs(list: Vec<Job>) -> BTreeMap<JobId, Job> {
        list.into_iter().map(|j| (j.id.clone(), j)).collect()
    }

    #[test]
    fn a_worker_whose_ranks_all_run_continues() {
        let w = WorkerId("a".into());
        let jobs = jobs(vec![job(
            "j",
            2,
            JobState::Running {
                placement: on(&["a", "b", "a"]),
                gpus: vec![],
            },
        )]);
        let actions = reconcile(&w, &[key("j", 2, 0), key("j", 2, 2)], &jobs);
        assert_eq!(
            actions,
            [
                Action::Continue {
                    key: key("j", 2, 0)
                },
                Action::Continue {
                    key: key("j", 2, 2)
                }
            ]
        );
    }

    #[test]
    fn stale_ranks_are_stopped_below_the_live_attempt() {
        let w = WorkerId("a".into());
        let jobs = jobs(vec![
            job(
                "live",
                3,
                JobState::Running {
                    placement: on(&["b"]),
                    gpus: vec![],
                },
            ),
            job(
                "waiting",
                3,
                JobState::Restarting {
                    cause: "x".into(),
                    reason: None,
                },
            ),
            job("ended", 2, JobState::Cancelled),
        ]);
        let running = [
            key("live", 1, 0),
            key("waiting", 3, 0),
            key("ended", 2, 0),
            key("gone", 4, 0),
        ];
        assert_eq!(
            reconcile(&w, &running, &jobs),
            [
                Action::Stop {
                    job: JobId("live".into()),
                    below_attempt: Attempt(3),
                    reason: "stale attempt"
                },
                // The attempt ended and the next is not placed yet: at least this one goes.
                Action::Stop {
                    job: JobId("waiting".into()),
                    below_attempt: Attempt(4),
                    reason: "stale attempt"
                },
                Action::Stop {
                    job: JobId("ended".into()),
                    below_attempt: Attempt(u64::MAX),
                    reason: "stale attempt"
                },
                Action::Stop {
                    job: JobId("gone".into()),
                    below_attempt: Attempt(u64::MAX),
                    reason: "stale attempt"
                },
            ]
        );
    }

    #[test]
    fn an_unstarted_rank_of_a_scheduled_attempt_is_resent() {
        let w = WorkerId("a".into());
        let mut scheduled = job(
            "j",
            1,
            JobState::Scheduled {
                placement: on(&["a", "a", "a"]),
                gpus: vec![],
            },
        );
        scheduled.finished_ranks = vec![Rank(2)];
        let actions = reconcile(&w, &[key("j", 1, 1)], &jobs(vec![scheduled]));
        assert_eq!(
            actions,
            [
                Action::Resend {
                    job: JobId("j".into()),
                    rank: Rank(0),
                    reason: "its assignment never started"
                },
                Action::Continue {
                    key: key("j", 1, 1)
                },
            ],
            "rank 2 finished, so it is not expected"
        );
    }

    #[test]
    fn a_vanished_rank_of_a_running_attempt_fails_it_once() {
        let w = WorkerId("a".into());
        let jobs = jobs(vec![
            job(
                "j",
                1,
                JobState::Running {
                    placement: on(&["a", "a"]),
                    gpus: vec![],
                },
            ),
            job(
                "k",
                1,
                JobState::Running {
                    placement: on(&["b"]),
                    gpus: vec![],
                },
            ),
        ]);
        assert_eq!(
            reconcile(&w, &[], &jobs),
            [Action::FailAttempt {
                job: JobId("j".into()),
                cause: "rank 0 is no longer running on worker a".into()
            }],
            "one failure for the attempt, none for a job elsewhere"
        );
    }
}
