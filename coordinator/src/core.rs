//! The coordinator's core: the single owner of jobs, workers and sessions. Every method is
//! synchronous and takes `now_ms`, so tests drive it with any clock; the gRPC layer holds it
//! behind one lock (one command at a time, like an event loop) and only translates.
//!
//! Writes go to the store first, then to the in-memory cache, then out as events.

use crate::error::CoordinatorError;
use crate::scheduler::{self, FreeSlots};
use crate::state::{CheckpointRecord, Job, JobState, Worker, WorkerState};
use crate::store::{AttemptRow, EventRow, Store};
use gantry_core::{Attempt, ExitCode, JobId, JobSpec, Mesh, Rank, WorkerId};
use gantry_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use tokio::sync::{broadcast, mpsc};

/// What goes down a worker's session stream.
pub type SessionSender = mpsc::UnboundedSender<Result<pb::CoordinatorMessage, tonic::Status>>;

#[derive(Debug, Clone)]
pub struct CoreOptions {
    /// Where checkpoints go when a spec names no `checkpoint.url`.
    pub default_checkpoint_url: String,
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
}

impl CoreOptions {
    pub fn for_state_dir(state_dir: &std::path::Path) -> Self {
        let dir: PathBuf = state_dir.join("checkpoints");
        Self {
            default_checkpoint_url: format!("file://{}", dir.display()),
            heartbeat_interval_ms: 1_000,
            lease_ttl_ms: 10_000,
        }
    }
}

/// Something that happened to a job, for watchers.
#[derive(Debug, Clone)]
pub enum Update {
    /// The job as it is now (state change or progress).
    Job(Box<Job>),
    /// A stored event line.
    Line(EventRow),
}

struct Session {
    id: u64,
    tx: SessionSender,
}

pub struct Core {
    store: Store,
    options: CoreOptions,
    jobs: BTreeMap<JobId, Job>,
    /// Job ids in submission order (scheduling is first come, first served, with backfill).
    order: Vec<JobId>,
    workers: BTreeMap<WorkerId, Worker>,
    sessions: HashMap<WorkerId, Session>,
    next_session: u64,
    /// What the ranks of live attempts reported at rendezvous.
    rendezvous: HashMap<(JobId, Attempt), RendezvousTable>,
    updates: broadcast::Sender<Update>,
    /// Workers shutting down: they get no new ranks.
    draining: HashSet<WorkerId>,
    /// When each placed job last showed life (placement or a reported step), for hang detection.
    last_progress_ms: HashMap<JobId, i64>,
    /// Recent failures that were a worker's own (its lease expired, its rank was killed).
    worker_failures: HashMap<WorkerId, Vec<i64>>,
}

/// A worker with this many failures of its own within [`FLAKY_WINDOW_MS`] is avoided for as
/// long, when the job fits elsewhere.
const FLAKY_FAILURES: usize = 2;
const FLAKY_WINDOW_MS: i64 = 10 * 60 * 1000;

impl Core {
    /// Rebuilds the coordinator's view from the store. Workers get a fresh lease so they have
    /// time to reconnect before they are declared lost.
    pub fn load(store: Store, options: CoreOptions, now_ms: i64) -> Result<Self, CoordinatorError> {
        let jobs_list = store.jobs()?;
        let order = jobs_list.iter().map(|j| j.id.clone()).collect();
        let jobs = jobs_list.into_iter().map(|j| (j.id.clone(), j)).collect();
        let mut workers = BTreeMap::new();
        for mut w in store.workers()? {
            if w.is_alive() {
                w.state = WorkerState::Alive {
                    lease_expires_at_ms: now_ms + options.lease_ttl_ms as i64,
                };
            }
            workers.insert(w.id.clone(), w);
        }
        let (updates, _) = broadcast::channel(4096);
        Ok(Self {
            store,
            options,
            jobs,
            order,
            workers,
            sessions: HashMap::new(),
            next_session: 0,
            rendezvous: HashMap::new(),
            updates,
            draining: HashSet::new(),
            last_progress_ms: HashMap::new(),
            worker_failures: HashMap::new(),
        })
    }

    pub fn options(&self) -> &CoreOptions {
        &self.options
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    // ---- jobs -------------------------------------------------------------------------------

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
            job.to_resumed(from_step);
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

    // ---- workers ----------------------------------------------------------------------------

    pub fn register(
        &mut self,
        worker_id: Option<WorkerId>,
        hostname: String,
        slots: u32,
        devices: Vec<String>,
        memory_bytes: u64,
        now_ms: i64,
    ) -> Result<WorkerId, CoordinatorError> {
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
            state: WorkerState::Lost { since_ms: now_ms },
            registered_at_ms,
            last_seen_ms: now_ms,
        };
        worker.renew_lease(now_ms, self.options.lease_ttl_ms as i64);
        self.store.put_worker(&worker)?;
        tracing::info!(worker = %id, slots, "worker registered");
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
            } => {
                if self.is_live(&key) && key.rank == self.jobs[&key.job].spec.progress_rank() {
                    self.last_progress_ms.insert(key.job.clone(), now_ms);
                    self.update_job(&key.job, now_ms, |job| {
                        job.to_running();
                        job.step = step;
                        job.loss = Some(loss);
                        if eval_loss.is_some() {
                            job.eval_loss = eval_loss;
                        }
                    })?;
                }
            }
            WorkerReport::Exited(exit) => self.on_rank_exit(exit, now_ms)?,
            WorkerReport::Test {
                key,
                loss,
                accuracy,
            } => {
                if self.is_live(&key) {
                    self.update_job(&key.job, now_ms, |job| {
                        job.test_loss = Some(loss);
                        job.test_accuracy = accuracy;
                    })?;
                }
            }
            WorkerReport::Logs { key, stream, lines } => {
                if self.jobs.contains_key(&key.job) {
                    for line in lines {
                        let row = self.store.append_event(
                            &key.job,
                            now_ms,
                            key.attempt,
                            key.rank as i32,
                            &stream,
                            &line,
                        )?;
                        self.publish_line(
                            &key.job,
                            row,
                            key.attempt,
                            key.rank as i32,
                            &stream,
                            &line,
                            now_ms,
                        );
                    }
                }
            }
            WorkerReport::Checkpoint {
                key,
                step,
                url,
                size_bytes,
                deleted_steps,
            } => {
                // Fencing: only the job's newest attempt may advance its checkpoint. That
                // attempt may have ended (cancelled, or failed and backing off) after its rank 0
                // committed: no newer attempt has fenced the store, so the commit stands.
                if self
                    .jobs
                    .get(&key.job)
                    .is_some_and(|j| j.attempt == key.attempt)
                {
                    let record = CheckpointRecord {
                        step,
                        url,
                        attempt: key.attempt,
                        size_bytes,
                        committed_at_ms: now_ms,
                    };
                    self.store.put_checkpoint(&key.job, &record)?;
                    self.store.delete_checkpoints(&key.job, &deleted_steps)?;
                    let newer = self.jobs[&key.job]
                        .last_checkpoint
                        .as_ref()
                        .is_none_or(|c| c.step < step);
                    if newer {
                        self.update_job(&key.job, now_ms, |job| {
                            job.last_checkpoint = Some(record)
                        })?;
                    }
                    self.note(
                        &key.job,
                        now_ms,
                        &format!("checkpoint committed at step {step}"),
                    )?;
                } else {
                    tracing::warn!(job = %key.job, attempt = key.attempt, "refused checkpoint from a stale attempt");
                }
            }
        }
        if may_place {
            self.schedule(now_ms)?;
        }
        Ok(())
    }

    /// A rank reports its data-plane address (rank 0 also its NCCL unique id, if any).
    /// Returns the peer table once every rank has.
    pub fn rendezvous(
        &mut self,
        key: &RankKey,
        address: String,
        nccl_unique_id: Option<Vec<u8>>,
        now_ms: i64,
    ) -> Result<Option<PeerTable>, CoordinatorError> {
        if address.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "address: must not be empty".into(),
            ));
        }
        if nccl_unique_id
            .as_ref()
            .is_some_and(|id| id.len() != 128 || key.rank != 0)
        {
            return Err(CoordinatorError::InvalidArgument(
                "nccl_unique_id: only rank 0 sends one, of 128 bytes".into(),
            ));
        }
        let job = self.job(&key.job)?;
        if job.attempt != key.attempt || job.state.placement().is_none() {
            return Err(CoordinatorError::Aborted(format!(
                "attempt {} of job {} is not live (live attempt: {})",
                key.attempt, key.job, job.attempt
            )));
        }
        let world = job.spec.parallel.world_size();
        if key.rank >= world {
            return Err(CoordinatorError::InvalidArgument(format!(
                "key.rank: {} is outside the world of {world} ranks",
                key.rank
            )));
        }
        let table = self
            .rendezvous
            .entry((key.job.clone(), key.attempt))
            .or_insert_with(|| RendezvousTable {
                addresses: vec![None; world as usize],
                nccl_unique_id: None,
            });
        table.addresses[key.rank as usize] = Some(address);
        if nccl_unique_id.is_some() {
            table.nccl_unique_id = nccl_unique_id;
        }
        let complete = table
            .addresses
            .iter()
            .cloned()
            .collect::<Option<Vec<String>>>()
            .map(|addresses| PeerTable {
                addresses,
                nccl_unique_id: table.nccl_unique_id.clone(),
            });
        if complete.is_some() && matches!(self.jobs[&key.job].state, JobState::Scheduled { .. }) {
            self.update_job(&key.job, now_ms, Job::to_running)?;
            self.note(
                &key.job,
                now_ms,
                &format!("attempt {} running", key.attempt),
            )?;
        }
        Ok(complete)
    }

    /// Periodic work: expire leases, then place waiting jobs.
    pub fn tick(&mut self, now_ms: i64) -> Result<(), CoordinatorError> {
        let expired: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.lease_expired(now_ms))
            .map(|w| w.id.clone())
            .collect();
        for id in expired {
            let w = self.workers.get_mut(&id).expect("listed above");
            w.state = WorkerState::Lost { since_ms: now_ms };
            self.store.put_worker(w)?;
            self.sessions.remove(&id);
            tracing::warn!(worker = %id, "worker lease expired");
            let affected: Vec<JobId> = self
                .jobs
                .values()
                .filter(|j| j.state.placement().is_some_and(|p| p.contains(&id)))
                .map(|j| j.id.clone())
                .collect();
            self.record_worker_failure(&id, now_ms);
            for job in affected {
                self.fail_attempt(&job, format!("worker {id} lost (lease expired)"), now_ms)?;
            }
        }
        // A placed attempt that has shown no life for its hang timeout is stuck somewhere
        // collectives' timeouts do not see (a rank spinning, a deadlock outside a collective).
        let hung: Vec<(JobId, u64)> = self
            .jobs
            .values()
            .filter(|j| j.state.placement().is_some())
            .filter_map(|j| {
                let limit = j.spec.fault_tolerance.hang_timeout_secs;
                let since = *self.last_progress_ms.get(&j.id)?;
                (limit > 0 && now_ms - since > limit as i64 * 1000).then(|| (j.id.clone(), limit))
            })
            .collect();
        for (job, limit) in hung {
            self.last_progress_ms.remove(&job);
            self.fail_attempt(
                &job,
                format!("no step reported for {limit} s (hung)"),
                now_ms,
            )?;
        }
        self.schedule(now_ms)
    }

    // ---- internals --------------------------------------------------------------------------

    /// Refuses a job whose ranks cannot fit the memory of a slot on the live workers that said
    /// how much they have (the smallest such slot; no information, no refusal).
    fn check_memory(&self, spec: &JobSpec) -> Result<(), CoordinatorError> {
        let per_slot = self
            .workers
            .values()
            .filter(|w| w.is_alive() && w.memory_bytes > 0)
            .map(|w| w.memory_bytes / u64::from(w.slots))
            .min();
        let need = spec.memory_per_rank();
        match per_slot {
            Some(have) if need > have => {
                Err(CoordinatorError::InvalidSpec(gantry_core::SpecError::new(
                    "resources",
                    format!(
                        "each rank needs about {:.1} GiB but a worker slot has {:.1} GiB; lower \
                     train.global_batch or raise train.micro_batches, set \
                     train.activation_checkpointing = true, or raise parallel.tp or \
                     parallel.pp",
                        need as f64 / f64::from(1u32 << 30),
                        have as f64 / f64::from(1u32 << 30)
                    ),
                )))
            }
            _ => Ok(()),
        }
    }

    fn is_live(&self, key: &RankKey) -> bool {
        self.jobs
            .get(&key.job)
            .is_some_and(|j| j.attempt == key.attempt && j.state.placement().is_some())
    }

    fn on_rank_exit(&mut self, exit: RankExit, now_ms: i64) -> Result<(), CoordinatorError> {
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

    fn record_worker_failure(&mut self, worker: &WorkerId, now_ms: i64) {
        let failures = self.worker_failures.entry(worker.clone()).or_default();
        failures.retain(|t| now_ms - t < FLAKY_WINDOW_MS);
        failures.push(now_ms);
        if failures.len() == FLAKY_FAILURES {
            tracing::warn!(worker = %worker, "worker failed {FLAKY_FAILURES} times recently; avoiding it where possible");
        }
    }

    /// Whether recent failures of its own make `worker` a last resort for placement.
    fn is_flaky(&self, worker: &WorkerId, now_ms: i64) -> bool {
        self.worker_failures.get(worker).is_some_and(|f| {
            f.iter().filter(|t| now_ms - **t < FLAKY_WINDOW_MS).count() >= FLAKY_FAILURES
        })
    }

    /// Ends the live attempt because of `cause`; restarts the job if its budget allows.
    fn fail_attempt(
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
    fn end_live_attempt(
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

    /// Brings a reconnected worker's ranks in line with the live attempts.
    fn reconcile(
        &mut self,
        worker: &WorkerId,
        running: &[RankKey],
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        for key in running {
            if !self.is_live(key) {
                let below = self
                    .jobs
                    .get(&key.job)
                    .filter(|j| !j.state.is_terminal())
                    .map_or(u64::MAX, |j| j.attempt);
                self.send(
                    worker,
                    pb::coordinator_message::Body::Stop(pb::StopRanks {
                        job_id: key.job.0.clone(),
                        below_attempt: below.max(key.attempt + 1),
                        reason: "stale attempt".into(),
                    }),
                );
            }
        }
        let expected: Vec<(JobId, Rank, bool)> = self
            .jobs
            .values()
            .filter_map(|j| j.state.placement().map(|p| (j, p)))
            .flat_map(|(j, p)| {
                p.iter()
                    .enumerate()
                    .filter(|(rank, w)| *w == worker && !j.finished_ranks.contains(&(*rank as u32)))
                    .map(|(rank, _)| {
                        (
                            j.id.clone(),
                            rank as Rank,
                            matches!(j.state, JobState::Running { .. }),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for (job, rank, running_state) in expected {
            let attempt = self.jobs[&job].attempt;
            if running
                .iter()
                .any(|k| k.job == job && k.attempt == attempt && k.rank == rank)
            {
                continue;
            }
            if running_state {
                self.fail_attempt(
                    &job,
                    format!("rank {rank} is no longer running on worker {worker}"),
                    now_ms,
                )?;
            } else {
                self.send_assignment(&job, rank, worker);
            }
        }
        Ok(())
    }

    fn used_slots(&self) -> HashMap<WorkerId, u32> {
        let mut used = HashMap::new();
        for job in self.jobs.values() {
            for w in job.state.placement().unwrap_or_default() {
                *used.entry(w.clone()).or_default() += 1;
            }
        }
        used
    }

    /// Places waiting jobs, oldest first; a job that does not fit gets the reason and later,
    /// smaller jobs may still start (backfill).
    fn schedule(&mut self, now_ms: i64) -> Result<(), CoordinatorError> {
        let used = self.used_slots();
        let mut free: Vec<FreeSlots> = self
            .workers
            .values()
            .filter(|w| {
                w.is_alive() && self.sessions.contains_key(&w.id) && !self.draining.contains(&w.id)
            })
            .map(|w| FreeSlots {
                worker: w.id.clone(),
                free: w
                    .slots
                    .saturating_sub(used.get(&w.id).copied().unwrap_or(0)),
            })
            .collect();
        let waiting: Vec<JobId> = self
            .order
            .iter()
            .filter(|id| self.jobs[*id].state.wants_slots())
            .cloned()
            .collect();
        let flaky: HashSet<WorkerId> = free
            .iter()
            .filter(|f| self.is_flaky(&f.worker, now_ms))
            .map(|f| f.worker.clone())
            .collect();
        for id in waiting {
            if self.jobs[&id].not_before_ms > now_ms {
                continue; // restart backoff; a later tick places it
            }
            let p = self.jobs[&id].spec.parallel;
            let mesh = Mesh::new(p.dp, p.tp, p.pp);
            let reliable: Vec<FreeSlots> = free
                .iter()
                .filter(|f| !flaky.contains(&f.worker))
                .cloned()
                .collect();
            let planned =
                scheduler::plan(&reliable, mesh).or_else(|_| scheduler::plan(&free, mesh));
            match planned {
                Ok(placement) => {
                    for w in &placement {
                        let slot = free.iter_mut().find(|f| &f.worker == w).expect("planned");
                        slot.free -= 1;
                    }
                    self.update_job(&id, now_ms, |job| job.to_scheduled(placement.clone()))?;
                    self.last_progress_ms.insert(id.clone(), now_ms);
                    let attempt = self.jobs[&id].attempt;
                    self.store.start_attempt(&id, attempt, &placement, now_ms)?;
                    let mut hosts: Vec<&str> = placement.iter().map(|w| w.0.as_str()).collect();
                    hosts.dedup();
                    self.note(
                        &id,
                        now_ms,
                        &format!("attempt {attempt} scheduled on {}", hosts.join(", ")),
                    )?;
                    for (rank, w) in placement.iter().enumerate() {
                        self.send_assignment(&id, rank as Rank, w);
                    }
                }
                Err(why) => {
                    let why = Some(why.to_string());
                    if self
                        .jobs
                        .get_mut(&id)
                        .expect("listed")
                        .set_waiting_reason(why)
                    {
                        self.update_job(&id, now_ms, |_| {})?;
                    }
                }
            }
        }
        Ok(())
    }

    fn send_assignment(&mut self, id: &JobId, rank: Rank, worker: &WorkerId) {
        let job = &self.jobs[id];
        let p = job.spec.parallel;
        let assign = pb::Assignment {
            key: Some(pb::RankKey {
                job_id: id.0.clone(),
                attempt: job.attempt,
                rank,
            }),
            world_size: p.world_size(),
            parallel: Some(pb::Parallel {
                dp: p.dp,
                tp: p.tp,
                pp: p.pp,
            }),
            spec_json: job.spec.to_json(),
            resume_step: job.resume_step,
        };
        self.send(worker, pb::coordinator_message::Body::Assign(assign));
    }

    fn send(&mut self, worker: &WorkerId, body: pb::coordinator_message::Body) {
        if let Some(session) = self.sessions.get(worker) {
            let msg = pb::CoordinatorMessage { body: Some(body) };
            if session.tx.send(Ok(msg)).is_err() {
                self.sessions.remove(worker);
            }
        }
    }

    /// Applies `change` to a job, stores it, and tells watchers.
    fn update_job(
        &mut self,
        id: &JobId,
        now_ms: i64,
        change: impl FnOnce(&mut Job),
    ) -> Result<(), CoordinatorError> {
        let mut job = self.jobs[id].clone();
        change(&mut job);
        job.updated_at_ms = now_ms;
        self.store.put_job(&job)?;
        let _ = self.updates.send(Update::Job(Box::new(job.clone())));
        self.jobs.insert(id.clone(), job);
        Ok(())
    }

    /// A coordinator line in the job's history (`gantry logs`).
    fn note(&mut self, id: &JobId, now_ms: i64, line: &str) -> Result<(), CoordinatorError> {
        let attempt = self.jobs[id].attempt;
        tracing::info!(job = %id, attempt, "{line}");
        let seq = self
            .store
            .append_event(id, now_ms, attempt, -1, "event", line)?;
        self.publish_line(id, seq, attempt, -1, "event", line, now_ms);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn publish_line(
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

/// Data-plane addresses by rank, and rank 0's NCCL unique id if it uses NCCL.
#[derive(Debug, Clone, Default)]
struct RendezvousTable {
    addresses: Vec<Option<String>>,
    nccl_unique_id: Option<Vec<u8>>,
}

/// What every rank of an attempt gets once all have reported.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerTable {
    pub addresses: Vec<String>,
    pub nccl_unique_id: Option<Vec<u8>>,
}

/// How a rank ended, for people: "was killed by signal 9", "exited with code 1: …".
fn describe_exit(exit: &RankExit) -> String {
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

/// Identifies one rank of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankKey {
    pub job: JobId,
    pub attempt: Attempt,
    pub rank: Rank,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RankExit {
    pub key: RankKey,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: String,
    /// Stopped by the worker on the coordinator's order.
    pub stopped: bool,
}

/// A worker session message, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerReport {
    Heartbeat,
    /// The worker is shutting down: place nothing more on it.
    Draining,
    Running {
        ranks: Vec<RankKey>,
        exited: Vec<RankExit>,
    },
    Progress {
        key: RankKey,
        step: u64,
        loss: f64,
        eval_loss: Option<f64>,
    },
    Exited(RankExit),
    Logs {
        key: RankKey,
        stream: String,
        lines: Vec<String>,
    },
    Checkpoint {
        key: RankKey,
        step: u64,
        url: String,
        size_bytes: u64,
        /// Older checkpoints that retention deleted after this commit.
        deleted_steps: Vec<u64>,
    },
    Test {
        key: RankKey,
        loss: f64,
        accuracy: Option<f64>,
    },
}
