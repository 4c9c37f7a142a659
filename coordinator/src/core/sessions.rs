//! Workers and their sessions: registration, the session stream commands go down, each
//! message a worker sends, and reconciling a reconnected worker's ranks with the live attempts.

use super::{Core, RankKey, Registration, Session, SessionSender, WorkerCommand, WorkerReport};
use crate::error::CoordinatorError;
use crate::policy::reconcile::{self, Action};
use crate::state::{Worker, WorkerState};
use gantry_core::WorkerId;

impl Core {
    pub fn register(
        &mut self,
        registration: Registration,
        now_ms: i64,
    ) -> Result<WorkerId, CoordinatorError> {
        let Registration {
            worker_id,
            hostname,
            slots,
            devices,
            memory_bytes,
            gpus,
        } = registration;
        if hostname.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "hostname: must not be empty".into(),
            ));
        }
        if slots == 0 || slots > 1024 {
            return Err(CoordinatorError::InvalidArgument(format!(
                "slots: {slots} must be between 1 and 1024"
            )));
        }
        let id = match worker_id {
            Some(id) => id,
            None => loop {
                let id = WorkerId(format!("{hostname}-{:04x}", rand::random::<u16>()));
                if !self.workers.contains_key(&id) {
                    break id;
                }
            },
        };
        let registered_at_ms = self.workers.get(&id).map_or(now_ms, |w| w.registered_at_ms);
        let mut worker = Worker {
            id: id.clone(),
            hostname,
            slots,
            devices,
            memory_bytes,
            gpus,
            state: WorkerState::Lost { since_ms: now_ms },
            registered_at_ms,
            last_seen_ms: now_ms,
        };
        worker.renew_lease(now_ms, self.options.lease_ttl_ms as i64);
        self.store.put_worker(&worker)?;
        tracing::info!(worker = %id, slots, gpus = worker.gpus.len(), "worker registered");
        self.workers.insert(id.clone(), worker);
        Ok(id)
    }

    pub fn workers(&self) -> Vec<(&Worker, u32)> {
        let used = self.used_slots();
        self.workers
            .values()
            .map(|w| (w, used.get(&w.id).copied().unwrap_or(0)))
            .collect()
    }

    /// Attaches a session stream; returns its id so a stale stream's close cannot detach a newer one.
    pub fn open_session(
        &mut self,
        worker: &WorkerId,
        tx: SessionSender,
        now_ms: i64,
    ) -> Result<u64, CoordinatorError> {
        let w = self.workers.get_mut(worker).ok_or_else(|| {
            CoordinatorError::NotFound(format!("worker {worker} is not registered"))
        })?;
        w.renew_lease(now_ms, self.options.lease_ttl_ms as i64);
        self.next_session += 1;
        let id = self.next_session;
        self.sessions.insert(worker.clone(), Session { id, tx });
        Ok(id)
    }

    pub fn close_session(&mut self, worker: &WorkerId, session: u64) {
        if self.sessions.get(worker).is_some_and(|s| s.id == session) {
            self.sessions.remove(worker);
            tracing::info!(worker = %worker, "worker session closed");
        }
    }

    /// Handles one message of a worker's session.
    pub fn on_worker_message(
        &mut self,
        worker: &WorkerId,
        body: WorkerReport,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let ttl = self.options.lease_ttl_ms as i64;
        let w = self.workers.get_mut(worker).ok_or_else(|| {
            CoordinatorError::NotFound(format!("worker {worker} is not registered"))
        })?;
        let was_lost = !w.is_alive();
        w.renew_lease(now_ms, ttl);
        if was_lost {
            self.store.put_worker(&self.workers[worker])?;
            tracing::info!(worker = %worker, "lost worker is back");
        }
        // Only a worker coming back, a reconnect report or a rank exit can free or add slots;
        // heartbeats, progress and logs (the bulk of the traffic) leave placement alone.
        let may_place =
            was_lost || matches!(body, WorkerReport::Running { .. } | WorkerReport::Exited(_));
        match body {
            WorkerReport::Heartbeat => {}
            WorkerReport::Draining => {
                if self.draining.insert(worker.clone()) {
                    tracing::info!(worker = %worker, "worker is draining");
                }
            }
            WorkerReport::Running { ranks, exited } => {
                for exit in exited {
                    self.on_rank_exit(exit, now_ms)?;
                }
                self.reconcile(worker, &ranks, now_ms)?;
            }
            WorkerReport::Progress {
                key,
                step,
                loss,
                eval_loss,
                eval_metrics,
            } => self.on_progress(&key, step, loss, (eval_loss, eval_metrics), now_ms)?,
            WorkerReport::Exited(exit) => self.on_rank_exit(exit, now_ms)?,
            WorkerReport::Test {
                key,
                loss,
                accuracy,
                metrics,
            } => self.on_test(&key, loss, (accuracy, metrics), now_ms)?,
            WorkerReport::Logs { key, stream, lines } => {
                self.on_logs(&key, &stream, lines, now_ms)?
            }
            WorkerReport::Checkpoint {
                key,
                step,
                url,
                size_bytes,
                deleted_steps,
            } => self.on_checkpoint(&key, step, url, size_bytes, &deleted_steps, now_ms)?,
        }
        if may_place {
            self.schedule(now_ms)?;
        }
        Ok(())
    }

    /// Brings a reconnected worker's ranks in line with the live attempts, as
    /// `policy::reconcile` decides.
    pub(super) fn reconcile(
        &mut self,
        worker: &WorkerId,
        running: &[RankKey],
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        for action in reconcile::reconcile(worker, running, &self.jobs) {
            match action {
                Action::Stop {
                    job,
                    below_attempt,
                    reason,
                } => self.send(
                    worker,
                    WorkerCommand::Stop {
                        job,
                        below_attempt,
                        reason: reason.into(),
                    },
                ),
                Action::Resend { job, rank, reason } => {
                    tracing::info!(job = %job, %rank, worker = %worker, "resending an assignment: {reason}");
                    self.send_assignment(&job, rank, worker);
                }
                Action::FailAttempt { job, cause } => self.fail_attempt(&job, cause, now_ms)?,
                Action::Continue { .. } => {}
            }
        }
        Ok(())
    }

    /// Sends `command` down `worker`'s session, if it has one open; a closed one is dropped.
    pub(super) fn send(&mut self, worker: &WorkerId, command: WorkerCommand) {
        if let Some(session) = self.sessions.get(worker)
            && session.tx.send(command).is_err()
        {
            self.sessions.remove(worker);
        }
    }
}
