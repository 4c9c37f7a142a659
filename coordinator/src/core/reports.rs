//! What ranks report through their worker's session: progress, the final test, log lines and
//! checkpoint commits. Each is fenced by its attempt.

use super::{Core, RankKey};
use crate::error::CoordinatorError;
use crate::state::{CheckpointRecord, JobState};
use gantry_core::ClassMetrics;

impl Core {
    /// A step of the job's progress rank: the job's numbers, and a sign of life for hang
    /// detection.
    pub(super) fn on_progress(
        &mut self,
        key: &RankKey,
        step: u64,
        loss: f64,
        (eval_loss, eval_metrics): (Option<f64>, Option<ClassMetrics>),
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        if !self.is_live(key) || key.rank.get() != self.jobs[&key.job].spec.progress_rank() {
            return Ok(());
        }
        self.last_progress_ms.insert(key.job.clone(), now_ms);
        if !matches!(self.jobs[&key.job].state, JobState::Scheduled { .. }) {
            self.record_progress(&key.job, now_ms, step, loss, eval_loss)?;
            // A classifier's metrics come with its (rare) evaluations: they go into the job.
            if eval_metrics.is_some() {
                self.update_job(&key.job, now_ms, |job| {
                    job.eval_metrics = eval_metrics;
                    Ok(())
                })?;
            }
            return Ok(());
        }
        // A step before the rendezvous completed (it is lost when the coordinator restarts):
        // the ranks run all the same, and the state change needs the whole job written.
        self.update_job(&key.job, now_ms, |job| {
            job.to_running()?;
            job.step = step;
            job.loss = Some(loss);
            if eval_loss.is_some() {
                job.eval_loss = eval_loss;
            }
            if eval_metrics.is_some() {
                job.eval_metrics = eval_metrics;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// The final evaluation on the test split.
    pub(super) fn on_test(
        &mut self,
        key: &RankKey,
        loss: f64,
        (accuracy, metrics): (Option<f64>, Option<ClassMetrics>),
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        if !self.is_live(key) {
            return Ok(());
        }
        self.update_job(&key.job, now_ms, |job| {
            job.test_loss = Some(loss);
            job.test_accuracy = accuracy;
            job.test_metrics = metrics;
            Ok(())
        })?;
        Ok(())
    }

    /// Lines a rank printed, into the job's history. Late lines of an ended attempt are kept:
    /// they often say why it ended.
    pub(super) fn on_logs(
        &mut self,
        key: &RankKey,
        stream: &str,
        lines: Vec<String>,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        if !self.jobs.contains_key(&key.job) {
            return Ok(());
        }
        for line in lines {
            let rank = key.rank.get() as i32;
            let row =
                self.store
                    .append_event(&key.job, now_ms, key.attempt, rank, stream, &line)?;
            self.publish_line(&key.job, row, key.attempt, rank, stream, &line, now_ms);
        }
        Ok(())
    }

    /// Rank 0 committed a checkpoint (and retention may have deleted older ones).
    pub(super) fn on_checkpoint(
        &mut self,
        key: &RankKey,
        step: u64,
        url: String,
        size_bytes: u64,
        deleted_steps: &[u64],
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        // Fencing: only the job's newest attempt may advance its checkpoint. That attempt may
        // have ended (cancelled, or failed and backing off) after its rank 0 committed: no
        // newer attempt has fenced the store, so the commit stands.
        if self
            .jobs
            .get(&key.job)
            .is_none_or(|j| j.attempt != key.attempt)
        {
            tracing::warn!(job = %key.job, attempt = %key.attempt, "refused checkpoint from a stale attempt");
            return Ok(());
        }
        let record = CheckpointRecord {
            step,
            url,
            attempt: key.attempt,
            size_bytes,
            committed_at_ms: now_ms,
        };
        self.store.put_checkpoint(&key.job, &record)?;
        self.store.delete_checkpoints(&key.job, deleted_steps)?;
        let newer = self.jobs[&key.job]
            .last_checkpoint
            .as_ref()
            .is_none_or(|c| c.step < step);
        if newer {
            self.update_job(&key.job, now_ms, |job| {
                job.last_checkpoint = Some(record);
                Ok(())
            })?;
        }
        self.note(
            &key.job,
            now_ms,
            &format!("checkpoint committed at step {step}"),
        )
    }
}
