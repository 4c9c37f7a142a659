//! What workers report to the core and what the core tells workers to do, as plain core types.
//! `convert.rs` maps them from and to the wire; the core never sees a proto message, so its
//! decisions can be tested without gRPC.

use crate::state::{Gpu, Job};
use crate::store::EventRow;
use gantry_core::{Attempt, JobId, JobSpec, Rank, WorkerId};

/// What a worker says about itself when it (re)registers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Registration {
    /// The id the coordinator gave it before; none on its first registration.
    pub worker_id: Option<WorkerId>,
    pub hostname: String,
    pub slots: u32,
    pub devices: Vec<String>,
    /// 0: unknown.
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
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
        eval_metrics: Option<gantry_core::ClassMetrics>,
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
        metrics: Option<gantry_core::ClassMetrics>,
    },
}

/// What the core tells one worker to do, down its session stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerCommand {
    /// Start one rank of an attempt (boxed: it carries the whole spec, and stops are many).
    Assign(Box<Assignment>),
    /// Stop every rank of `job` whose attempt is below `below_attempt`.
    Stop {
        job: JobId,
        below_attempt: Attempt,
        reason: String,
    },
}

/// One rank's assignment: the spec it trains and where it resumes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub key: RankKey,
    pub spec: JobSpec,
    /// The checkpoint step a manual resume pinned; none: the newest.
    pub resume_step: Option<u64>,
    /// The worker's GPU this rank alone uses (a cuda job); none for a cpu job.
    pub gpu: Option<u32>,
    /// The attempt's secret (its `Debug` does not print it).
    pub secret: gantry_core::AttemptSecret,
}

/// Something that happened to a job, for watchers.
#[derive(Debug, Clone)]
pub enum Update {
    /// The job as it is now (state change or progress).
    Job(Box<Job>),
    /// A stored event line.
    Line(EventRow),
}

/// Data-plane addresses by rank, and the NCCL group ids each rank sent (cuda jobs).
#[derive(Debug, Clone, Default)]
pub struct RendezvousTable {
    pub addresses: Vec<Option<String>>,
    /// By the rank that sent them: the ids of the groups it leads.
    pub nccl_groups: Vec<Vec<NcclGroup>>,
}

/// One NCCL communicator of an attempt: a group of the mesh and its first member's unique id.
#[derive(Debug, Clone, PartialEq)]
pub struct NcclGroup {
    pub members: Vec<u32>,
    pub unique_id: Vec<u8>,
}

/// What every rank of an attempt gets once all have reported.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerTable {
    pub addresses: Vec<String>,
    pub nccl_groups: Vec<NcclGroup>,
}
