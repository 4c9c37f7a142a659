//! How attempts end: a rank's exit, a failure (restart or give up, as `policy::restart`
//! decides), a drained worker, and stopping an ended attempt's ranks everywhere.

use super::{Core, RankExit, RankKey, WorkerCommand};
use crate::error::CoordinatorError;
use crate::policy::avoid::FLAKY_FAILURES;
use crate::policy::restart::{self, AfterFailure, ExitVerdict};
use crate::state::Job;
use gantry_core::{JobId, WorkerId};

impl Core {
    pub(super) fn on_rank_exit(
        &mut self,
        exit: RankExit,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let key = &exit.key;
        if !self.is_live(key) {
            let newest = self.jobs.get(&key.job).map(|j| j.attempt);
            if let Some(line) = restart::late_exit_line(&exit, newest) {
                self.note(&key.job, now_ms, &line)?;
            }
            return Ok(());
        }
        match restart::judge_exit(&exit) {
            ExitVerdict::Finished => self.finish_rank(key, now_ms),
            ExitVerdict::Drained { cause } => self.requeue_drained(&key.job, cause, now_ms),
            ExitVerdict::Failed {
                cause,
                blames_worker,
            } => {
                let host = self.jobs[&key.job]
                    .state
                    .placement()
                    .and_then(|p| p.get(key.rank.index()))
                    .cloned();
                if let Some(host) = host.filter(|_| blames_worker) {
                    self.record_worker_failure(&host, now_ms);
                }
                self.fail_attempt(&key.job, cause, now_ms)
            }
        }
    }

    /// A rank of the live attempt trained all its steps; the job succeeds with the last one.
    fn finish_rank(&mut self, key: &RankKey, now_ms: i64) -> Result<(), CoordinatorError> {
        let world = self.jobs[&key.job].spec.parallel.world_size() as usize;
        self.update_job(&key.job, now_ms, |job| {
            if !job.finished_ranks.contains(&key.rank) {
                job.finished_ranks.push(key.rank);
            }
            Ok(())
        })?;
        if self.jobs[&key.job].finished_ranks.len() == world {
            self.store
                .end_attempt(&key.job, key.attempt, "succeeded", now_ms)?;
            self.rendezvous.remove(&(key.job.clone(), key.attempt));
            if self.update_job(&key.job, now_ms, Job::to_succeeded)? {
                self.note(&key.job, now_ms, "job succeeded")?;
            }
        }
        Ok(())
    }

    /// The live attempt checkpointed and stopped because a worker is draining: it starts
    /// again elsewhere at once, at no cost to the restart budget.
    fn requeue_drained(
        &mut self,
        id: &JobId,
        cause: String,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let attempt = self.jobs[id].attempt;
        self.end_live_attempt(id, &format!("drained: {cause}"), now_ms)?;
        if !self.update_job(id, now_ms, |job| job.requeue(cause.clone()))? {
            return Ok(());
        }
        self.note(
            id,
            now_ms,
            &format!("attempt {attempt} ended: {cause}; restarting elsewhere from that checkpoint"),
        )
    }

    pub(super) fn record_worker_failure(&mut self, worker: &WorkerId, now_ms: i64) {
        if self.worker_failures.record(worker, now_ms) {
            tracing::warn!(worker = %worker, failures = FLAKY_FAILURES, "worker failed repeatedly; avoiding it where possible");
        }
    }

    /// Ends the live attempt because of `cause`; restarts the job if its budget allows.
    pub(super) fn fail_attempt(
        &mut self,
        id: &JobId,
        cause: String,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let job = &self.jobs[id];
        let attempt = job.attempt;
        let decision = restart::after_failure(
            now_ms,
            &cause,
            job.restarts_since_resume,
            &job.spec.fault_tolerance,
        );
        self.end_live_attempt(id, &format!("failed: {cause}"), now_ms)?;
        let (applied, line, reason) = match decision {
            AfterFailure::Restart {
                restart,
                max_restarts,
                not_before_ms,
                reason,
                ..
            } => (
                self.update_job(id, now_ms, |job| {
                    job.to_restarting(cause.clone(), not_before_ms)
                })?,
                format!(
                    "attempt {attempt} failed: {cause}; restarting from the latest checkpoint ({restart}/{max_restarts})"
                ),
                reason,
            ),
            AfterFailure::GiveUp { error, reason } => (
                self.update_job(id, now_ms, |job| job.to_failed(error))?,
                format!("attempt {attempt} failed: {cause}; no restarts left, job failed"),
                reason,
            ),
        };
        if !applied {
            return Ok(());
        }
        tracing::debug!(job = %id, %attempt, %reason, "decided after a failed attempt");
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
                WorkerCommand::Stop {
                    job: id.clone(),
                    below_attempt: attempt.next(),
                    reason: outcome.to_string(),
                },
            );
        }
        Ok(())
    }
}
