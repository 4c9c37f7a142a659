//! The job API: submit, cancel, resume, and what a client may read about a job.

use super::Core;
use crate::error::CoordinatorError;
use crate::state::{CheckpointRecord, Job, JobState};
use crate::store::{AttemptRow, EventRow};
use gantry_core::{JobId, JobSpec};

impl Core {
    pub fn submit(&mut self, spec_json: &str, now_ms: i64) -> Result<Job, CoordinatorError> {
        let mut spec = JobSpec::from_json(spec_json)?;
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
        let job = Job::new(id.clone(), spec, now_ms);
        self.store.put_job(&job)?;
        self.order.push(id.clone());
        self.jobs.insert(id.clone(), job);
        self.note(&id, now_ms, "job submitted")?;
        self.schedule(now_ms)?;
        Ok(self.jobs[&id].clone())
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
        let job = self.job(id)?;
        if job.state.is_terminal() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} already ended ({})",
                job.state.name()
            )));
        }
        self.end_live_attempt(id, "cancelled", now_ms)?;
        self.update_job(id, now_ms, |job| job.to_cancelled())?;
        self.note(id, now_ms, "job cancelled")?;
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
        self.check_memory(&spec)?;
        self.update_job(id, now_ms, |job| {
            job.spec = spec;
            job.to_resumed(from_step)
        })?;
        let from = from_step.map_or("the newest checkpoint".to_string(), |s| format!("step {s}"));
        self.note(id, now_ms, &format!("job resumed by hand from {from}"))?;
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
