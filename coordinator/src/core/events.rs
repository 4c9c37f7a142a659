//! The event log: every change to a job is stored, then cached, then published to watchers;
//! the coordinator's own lines go into the job's history next to its ranks' logs.

use super::Core;
use crate::error::CoordinatorError;
use crate::message::Update;
use crate::state::{Job, TransitionError};
use crate::store::{EventRow, Progress};
use gantry_core::{Attempt, JobId};

impl Core {
    /// Applies `change` to a job, stores it, and tells watchers; returns whether it applied.
    /// A transition the state diagram lacks changes nothing: the callers ask for one only
    /// when the job's state allows it, so it is logged as the bug it would be, not raised.
    pub(super) fn update_job(
        &mut self,
        id: &JobId,
        now_ms: i64,
        change: impl FnOnce(&mut Job) -> Result<(), TransitionError>,
    ) -> Result<bool, CoordinatorError> {
        let mut job = self.jobs[id].clone();
        if let Err(refused) = change(&mut job) {
            tracing::warn!(job = %id, error = %refused, "transition refused; job left as it was");
            return Ok(false);
        }
        job.updated_at_ms = now_ms;
        self.store.put_job(&job)?;
        let _ = self.updates.send(Update::Job(Box::new(job.clone())));
        self.jobs.insert(id.clone(), job);
        Ok(true)
    }

    /// Records a step of the job's progress: the store's narrow write (no document, no spec),
    /// then the cache, then watchers.
    pub(super) fn record_progress(
        &mut self,
        id: &JobId,
        now_ms: i64,
        step: u64,
        loss: f64,
        eval_loss: Option<f64>,
    ) -> Result<(), CoordinatorError> {
        let job = &self.jobs[id];
        let progress = Progress {
            step,
            loss: Some(loss),
            eval_loss: eval_loss.or(job.eval_loss),
            updated_at_ms: now_ms,
        };
        self.store.put_progress(id, &progress)?;
        let job = self.jobs.get_mut(id).expect("indexed above");
        progress.apply(job);
        let _ = self.updates.send(Update::Job(Box::new(job.clone())));
        Ok(())
    }

    /// A coordinator line in the job's history (`gantry logs`).
    pub(super) fn note(
        &mut self,
        id: &JobId,
        now_ms: i64,
        line: &str,
    ) -> Result<(), CoordinatorError> {
        let attempt = self.jobs[id].attempt;
        tracing::info!(job = %id, %attempt, "{line}");
        let seq = self
            .store
            .append_event(id, now_ms, attempt, -1, "event", line)?;
        self.publish_line(id, seq, attempt, -1, "event", line, now_ms);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish_line(
        &self,
        id: &JobId,
        seq: u64,
        attempt: Attempt,
        rank: i32,
        stream: &str,
        line: &str,
        now_ms: i64,
    ) {
        let _ = self.updates.send(Update::Line(EventRow {
            seq,
            job_id: id.clone(),
            at_ms: now_ms,
            attempt,
            rank,
            stream: stream.to_string(),
            line: line.to_string(),
        }));
    }
}
