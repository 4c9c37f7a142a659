//! The entry point of a rank process: meet the other ranks through the coordinator, connect
//! the ring, train. Exit code 0 means the rank finished its steps; anything else ends the attempt.

use crate::runtime::comm::tcp::{Identity, TcpComm};
use crate::runtime::model::{Gpt, GptStage, Mlp, MlpStage};
use crate::runtime::report::Reporter;
use crate::runtime::train::{RankJob, train};
use gantry_core::{JobSpec, ModelKind};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the worker daemon hands a rank process (written to a file it passes by path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankAssignment {
    pub coordinator: String,
    /// The address other ranks reach this one on.
    pub advertise_host: String,
    pub job_id: String,
    pub attempt: u64,
    pub rank: u32,
    pub world_size: u32,
    pub spec_json: String,
    pub resume_step: Option<u64>,
    /// The worker's checkpoint store options (`object_store` in its config file).
    #[serde(default)]
    pub store_options: std::collections::BTreeMap<String, String>,
}

/// Exit code of a rank whose attempt was superseded before it started.
pub const EXIT_STALE: i32 = 75;
/// Exit code of a rank whose worker daemon went away.
pub const EXIT_ORPHANED: i32 = 70;
/// Exit code of a rank that saved a checkpoint and stopped because a worker of its attempt is
/// draining (SIGTERM): the coordinator restarts the job elsewhere without using its budget.
pub const EXIT_DRAINED: i32 = 76;

static DRAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this rank was asked (SIGTERM) to checkpoint and stop at the next step.
pub fn drain_requested() -> bool {
    DRAIN.load(std::sync::atomic::Ordering::SeqCst)
}

extern "C" fn on_sigterm(_: libc::c_int) {
    DRAIN.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The error a rank ends with after a drain checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("checkpointed at step {0} and stopped: a worker is draining")]
pub struct Drained(pub u64);

/// Keeps freed memory in the process's heap instead of handing it back to the kernel.
///
/// A checkpoint allocates buffers as large as the model and the optimizer state: the steps
/// after a snapshot cannot update the buffers it shares in place and allocate new ones, and
/// the upload thread serialises the state into records. With glibc's defaults, every one of
/// those allocations gets fresh pages from the kernel (allocations over 32 MiB are mapped on
/// their own, and a thread other than the main one gets an arena of its own whose heaps cannot
/// hold them at all), and faulting them in costs about 1 ms of kernel time per MiB: on a
/// 120 MiB state, about 30 ms on the training thread and 110 ms on the upload thread at every
/// checkpoint. With one arena and no separate mappings below 1 GiB, they reuse warm pages of
/// the heap. The price is a resident size that stays at its peak, which a rank reaches at
/// every checkpoint anyway, and one lock for the rank's few threads (small allocations do not
/// take it: they come from per-thread caches).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

pub fn run(assignment_path: &Path) -> i32 {
    keep_freed_memory();
    match run_inner(assignment_path) {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<Drained>().is_some() => {
            eprintln!("{e}");
            EXIT_DRAINED
        }
        Err(e) => {
            eprintln!("rank failed: {e:#}");
            e.downcast_ref::<Stale>().map_or(1, |_| EXIT_STALE)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("attempt is no longer live: {0}")]
struct Stale(String);

fn run_inner(assignment_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(assignment_path)?;
    let a: RankAssignment = serde_json::from_str(&text)?;
    let spec = JobSpec::from_json(&a.spec_json)?;
    // SIGTERM (from a draining worker) asks for a checkpoint and a clean stop at the next step.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    // The daemon holds our stdin; when it dies, so do we (no orphaned ranks).
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        // Not eprintln!: stderr went with the daemon, and a panic here would only end this
        // thread, leaving the rank running.
        let _ = writeln!(std::io::stderr(), "worker daemon went away; exiting");
        std::process::exit(EXIT_ORPHANED);
    });
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs(spec.fault_tolerance.collective_timeout_secs);
    let listener = TcpListener::bind((a.advertise_host.as_str(), 0))?;
    let address = format!("{}:{}", a.advertise_host, listener.local_addr()?.port());
    let peers = io.block_on(rendezvous(&a, address, timeout))?;
    let mut comm = TcpComm::connect(
        listener,
        &peers,
        a.rank,
        Identity::new(&a.job_id, a.attempt),
        timeout,
    )?;
    let job = RankJob {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        spec,
        resume_step: a.resume_step,
        store_options: a.store_options.clone(),
    };
    let reporter = Reporter::for_rank(&job.spec, a.rank);
    reporter.log(&format!(
        "rank {}/{} of {} attempt {} connected",
        a.rank, a.world_size, a.job_id, a.attempt
    ));
    // A whole model per rank when only data parallelism is used; the stage (and shard) types
    // otherwise.
    let split = job.spec.parallel.pp > 1 || job.spec.parallel.tp > 1;
    match (job.spec.model.kind, split) {
        (ModelKind::Mlp, false) => train::<Mlp>(&job, &mut comm, &reporter, &io)?,
        (ModelKind::Mlp, true) => train::<MlpStage>(&job, &mut comm, &reporter, &io)?,
        (ModelKind::Gpt, false) => train::<Gpt>(&job, &mut comm, &reporter, &io)?,
        (ModelKind::Gpt, true) => train::<GptStage>(&job, &mut comm, &reporter, &io)?,
    };
    Ok(())
}

/// Reports this rank's address and waits for the whole peer table.
async fn rendezvous(
    a: &RankAssignment,
    address: String,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let request = pb::RendezvousRequest {
        protocol_version: PROTOCOL_VERSION,
        key: Some(pb::RankKey {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
        }),
        address,
        nccl_unique_id: None,
    };
    let mut client = None;
    loop {
        if client.is_none() {
            client = pb::worker_service_client::WorkerServiceClient::connect(a.coordinator.clone())
                .await
                .ok();
        }
        if let Some(c) = client.as_mut() {
            match c.rendezvous(request.clone()).await {
                Ok(r) if !r.get_ref().peers.is_empty() => return Ok(r.into_inner().peers),
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::Aborted => {
                    return Err(Stale(s.message().into()).into());
                }
                Err(s) if s.code() == tonic::Code::Unavailable => client = None,
                Err(s) => anyhow::bail!("rendezvous refused: {}", s.message()),
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "rendezvous timed out after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
