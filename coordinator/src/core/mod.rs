//! The coordinator's core: the single owner of jobs, workers and sessions. Every method is
//! synchronous and takes `now_ms`, so tests drive it with any clock; the gRPC layer holds it
//! behind one lock (one command at a time, like an event loop) and only translates.
//!
//! Writes go to the store first, then to the in-memory cache, then out as events. The methods
//! live in files by concern: the job API (`jobs`), memory admission (`admission`), workers and
//! their sessions (`sessions`), what ranks report (`reports`), how attempts end (`attempts`), the rendezvous (`rendezvous`),
//! leases and hangs (`liveness`), the scheduling loop (`schedule`) and the event log (`events`).

mod admission;
mod attempts;
mod events;
mod jobs;
mod liveness;
mod rendezvous;
mod reports;
mod schedule;
mod sessions;

pub use crate::message::{
    Assignment, PeerTable, RankExit, RankKey, Registration, Update, WorkerCommand, WorkerReport,
};
pub use jobs::Resume;

use crate::error::CoordinatorError;
use crate::message::RendezvousTable;
use crate::policy::avoid::FailureLog;
use crate::state::{Job, Worker, WorkerState};
use crate::store::Store;
use gantry_core::{Attempt, JobId, WorkerId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use tokio::sync::{broadcast, mpsc};

/// Where a worker's commands go; the service encodes them onto its session stream.
pub type SessionSender = mpsc::UnboundedSender<WorkerCommand>;

#[derive(Debug, Clone)]
pub struct CoreOptions {
    /// Where checkpoints go when a spec names no `checkpoint.url`.
    pub default_checkpoint_url: String,
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    /// URL prefixes every store a spec names must start with (none: any but the forbidden).
    pub allowed_stores: Vec<String>,
}

impl CoreOptions {
    pub fn for_state_dir(state_dir: &std::path::Path) -> Self {
        let dir: PathBuf = state_dir.join("checkpoints");
        Self {
            default_checkpoint_url: format!("file://{}", dir.display()),
            heartbeat_interval_ms: 1_000,
            lease_ttl_ms: 10_000,
            allowed_stores: Vec::new(),
        }
    }
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
    worker_failures: FailureLog,
    /// What attempts' secrets are derived from (kept in the store, so they survive a restart).
    attempt_key: [u8; 32],
}

impl Core {
    /// Rebuilds the coordinator's view from the store. Workers get a fresh lease so they have
    /// time to reconnect before they are declared lost, and placed attempts a fresh hang
    /// deadline: when they last showed life was not stored, and a hung attempt must not go
    /// unwatched until it reports a step it may never report.
    pub fn load(store: Store, options: CoreOptions, now_ms: i64) -> Result<Self, CoordinatorError> {
        let jobs_list = store.jobs()?;
        let order = jobs_list.iter().map(|j| j.id.clone()).collect();
        let last_progress_ms = jobs_list
            .iter()
            .filter(|j| j.state.placement().is_some())
            .map(|j| (j.id.clone(), now_ms))
            .collect();
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
        let attempt_key = store.key("attempt-secrets")?;
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
            last_progress_ms,
            worker_failures: FailureLog::default(),
            attempt_key,
        })
    }

    pub fn options(&self) -> &CoreOptions {
        &self.options
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// The secret of an attempt: its ranks get it with their assignment.
    pub fn attempt_secret(&self, job: &JobId, attempt: Attempt) -> gantry_core::AttemptSecret {
        gantry_core::AttemptSecret::derive(&self.attempt_key, &job.0, attempt.get())
    }

    fn is_live(&self, key: &RankKey) -> bool {
        self.jobs
            .get(&key.job)
            .is_some_and(|j| j.attempt == key.attempt && j.state.placement().is_some())
    }
}
