//! How attempts end: a rank's exit, a failure (restart or give up), a drained worker, and
//! stopping an ended attempt's ranks everywhere.

use super::{Core, FLAKY_FAILURES, FLAKY_WINDOW_MS, RankExit};
use crate::error::CoordinatorError;
use crate::state::Job;
use gantry_core::{ExitCode, JobId, WorkerId};
use gantry_proto::v1 as pb;

impl Core {
    pub(super) fn on_rank_exit(
        &mut self,
        exit: RankExit,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let key = &exit.key;
        if !self.is_live(key) {
            // An attempt ends on the first failure reported, often a peer that saw a broken
            // collective; the rank that really died may report after. Keep that in the history.
            let failed_on_its_own = !exit.stopped
                && !ExitCode::Finished.is(exit.exit_code)
                && !ExitCode::Drained.is(exit.exit_code);
            if failed_on_its_own
                && self
                    .jobs
                    .get(&key.job)
                    // `==`: the attempt ended and the next waits out its backoff.
                    .is_some_and(|j| j.attempt >= key.attempt)
            {
                let line = format!(
                    "attempt {}: rank {} {} (reported after the attempt ended)",
                    key.attempt,
                    key.rank,
                    describe_exit(&exit)
                );
                self.note(&key.job, now_ms, &line)?;
            }
            return Ok(());
        }
        if ExitCode::Finished.is(exit.exit_code) {
            let world = self.jobs[&key.job].spec.parallel.world_size() as usize;
            self.update_job(&key.job, now_ms, |job| {
                if !job.finished_ranks.contains(&key.rank) {
                    job.finished_ranks.push(key.rank);
                }
            })?;
            if self.jobs[&key.job].finished_ranks.len() == world {
                self.store
                    .end_attempt(&key.job, key.attempt, "succeeded", now_ms)?;
                self.rendezvous.remove(&(key.job.clone(), key.attempt));
                self.update_job(&key.job, now_ms, Job::to_succeeded)?;
                self.note(&key.job, now_ms, "job succeeded")?;
            }
            return Ok(());
        }
        let job = &self.jobs[&key.job];
        let host = job
            .state
            .placement()
            .and_then(|p| p.get(key.rank as usize))
            .cloned();
        if ExitCode::Drained.is(exit.exit_code) {
            let cause = if exit.message.is_empty() {
                format!(
                    "a worker is draining; rank {} checkpointed and stopped",
                    key.rank
                )
            } else {
                format!("a worker is draining; rank {}: {}", key.rank, exit.message)
            };
            let attempt = job.attempt;
            self.end_live_attempt(&key.job, &format!("drained: {cause}"), now_ms)?;
            self.update_job(&key.job, now_ms, |job| job.requeue(cause.clone()))?;
            return self.note(
                &key.job,
                now_ms,
                &format!(
                    "attempt {attempt} ended: {cause}; restarting elsewhere from that checkpoint"
                ),
            );
        }
        // A rank killed by a signal, or orphaned by its daemon, says something about its worker;
        // a peer's broken collective does not.
        if let Some(host) = host
            && (exit.signal.is_some() || ExitCode::Orphaned.is(exit.exit_code))
        {
            self.record_worker_failure(&host, now_ms);
        }
        let cause = format!("rank {} {}", key.rank, describe_exit(&exit));
        self.fail_attempt(&key.job, cause, now_ms)
    }

    pub(super) fn record_worker_failure(&mut self, worker: &WorkerId, now_ms: i64) {
        let failures = self.worker_failures.entry(worker.clone()).or_default();
        failures.retain(|t| now_ms - t < FLAKY_WINDOW_MS);
        failures.push(now_ms);
        if failures.len() == FLAKY_FAILURES {
            tracing::warn!(worker = %worker, "worker failed {FLAKY_FAILURES} times recently; avoiding it where possible");
        }
    }

    /// Whether recent failures of its own make `worker` a last resort for placement.
    pub(super) fn is_flaky(&self, worker: &WorkerId, now_ms: i64) -> bool {
        self.worker_failures.get(worker).is_some_and(|f| {
            f.iter().filter(|t| now_ms - **t < FLAKY_WINDOW_MS).count() >= FLAKY_FAILURES
        })
    }

    /// Ends the live attempt because of `cause`; restarts the job if its budget allows.
    pub(super) fn fail_attempt(
        &mut self,
        id: &JobId,
        cause: String,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let attempt = self.jobs[id].attempt;
        self.end_live_attempt(id, &format!("failed: {cause}"), now_ms)?;
        let mut restarting = false;
        self.update_job(id, now_ms, |job| {
            restarting = job.end_attempt_with_error(cause.clone(), now_ms)
        })?;
        let job = &self.jobs[id];
        let line = if restarting {
            format!(
                "attempt {attempt} failed: {cause}; restarting from the latest checkpoint ({}/{})",
                job.restarts_since_resume, job.spec.fault_tolerance.max_restarts
            )
        } else {
            format!("attempt {attempt} failed: {cause}; no restarts left, job failed")
        };
        self.note(id, now_ms, &line)
    }

    /// Records the end of the live attempt (if any) and stops its ranks everywhere.
    pub(super) fn end_live_attempt(
        &mut self,
        id: &JobId,
        outcome: &str,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let job = &self.jobs[id];
        let Some(placement) = job.state.placement() else {
            return Ok(());
        };
        let attempt = job.attempt;
        let mut hosts: Vec<WorkerId> = placement.to_vec();
        hosts.sort();
        hosts.dedup();
        self.store.end_attempt(id, attempt, outcome, now_ms)?;
        self.rendezvous.remove(&(id.clone(), attempt));
        for host in hosts {
            self.send(
                &host,
                pb::coordinator_message::Body::Stop(pb::StopRanks {
                    job_id: id.0.clone(),
                    below_attempt: attempt + 1,
                    reason: outcome.to_string(),
                }),
            );
        }
        Ok(())
    }
}

/// How a rank ended, for people: "was killed by signal 9", "exited with code 1: …".
pub(super) fn describe_exit(exit: &RankExit) -> String {
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
