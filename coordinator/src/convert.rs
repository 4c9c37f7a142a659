//! Conversions between the wire types and the core's types. Proto fields are never unwrapped:
//! a missing or empty one is an INVALID_ARGUMENT that names it.

use crate::error::CoordinatorError;
use crate::message::{NcclGroup, RankExit, RankKey, Registration, WorkerCommand, WorkerReport};
use crate::state::{CheckpointRecord, Gpu, Job, JobState, Worker};
use crate::store::{AttemptRow, EventRow};
use gantry_core::{Attempt, JobId, Rank, WorkerId};
use gantry_proto::v1 as pb;

fn missing(field: &str) -> CoordinatorError {
    CoordinatorError::InvalidArgument(format!("{field}: required"))
}

pub fn job_id(raw: &str) -> Result<JobId, CoordinatorError> {
    if raw.is_empty() {
        return Err(missing("job_id"));
    }
    Ok(JobId(raw.to_string()))
}

pub fn rank_key(key: Option<pb::RankKey>, field: &str) -> Result<RankKey, CoordinatorError> {
    let key = key.ok_or_else(|| missing(field))?;
    if key.job_id.is_empty() {
        return Err(missing(&format!("{field}.job_id")));
    }
    if key.attempt == 0 {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{field}.attempt: attempts start at 1"
        )));
    }
    Ok(RankKey {
        job: JobId(key.job_id),
        attempt: Attempt(key.attempt),
        rank: Rank(key.rank),
    })
}

fn rank_exit(e: pb::RankExited, field: &str) -> Result<RankExit, CoordinatorError> {
    Ok(RankExit {
        key: rank_key(e.key, &format!("{field}.key"))?,
        exit_code: e.exit_code,
        signal: e.signal,
        message: e.message,
        stopped: e.stopped,
    })
}

pub fn nccl_group(g: pb::NcclGroupId) -> NcclGroup {
    NcclGroup {
        members: g.members,
        unique_id: g.unique_id,
    }
}

pub fn nccl_group_out(g: NcclGroup) -> pb::NcclGroupId {
    pb::NcclGroupId {
        members: g.members,
        unique_id: g.unique_id,
    }
}

pub fn worker_report(
    body: Option<pb::worker_message::Body>,
) -> Result<WorkerReport, CoordinatorError> {
    use pb::worker_message::Body;
    Ok(match body.ok_or_else(|| missing("body"))? {
        Body::Heartbeat(_) => WorkerReport::Heartbeat,
        Body::Draining(_) => WorkerReport::Draining,
        Body::Running(r) => WorkerReport::Running {
            ranks: r
                .ranks
                .into_iter()
                .map(|k| rank_key(Some(k), "running.ranks"))
                .collect::<Result<_, _>>()?,
            exited: r
                .exited
                .into_iter()
                .map(|e| rank_exit(e, "running.exited"))
                .collect::<Result<_, _>>()?,
        },
        // A diverged loss (inf, NaN) is a training outcome to show, not malformed input.
        Body::Progress(p) => WorkerReport::Progress {
            key: rank_key(p.key, "progress.key")?,
            step: p.step,
            loss: p.loss,
            eval_loss: p.eval_loss,
            eval_metrics: p.eval_metrics.map(Into::into),
        },
        Body::Exited(e) => WorkerReport::Exited(rank_exit(e, "exited")?),
        Body::Test(t) => WorkerReport::Test {
            key: rank_key(t.key, "test.key")?,
            loss: t.loss,
            accuracy: t.accuracy,
            metrics: t.metrics.map(Into::into),
        },
        Body::Logs(l) => WorkerReport::Logs {
            key: rank_key(l.key, "logs.key")?,
            stream: if l.stream.is_empty() {
                "stdout".into()
            } else {
                l.stream
            },
            lines: l.lines,
        },
        Body::Checkpoint(c) => {
            if c.url.is_empty() {
                return Err(missing("checkpoint.url"));
            }
            WorkerReport::Checkpoint {
                key: rank_key(c.key, "checkpoint.key")?,
                step: c.step,
                url: c.url,
                size_bytes: c.size_bytes,
                deleted_steps: c.deleted_steps,
            }
        }
    })
}

/// A command of the core as its worker receives it.
pub fn command(command: WorkerCommand) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Body;
    let body = match command {
        WorkerCommand::Assign(a) => {
            let a = *a;
            let p = a.spec.parallel;
            Body::Assign(pb::Assignment {
                key: Some(pb::RankKey {
                    job_id: a.key.job.0,
                    attempt: a.key.attempt.get(),
                    rank: a.key.rank.get(),
                }),
                world_size: p.world_size(),
                parallel: Some(pb::Parallel {
                    dp: p.dp,
                    tp: p.tp,
                    pp: p.pp,
                }),
                spec_json: a.spec.to_json(),
                resume_step: a.resume_step,
                gpu: a.gpu,
                attempt_secret: a.secret.0,
            })
        }
        WorkerCommand::Stop {
            job,
            below_attempt,
            reason,
        } => Body::Stop(pb::StopRanks {
            job_id: job.0,
            below_attempt: below_attempt.get(),
            reason,
        }),
    };
    pb::CoordinatorMessage { body: Some(body) }
}

pub fn job(job: &Job) -> pb::Job {
    let state = match job.state {
        JobState::Pending { .. } => pb::JobState::Pending,
        JobState::Restarting { .. } => pb::JobState::Restarting,
        JobState::Scheduled { .. } => pb::JobState::Scheduled,
        JobState::Running { .. } => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed { .. } => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    };
    let pending_reason = match &job.state {
        JobState::Pending { reason, .. } => reason.clone(),
        JobState::Restarting { cause, reason } => Some(match reason {
            Some(r) => format!("restarting after: {cause}; waiting: {r}"),
            None => format!("restarting after: {cause}"),
        }),
        _ => None,
    };
    let p = job.spec.parallel;
    pb::Job {
        id: job.id.0.clone(),
        name: job.spec.name.clone(),
        state: state as i32,
        step: job.step,
        total_steps: job.spec.train.steps,
        attempt: job.attempt.get(),
        restarts: job.restarts,
        loss: job.loss,
        eval_loss: job.eval_loss,
        parallel: Some(pb::Parallel {
            dp: p.dp,
            tp: p.tp,
            pp: p.pp,
        }),
        last_checkpoint: job.last_checkpoint.as_ref().map(|c| pb::CheckpointRef {
            step: c.step,
            url: c.url.clone(),
        }),
        error: job.error().map(str::to_string),
        pending_reason,
        created_at_ms: job.created_at_ms,
        updated_at_ms: job.updated_at_ms,
        spec_json: job.spec.to_json(),
        attempts: Vec::new(),
        test_loss: job.test_loss,
        test_accuracy: job.test_accuracy,
        eval_metrics: job.eval_metrics.map(Into::into),
        test_metrics: job.test_metrics.map(Into::into),
        submitted_by: job.submitted_by.clone(),
    }
}

pub fn attempt(a: &AttemptRow) -> pb::AttemptSummary {
    pb::AttemptSummary {
        attempt: a.attempt.get(),
        started_at_ms: a.started_at_ms,
        ended_at_ms: a.ended_at_ms,
        outcome: a.outcome.clone(),
    }
}

pub fn worker(w: &Worker, used: u32) -> pb::Worker {
    pb::Worker {
        id: w.id.0.clone(),
        hostname: w.hostname.clone(),
        slots: w.slots,
        used_slots: used,
        state: if w.is_alive() {
            pb::WorkerState::Alive
        } else {
            pb::WorkerState::Lost
        } as i32,
        devices: w.devices.clone(),
        registered_at_ms: w.registered_at_ms,
        last_seen_ms: w.last_seen_ms,
        memory_bytes: w.memory_bytes,
        gpus: w
            .gpus
            .iter()
            .map(|g| pb::Gpu {
                index: g.index,
                name: g.name.clone(),
                memory_bytes: g.memory_bytes,
            })
            .collect(),
    }
}

/// A worker's registration as the core takes it. An empty id is a first registration; a GPU
/// index given twice is refused, since ranks would then share a GPU that counts as two.
pub fn registration(req: pb::RegisterRequest) -> Result<Registration, CoordinatorError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(g) = req.gpus.iter().find(|g| !seen.insert(g.index)) {
        return Err(CoordinatorError::InvalidArgument(format!(
            "gpus: index {} is listed twice",
            g.index
        )));
    }
    Ok(Registration {
        worker_id: (!req.worker_id.is_empty()).then_some(WorkerId(req.worker_id)),
        hostname: req.hostname,
        slots: req.slots,
        devices: req.devices,
        memory_bytes: req.memory_bytes,
        gpus: req
            .gpus
            .into_iter()
            .map(|g| Gpu {
                index: g.index,
                name: g.name,
                memory_bytes: g.memory_bytes,
            })
            .collect(),
    })
}

pub fn checkpoint(c: &CheckpointRecord) -> pb::Checkpoint {
    pb::Checkpoint {
        step: c.step,
        url: c.url.clone(),
        attempt: c.attempt.get(),
        size_bytes: c.size_bytes,
        state: pb::CheckpointState::Committed as i32,
        committed_at_ms: c.committed_at_ms,
    }
}

pub fn line_event(row: &EventRow) -> pb::JobEvent {
    pb::JobEvent {
        seq: row.seq,
        job_id: row.job_id.0.clone(),
        at_ms: row.at_ms,
        kind: Some(pb::job_event::Kind::Log(pb::LogLine {
            attempt: row.attempt.get(),
            rank: row.rank,
            stream: row.stream.clone(),
            line: row.line.clone(),
        })),
    }
}

pub fn job_event(j: &Job) -> pb::JobEvent {
    pb::JobEvent {
        seq: 0,
        job_id: j.id.0.clone(),
        at_ms: j.updated_at_ms,
        kind: Some(pb::job_event::Kind::Job(job(j))),
    }
}
