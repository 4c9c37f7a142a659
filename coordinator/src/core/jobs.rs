//! The job API: submit, cancel, resume, and what a client may read about a job.

use super::Core;
use crate::error::CoordinatorError;
use crate::state::{CheckpointRecord, Job, JobState};
use crate::store::{AttemptRow, EventRow};
use gantry_core::{JobId, JobSpec};

impl Core {
    pub fn submit(&mut self, spec_json: &str, now_ms: i64) -> Result<Job, CoordinatorError> {
        self.submit_as(spec_json, "", now_ms)
    }

    /// Submits a job on behalf of the token named `by`, which the job records.
    pub fn submit_as(
        &mut self,
        spec_json: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Job, CoordinatorError> {
        let mut spec = JobSpec::from_json(spec_json)?;
        self.check_stores(&spec)?;
        self.check_memory(&spec)?;
        if spec.checkpoint.url.is_empty() {
            spec.checkpoint.url = self.options.default_checkpoint_url.clone();
        }
        let id = loop {
            let id = JobId(format!(
                "{}-{:06x}",
                spec.name,
                rand::random::<u32>() & 0xff_ffff
            ));
            if !self.jobs.contains_key(&id) {
                break id;
            }
        };
        let mut job = Job::new(id.clone(), spec, now_ms);
        job.submitted_by = by.to_string();
        self.store.put_job(&job)?;
        self.order.push(id.clone());
        self.jobs.insert(id.clone(), job);
        self.note(&id, now_ms, &format!("job submitted{}", by_whom(by)))?;
        self.schedule(now_ms)?;
        Ok(self.jobs[&id].clone())
    }

    /// Refuses, by field, a spec that names a store or endpoint workers may not reach.
    fn check_stores(&self, spec: &JobSpec) -> Result<(), CoordinatorError> {
        crate::policy::stores::check(spec, &self.options.allowed_stores)
            .map_err(|r| CoordinatorError::InvalidArgument(r.to_string()))
    }

    pub fn job(&self, id: &JobId) -> Result<&Job, CoordinatorError> {
        self.jobs
            .get(id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))
    }

    pub fn jobs(&self) -> Vec<&Job> {
        self.order.iter().map(|id| &self.jobs[id]).collect()
    }

    pub fn cancel(&mut self, id: &JobId, now_ms: i64) -> Result<Job, CoordinatorError> {
        self.cancel_as(id, "", now_ms)
    }

    /// Cancels a job on behalf of the token named `by`, which its history records.
    pub fn cancel_as(
        &mut self,
        id: &JobId,
        by: &str,
        now_ms: i64,
    ) -> Result<Job, CoordinatorError> {
        let job = self.job(id)?;
        if job.state.is_terminal() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} already ended ({})",
                job.state.name()
            )));
        }
        self.end_live_attempt(id, "cancelled", now_ms)?;
        self.update_job(id, now_ms, |job| job.to_cancelled())?;
        self.note(id, now_ms, &format!("job cancelled{}", by_whom(by)))?;
        self.schedule(now_ms)?;
        Ok(self.jobs[id].clone())
    }

    pub fn resume(
        &mut self,
        id: &JobId,
        from_step: Option<u64>,
        from_step_in_store: bool,
        overrides: &[String],
        now_ms: i64,
    ) -> Result<Job, CoordinatorError> {
        let from = Resume {
            step: from_step,
            in_store: from_step_in_store,
        };
        self.resume_as(id, from, overrides, "", now_ms)
    }

    /// Resumes a job on behalf of the token named `by`, which its history records.
    pub fn resume_as(
        &mut self,
        id: &JobId,
        from: Resume,
        overrides: &[String],
        by: &str,
        now_ms: i64,
    ) -> Result<Job, CoordinatorError> {
        let Resume {
            step: from_step,
            in_store: from_step_in_store,
        } = from;
        let job = self.job(id)?;
        if !matches!(job.state, JobState::Failed { .. } | JobState::Cancelled) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} is {}; only a Failed or Cancelled job can be resumed",
                job.state.name()
            )));
        }
        if let Some(step) = from_step
            && !from_step_in_store
            && !self.store.checkpoints(id)?.iter().any(|c| c.step == step)
        {
            return Err(CoordinatorError::InvalidArgument(format!(
                "from_step: job {id} has no checkpoint at step {step}"
            )));
        }
        let spec = self.jobs[id].spec.for_resume(overrides)?;
        self.check_stores(&spec)?;
        self.check_memory(&spec)?;
        self.update_job(id, now_ms, |job| {
            job.spec = spec;
            job.to_resumed(from_step)
        })?;
        let from = from_step.map_or("the newest checkpoint".to_string(), |s| format!("step {s}"));
        self.note(
            id,
            now_ms,
            &format!("job resumed by hand{} from {from}", by_whom(by)),
        )?;
        self.schedule(now_ms)?;
        Ok(self.jobs[id].clone())
    }

    pub fn checkpoints(&self, id: &JobId) -> Result<Vec<CheckpointRecord>, CoordinatorError> {
        self.job(id)?;
        Ok(self.store.checkpoints(id)?)
    }

    pub fn attempts(&self, id: &JobId) -> Result<Vec<AttemptRow>, CoordinatorError> {
        self.job(id)?;
        Ok(self.store.attempts(id)?)
    }

    pub fn events_after(
        &self,
        id: &JobId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRow>, CoordinatorError> {
        self.job(id)?;
        Ok(self.store.events_after(id, after_seq, limit)?)
    }
}

/// Where a manual resume starts: `step`, or the newest checkpoint; `in_store` when the step was
/// checked in the store rather than the coordinator's records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resume {
    pub step: Option<u64>,
    pub in_store: bool,
}

/// " by NAME" for a history line, nothing for an unnamed caller.
fn by_whom(by: &str) -> String {
    if by.is_empty() {
        String::new()
    } else {
        format!(" by {by}")
    }
}
