//! Checkpoints in the background: a snapshot of the state (handles only), serialised and
//! uploaded on a low-priority thread while training goes on, and rank 0's commit once every
//! shard is up, also off the training thread.

use crate::job::RankJob;
use crate::report::Reporter;
use backon::{ExponentialBuilder, Retryable};
use burn::module::Module;
use gantry_checkpoint::{self as checkpoint, CheckpointStore, LossScale, Manifest, Shard};
use gantry_collective::{ReduceOp, World};
use gantry_core::Rank;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// This rank's state at a step. Taking it only clones handles: tensors are immutable and
/// shared, so the steps that follow cannot change what it holds. Serialising it is the
/// expensive part, which an asynchronous checkpoint leaves to its upload thread.
pub struct Snapshot<M> {
    model: M,
    optimizer: burn::optim::ModuleOptimizer,
    step: u64,
    reported: (f64, Option<f64>),
    loss_scale: Option<LossScale>,
}

pub fn snapshot<M: Module + Clone>(
    model: &M,
    optimizer: &burn::optim::ModuleOptimizer,
    step: u64,
    reported: (f64, Option<f64>),
) -> Snapshot<M> {
    Snapshot {
        model: model.clone(),
        optimizer: optimizer.clone(),
        step,
        reported,
        loss_scale: None,
    }
}

impl<M: Module> Snapshot<M> {
    /// Keeps fp16 training's loss scale with the state.
    pub fn with_loss_scale(self, loss_scale: Option<LossScale>) -> Self {
        Self { loss_scale, ..self }
    }

    /// Serialises the state (burnpack records) into a shard.
    ///
    /// The records are taken first, and the snapshot's handles dropped with them: until then
    /// the training's next optimizer step cannot update the shared buffers in place and has to
    /// allocate new ones. Taking the records is a copy of the state (tens of milliseconds),
    /// so the handles are gone long before that step ends.
    pub fn into_shard(self) -> anyhow::Result<Shard> {
        let (loss, eval_loss) = self.reported;
        let model = self.model.into_record();
        let optimizer = self.optimizer.to_record();
        drop(self.optimizer);
        Ok(Shard {
            model: model
                .into_bytes()
                .map(crate::records::shared)
                .map_err(|e| anyhow::anyhow!("model record: {e:?}"))?,
            optimizer: optimizer
                .into_bytes()
                .map(crate::records::shared)
                .map_err(|e| anyhow::anyhow!("optimizer record: {e:?}"))?,
            data_cursor: self.step,
            loss: Some(loss),
            eval_loss,
            loss_scale: self.loss_scale,
        })
    }
}

/// The manifest of this rank's job's checkpoint at `step`.
pub fn manifest(job: &RankJob, world: u32, step: u64) -> Manifest {
    let p = job.spec.parallel;
    Manifest {
        format: checkpoint::FORMAT,
        job_id: job.job_id.clone(),
        step,
        attempt: job.attempt,
        world_size: world,
        dp: p.dp,
        tp: p.tp,
        pp: p.pp,
        files: Vec::new(),
        total_bytes: 0,
        dataset_sha256: job.dataset_sha256.clone(),
    }
}

/// Rank 0's commit of a step once every shard of it is written.
pub fn commit(
    store: &CheckpointStore,
    manifest: Manifest,
    keep_last: u32,
    started: Instant,
    reporter: &Reporter,
    io: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let step = manifest.step;
    let (size, deleted) = match io.block_on(store.commit(manifest, keep_last)) {
        Ok(done) => done,
        // A run resumed from before this step passes it again, and the first commit of it has
        // been damaged since: it stays as it is (resumes skip it) and training goes on to the
        // next checkpoint.
        Err(checkpoint::CheckpointError::Corrupt { message, .. }) => {
            reporter.log(&format!(
                "checkpoint at step {step} not committed: an earlier commit of it is damaged \
                 ({message}) and stays as it is"
            ));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let seconds = started.elapsed().as_secs_f64();
    reporter.checkpoint(step, &store.step_url(step), size, deleted, seconds);
    Ok(())
}

/// A task on a thread of its own, at the lowest priority, with a current-thread Tokio runtime
/// (its I/O threads at the lowest priority too) and its own client for the store: a client's
/// pooled connections are driven by the runtime that opened them, so sharing the training
/// thread's could leave a request waiting on a connection nobody drives.
pub struct Background {
    /// How the task ended; set when it ends, whatever happens (a panic included).
    outcome: Arc<OnceLock<Result<(), String>>>,
}

impl Background {
    pub fn run(
        store: &CheckpointStore,
        work: impl FnOnce(&CheckpointStore, &tokio::runtime::Runtime) -> Result<(), String>
        + Send
        + 'static,
    ) -> Self {
        let outcome = Arc::new(OnceLock::new());
        let result = Arc::clone(&outcome);
        let store = store.clone();
        let task = move || -> Result<(), String> {
            yield_to_training();
            let io = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_start(yield_to_training)
                .build()
                .map_err(|e| e.to_string())?;
            let store = store.reopen().map_err(|e| e.to_string())?;
            work(&store, &io)
        };
        std::thread::spawn(move || {
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task))
                .unwrap_or_else(|_| Err("the thread panicked".into()));
            let _ = result.set(ended);
        });
        Self { outcome }
    }

    /// A task with nothing to do: it has ended well.
    fn done() -> Self {
        Self {
            outcome: Arc::new(OnceLock::from(Ok(()))),
        }
    }

    /// How the task ended, if it has.
    pub fn ended(&self) -> Option<&Result<(), String>> {
        self.outcome.get()
    }

    /// Waits for the task to end, and says how it went.
    pub fn wait(&self) -> Result<(), String> {
        self.outcome.wait().clone()
    }
}

/// Rank 0's commit of a checkpoint whose every shard is uploaded, on a thread of its own like
/// the uploads: reading the ranks' states, the manifest's conditional put, the `latest` pointer
/// and retention are store round trips (tens of milliseconds on a local disk, more on a
/// network store) that training need not wait for. It is part of the checkpoint in flight:
/// the next checkpoint and the end of the run wait for it, and a failed commit fails the
/// rank as it did when it ran on the training thread.
pub struct Commit {
    step: u64,
    task: Background,
}

impl Commit {
    pub fn start(
        store: &CheckpointStore,
        manifest: Manifest,
        keep_last: u32,
        started: Instant,
        reporter: &Reporter,
    ) -> Self {
        let step = manifest.step;
        let reporter = reporter.clone();
        let task = Background::run(store, move |store, io| {
            commit(store, manifest, keep_last, started, &reporter, io).map_err(|e| format!("{e:#}"))
        });
        Self { step, task }
    }

    pub fn ended(&self) -> bool {
        self.task.ended().is_some()
    }

    pub fn wait(self) -> anyhow::Result<()> {
        let step = self.step;
        self.task
            .wait()
            .map_err(|e| anyhow::anyhow!("commit of the checkpoint at step {step} failed: {e}"))
    }
}

/// A checkpoint shard being written by a background thread (at most one per rank). The
/// upload is retried with backoff; the checkpoint is committed only once every rank's upload
/// succeeded, which the ranks learn from the flags they add to each step's all-reduce.
pub struct Upload {
    step: u64,
    started: Instant,
    task: Background,
}

/// Gives the calling thread the lowest priority (nice 19): beside a busy training step it gets
/// a small share of the CPU, so a checkpoint upload delays the training little and still
/// always progresses. (`SCHED_IDLE` starved uploads to a network store for minutes while two
/// CPU ranks kept both cores busy.) Linux applies nice values per thread; elsewhere, a no-op.
fn yield_to_training() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread.
        let failed = unsafe {
            let tid = libc::gettid() as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19)
        } != 0;
        if failed {
            tracing::debug!(
                "could not lower the upload thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Upload {
    /// Serialises and uploads `snapshot` on a background thread (and its I/O threads), at the
    /// lowest priority, retrying failed writes with backoff.
    pub fn start<M: Module + Send + 'static>(
        store: CheckpointStore,
        step: u64,
        rank: Rank,
        snapshot: Snapshot<M>,
        started: Instant,
    ) -> Self {
        let task = Background::run(&store, move |store, io| {
            let shard = snapshot.into_shard().map_err(|e| e.to_string())?;
            io.block_on(
                (|| store.write_shard(step, rank, shard.clone()))
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_times(3),
                    )
                    .notify(|e, wait| {
                        eprintln!(
                            "checkpoint upload of step {step} failed ({e}); retrying in {wait:?}"
                        )
                    }),
            )
            .map_err(|e| e.to_string())
        });
        Self {
            step,
            started,
            task,
        }
    }

    /// The part of a checkpoint of a rank that writes nothing (another replica writes its
    /// position's shard): it has ended well, and takes part in settling the checkpoint as an
    /// upload does.
    pub fn nothing(step: u64, started: Instant) -> Self {
        Self {
            step,
            started,
            task: Background::done(),
        }
    }

    /// Whether the upload has ended.
    pub fn ended(&self) -> bool {
        self.task.ended().is_some()
    }

    /// Waits for the upload to end, and says how it went.
    pub fn wait(&self) -> Result<(), String> {
        self.task.wait()
    }

    /// (finished well, failed), for the step's control flags.
    pub fn flags(&self) -> (bool, bool) {
        match self.task.ended() {
            None => (false, false),
            Some(Ok(())) => (true, false),
            Some(Err(_)) => (false, true),
        }
    }

    /// Settles the upload once every rank's has ended, given whether any failed: rank 0
    /// starts the commit of a checkpoint whose every shard is uploaded; otherwise nobody
    /// commits, and the logs say why.
    pub fn settle(
        self,
        any_failed: bool,
        job: &RankJob,
        store: &CheckpointStore,
        world: u32,
        reporter: &Reporter,
    ) -> Option<Commit> {
        if any_failed {
            let why = match self.task.wait() {
                Err(e) => format!("this rank's upload failed: {e}"),
                Ok(()) => "another rank's upload failed".into(),
            };
            reporter.log(&format!(
                "checkpoint at step {} not committed: {why}",
                self.step
            ));
            return None;
        }
        (job.rank == Rank::LEADER).then(|| {
            let keep_last = job.spec.checkpoint.keep_last;
            let manifest = manifest(job, world, self.step);
            Commit::start(store, manifest, keep_last, self.started, reporter)
        })
    }

    /// Settles the upload now: waits for this rank's to end, then a world all-reduce tells
    /// whether any rank's failed.
    pub fn finish(
        self,
        job: &RankJob,
        store: &CheckpointStore,
        comm: &mut dyn World,
        reporter: &Reporter,
    ) -> anyhow::Result<Option<Commit>> {
        let mut failed = [if self.task.wait().is_err() { 1.0 } else { 0.0 }];
        comm.world().all_reduce(&mut failed, ReduceOp::Sum)?;
        Ok(self.settle(failed[0] > 0.0, job, store, comm.world_size(), reporter))
    }
}
