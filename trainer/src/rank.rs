//! The entry point of a rank process: open the data, meet the other ranks through the
//! coordinator, connect (TCP between cpu ranks, NCCL between cuda ranks), train. Exit code 0
//! means the rank finished its steps; anything else ends the attempt.

use crate::bert::Bert;
use crate::control::{Drained, drain_on_sigterm};
use crate::data::{Dataset, Split};
use crate::llama::{Llama, LlamaStage};
use crate::model::{Gpt, GptStage, Mlp, MlpStage};
use crate::report::Reporter;
use crate::train::{RankJob, train};
use crate::world;
use gantry_collective::World;
use gantry_collective::tcp::{Identity, TcpComm};
use gantry_core::spec::DeviceKind;
use gantry_core::{ExitCode, JobSpec, Mesh, ModelKind, RankAssignment};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// Runs the rank described by the assignment file at `assignment_path`, and returns its exit
/// code ([`ExitCode`]).
pub fn run(assignment_path: &Path) -> i32 {
    keep_freed_memory();
    let code = match run_inner(assignment_path) {
        Ok(()) => ExitCode::Finished,
        Err(e) if e.downcast_ref::<Drained>().is_some() => {
            eprintln!("{e}");
            ExitCode::Drained
        }
        Err(e) => {
            eprintln!("rank failed: {e:#}");
            e.downcast_ref::<Stale>()
                .map_or(ExitCode::Failed, |_| ExitCode::Stale)
        }
    };
    code.code()
}

#[derive(Debug, thiserror::Error)]
#[error("attempt is no longer live: {0}")]
struct Stale(String);

fn run_inner(assignment_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(assignment_path)?;
    let a: RankAssignment = serde_json::from_str(&text)?;
    let _span = init_tracing(&a);
    let mut spec = JobSpec::from_json(&a.spec_json)?;
    crate::device::set_default(&spec);
    drain_on_sigterm();
    // The daemon holds our stdin; when it dies, so do we (no orphaned ranks).
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        // Not eprintln!: stderr went with the daemon, and a panic here would only end this
        // thread, leaving the rank running.
        let _ = writeln!(std::io::stderr(), "worker daemon went away; exiting");
        std::process::exit(ExitCode::Orphaned.code());
    });
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The data is opened before meeting the others: a bad dataset fails every rank alike, early,
    // and a dataset's tokenizer sizes the model.
    let loading = Instant::now();
    let data = Dataset::open(&spec, &a.store_options, &io)?;
    let loaded = loading.elapsed();
    data.fit_spec(&mut spec)?;
    let timeout = Duration::from_secs(spec.fault_tolerance.collective_timeout_secs);
    let p = spec.parallel;
    let mesh = Mesh::new(p.dp, p.tp, p.pp);
    let rank = a.rank.get();
    let mut comm: Box<dyn World> = match spec.resources.device {
        DeviceKind::Cpu => {
            let listener = TcpListener::bind((a.advertise_host.as_str(), 0))?;
            let address = format!("{}:{}", a.advertise_host, listener.local_addr()?.port());
            let met = io.block_on(rendezvous(&a, address, Vec::new(), timeout))?;
            Box::new(TcpComm::connect(
                listener,
                &met.peers,
                rank,
                Identity::new(a.job_id.as_str(), a.attempt.get(), a.attempt_secret.key()),
                timeout,
            )?)
        }
        DeviceKind::Cuda => {
            // NCCL connects the ranks itself: the rendezvous carries its ids.
            let led = world::nccl_ids_to_send(mesh, rank, world::new_nccl_id)?;
            let met = io.block_on(rendezvous(&a, a.advertise_host.clone(), led, timeout))?;
            let groups = world::nccl_ids_of(mesh, rank, &met.nccl_groups)?;
            world::nccl(mesh, rank, groups, timeout)?
        }
    };
    let job = RankJob {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        spec,
        resume_step: a.resume_step,
        store_options: a.store_options.clone(),
        dataset_sha256: data.manifest_sha256().map(str::to_owned),
    };
    let reporter = Reporter::for_rank(&job.spec, a.rank.get());
    if let Some(url) = job
        .spec
        .dataset()
        .filter(|_| !data.label_names().is_empty())
    {
        reporter.log(&format!(
            "dataset {url}: {} labelled training documents ({}), cut to {} tokens, read and \
             verified in {:.2} s",
            data.len(Split::Train),
            data.label_names().join(", "),
            job.spec.data.seq_len,
            loaded.as_secs_f64()
        ));
    } else if let Some(url) = job.spec.dataset() {
        reporter.log(&format!(
            "dataset {url}: {} training samples of {} tokens, read and verified in {:.2} s",
            data.len(Split::Train),
            job.spec.data.seq_len + 1,
            loaded.as_secs_f64()
        ));
    }
    let over = match job.spec.resources.device {
        DeviceKind::Cpu => "TCP",
        DeviceKind::Cuda => "NCCL",
    };
    reporter.log(&format!(
        "rank {}/{} of {} attempt {} connected over {over}",
        a.rank, a.world_size, a.job_id, a.attempt
    ));
    // A whole model per rank when only data parallelism is used; the stage (and shard) types
    // otherwise.
    let split = job.spec.parallel.pp > 1 || job.spec.parallel.tp > 1;
    match (job.spec.model.kind, split) {
        (ModelKind::Mlp, false) => train::<Mlp>(&job, &data, &mut *comm, &reporter, &io)?,
        (ModelKind::Mlp, true) => train::<MlpStage>(&job, &data, &mut *comm, &reporter, &io)?,
        (ModelKind::Gpt, false) => train::<Gpt>(&job, &data, &mut *comm, &reporter, &io)?,
        (ModelKind::Gpt, true) => train::<GptStage>(&job, &data, &mut *comm, &reporter, &io)?,
        (ModelKind::Llama, false) => train::<Llama>(&job, &data, &mut *comm, &reporter, &io)?,
        (ModelKind::Llama, true) => train::<LlamaStage>(&job, &data, &mut *comm, &reporter, &io)?,
        // One type serves the bert at every layout (a whole model is its one stage).
        (ModelKind::Bert, _) => train::<Bert>(&job, &data, &mut *comm, &reporter, &io)?,
    };
    Ok(())
}

/// Sends this process's `tracing` events to stderr, as text or JSON like its daemon's
/// (`RUST_LOG` filters them), inside a span that names the job, attempt and rank. The daemon
/// forwards a rank's stderr into the job's logs.
fn init_tracing(a: &RankAssignment) -> tracing::span::EnteredSpan {
    let format = if a.log_json {
        gantry_ops::LogFormat::Json
    } else {
        gantry_ops::LogFormat::Text
    };
    gantry_ops::init_logging(format, "info");
    tracing::info_span!("rank", job = %a.job_id, attempt = a.attempt.get(), rank = a.rank.get())
        .entered()
}

/// What the rendezvous hands every rank of an attempt.
struct Met {
    /// Data-plane addresses, by rank.
    peers: Vec<String>,
    /// Every NCCL group id of the attempt (a cuda job's).
    nccl_groups: Vec<(Vec<u32>, Vec<u8>)>,
}

/// Reports this rank's address (and the NCCL ids of the groups it leads) and waits for the
/// whole table.
async fn rendezvous(
    a: &RankAssignment,
    address: String,
    nccl_groups: Vec<world::NcclGroup>,
    timeout: Duration,
) -> anyhow::Result<Met> {
    let deadline = Instant::now() + timeout;
    let request = pb::RendezvousRequest {
        protocol_version: PROTOCOL_VERSION,
        key: Some(pb::RankKey {
            job_id: a.job_id.to_string(),
            attempt: a.attempt.get(),
            rank: a.rank.get(),
        }),
        address,
        attempt_secret: a.attempt_secret.0.clone(),
        nccl_groups: nccl_groups
            .into_iter()
            .map(|(members, id)| pb::NcclGroupId {
                members,
                unique_id: id.to_vec(),
            })
            .collect(),
    };
    let mut client = None;
    loop {
        if client.is_none() {
            let endpoint = gantry_proto::endpoint(
                &a.coordinator,
                a.coordinator_ca.as_ref().map(|c| c.as_bytes()),
            )
            .map_err(|e| anyhow::anyhow!("coordinator: {e}"))?;
            client = match endpoint.connect().await {
                Ok(channel) => Some(pb::worker_service_client::WorkerServiceClient::new(channel)),
                Err(_) => None,
            };
        }
        if let Some(c) = client.as_mut() {
            match c.rendezvous(request.clone()).await {
                Ok(r) if !r.get_ref().peers.is_empty() => {
                    let r = r.into_inner();
                    return Ok(Met {
                        peers: r.peers,
                        nccl_groups: r
                            .nccl_groups
                            .into_iter()
                            .map(|g| (g.members, g.unique_id))
                            .collect(),
                    });
                }
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::Aborted => {
                    return Err(Stale(s.message().into()).into());
                }
                Err(s) if s.code() == tonic::Code::Unavailable => client = None,
                // Over the coordinator's rate limit: ask again after the pause below.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
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
