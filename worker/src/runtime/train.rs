//! The training loop of one rank.
//!
//! Each step: every dp rank takes its contiguous share of the global batch and its [`Stage`]
//! turns the micro-batches into summed gradients (a whole model, or one pipeline stage); the
//! gradients are flattened into one buffer with the loss appended, all-reduced over the
//! data-parallel group in buckets (average), clipped by the global norm (summed over pipeline
//! stages), and Adam steps with the scheduled learning rate. Replicas start from the same seed
//! and apply identical averaged gradients, so they stay bit-identical.

use crate::runtime::checkpoint::{self, CheckpointStore, Manifest, Shard};
use crate::runtime::comm::tcp::TcpComm;
use crate::runtime::comm::{Communicator, ReduceOp};
use crate::runtime::data::{Dataset, Split, shard};
use crate::runtime::rank::{Drained, drain_requested};
use crate::runtime::report::{Reporter, StepReport};
use crate::runtime::reshard::{reshard, sources};
use crate::runtime::stage::{Stage, StepContext};
use backon::{ExponentialBuilder, Retryable};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::store::ModuleRecord;
use gantry_core::{JobSpec, Mesh};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use std::time::Instant;

/// Everything a rank needs to train.
pub struct RankJob {
    pub job_id: String,
    pub attempt: u64,
    pub rank: u32,
    pub spec: JobSpec,
    /// Resume from exactly this step instead of the newest verified checkpoint.
    pub resume_step: Option<u64>,
    /// The worker's checkpoint store options (the spec's own go over them).
    pub store_options: checkpoint::Options,
}

/// Linear warm-up to `lr`, then cosine decay to 10% of it at the last step.
pub fn learning_rate(spec: &JobSpec, step: u64) -> f64 {
    let t = &spec.train;
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let decay_steps = (t.steps - t.warmup_steps).max(1) as f64;
    let progress = ((step - t.warmup_steps) as f64 / decay_steps).min(1.0);
    let min_lr = 0.1 * t.lr;
    min_lr + 0.5 * (t.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Adds each parameter's gradient into a flat buffer, in visiting order (the same on every replica).
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    out: &'a mut Vec<f32>,
    offset: usize,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.val().shape().num_elements();
        if self.out.len() < self.offset + n {
            self.out.resize(self.offset + n, 0.0);
        }
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let values = grad.into_data().convert::<f32>();
            let values = values.as_slice::<f32>().expect("f32 gradients");
            for (dst, src) in self.out[self.offset..self.offset + n]
                .iter_mut()
                .zip(values)
            {
                *dst += src;
            }
        }
        self.offset += n;
    }
}

/// Rebuilds per-parameter gradients from the flat, averaged buffer.
struct Unflatten<'a> {
    flat: &'a [f32],
    offset: usize,
    device: Device,
    grads: GradientsParams,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        let values = self.flat[self.offset..self.offset + n].to_vec();
        self.offset += n;
        let grad = Tensor::<D>::from_data(TensorData::new(values, shape), &self.device);
        self.grads.register(param.id, grad);
    }
}

/// The squared norm of this rank's gradients in `flat` (in visiting order): of the parameters in
/// `sharded`, and of the others (replicated over the tp group) only with `count_replicated`.
fn squared_norm<M: Module>(
    model: &M,
    flat: &[f32],
    sharded: &HashSet<ParamId>,
    count_replicated: bool,
) -> f32 {
    struct Norm<'a> {
        flat: &'a [f32],
        sharded: &'a HashSet<ParamId>,
        count_replicated: bool,
        offset: usize,
        sum: f64,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().shape().num_elements();
            if self.count_replicated || self.sharded.contains(&param.id) {
                self.sum += self.flat[self.offset..self.offset + n]
                    .iter()
                    .map(|g| f64::from(*g) * f64::from(*g))
                    .sum::<f64>();
            }
            self.offset += n;
        }
    }
    let mut norm = Norm {
        flat,
        sharded,
        count_replicated,
        offset: 0,
        sum: 0.0,
    };
    model.visit(&mut norm);
    norm.sum as f32
}

/// Adds the gradients of one backward pass into `flat`, parameter by parameter in visiting order.
pub(crate) fn accumulate_gradients<M: Module>(
    grads: burn::tensor::Gradients,
    model: &M,
    flat: &mut Vec<f32>,
) {
    let mut grads = GradientsParams::from_grads(grads, model);
    model.visit(&mut Flatten {
        grads: &mut grads,
        out: flat,
        offset: 0,
    });
}

/// Trains this rank's stage `S` from the newest checkpoint (or from scratch) to the last step.
pub fn train<S: Stage>(
    job: &RankJob,
    comm: &mut TcpComm,
    reporter: &Reporter,
    io: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let spec = &job.spec;
    let t = &spec.train;
    let p = spec.parallel;
    let mesh = Mesh::new(p.dp, p.tp, p.pp);
    let coords = mesh.coords(job.rank);
    let dp_members = mesh.dp_group(job.rank);
    let pp_members = mesh.pp_group(job.rank);
    let tp_members = mesh.tp_group(job.rank);
    let dp = dp_members.len();
    let dp_rank = coords.dp as usize;
    let bucket = ((p.bucket_mb * (1 << 20) as f64 / 4.0) as usize).max(1);
    let device = Device::flex();
    device.seed(t.seed);
    let ad = if t.activation_checkpointing {
        device.clone().autodiff().gradient_checkpointing()
    } else {
        device.clone().autodiff()
    };
    let mut model = S::init(spec, mesh, job.rank, &ad);
    let mut optimizer = AdamConfig::new().init();
    let data = Dataset::for_spec(spec);
    let store = CheckpointStore::for_job(&spec.checkpoint, &job.job_id, &job.store_options)?;

    if job.rank == 0 {
        // From now on, no older attempt of this job may commit a checkpoint.
        io.block_on(store.fence(job.attempt))?;
    }
    let fresh = || {
        model
            .clone()
            .into_record()
            .into_bytes()
            .map(checkpoint::shared)
            .map_err(|e| anyhow::anyhow!("model record: {e:?}"))
    };
    let restored = restore_point(job, mesh, &fresh, comm, reporter, &store, io)?;
    let mut start = 0;
    let mut last_eval = None;
    if let Some((manifest, shard)) = restored {
        let record = ModuleRecord::from_bytes(checkpoint::record(shard.model))
            .map_err(|e| anyhow::anyhow!("model record: {e:?}"))?;
        model = model.load_record(record);
        optimizer = optimizer
            .from_bytes(checkpoint::record(shard.optimizer))
            .map_err(|e| anyhow::anyhow!("optimizer record: {e:?}"))?;
        start = shard.data_cursor;
        let layout = if (manifest.tp, manifest.pp) == (mesh.tp, mesh.pp) {
            String::new()
        } else {
            format!(
                ", resharded from dp={} tp={} pp={}",
                manifest.dp, manifest.tp, manifest.pp
            )
        };
        reporter.log(&format!(
            "resumed from checkpoint at step {} (attempt {}, saved at world size {}{layout})",
            manifest.step, manifest.attempt, manifest.world_size
        ));
        if let Some(loss) = shard.loss {
            reporter.progress(&StepReport {
                step: start,
                total: t.steps,
                loss,
                eval_loss: shard.eval_loss,
                grad_norm: None,
                lr: learning_rate(spec, start.saturating_sub(1)),
                samples_per_sec: 0.0,
                step_seconds: 0.0,
                allreduce_gbps: None,
            });
        }
        last_eval = shard.eval_loss;
    }

    // What a stage sees of this rank; rebuilt for each use because it borrows the communicator.
    macro_rules! step_context {
        () => {
            StepContext {
                spec,
                data: &data,
                comm: &mut *comm,
                mesh,
                rank: job.rank,
                device: ad.clone(),
            }
        };
    }
    let micro = t.micro_batches as usize;
    let sharded: HashSet<ParamId> = model.tp_sharded().into_iter().collect();
    let world = comm.world_size();
    let writes = checkpoint::writes_shard(mesh, coords);
    let mut upload: Option<Upload> = None;
    // Rank 0's commit of the checkpoint in flight, once every shard of it is uploaded.
    let mut committing: Option<Commit> = None;
    let mut flat = Vec::new();
    for step in start..t.steps {
        let started = Instant::now();
        let global = data.global_batch_indices(step, t.global_batch as usize);
        let local = shard(&global, dp_rank, dp);
        let per_micro = local.len() / micro;
        let micro_batches: Vec<&[usize]> = local.chunks(per_micro).take(micro).collect();
        flat.iter_mut().for_each(|v| *v = 0.0);
        let mut ctx = step_context!();
        let loss_sum = model.accumulate(&mut ctx, &micro_batches, &mut flat)?;
        // Average over micro-batches and replicas. The loss rides along in the slot after the
        // gradients, then control flags that add up over every rank of the job (over dp here,
        // over tp and pp with the norm below), so all ranks learn them in the same step:
        // SIGTERM seen (drain), and this rank's background upload finished or failed.
        let n_params = flat.len();
        flat.push(loss_sum);
        let (uploaded, upload_failed) = upload.as_ref().map_or((0.0, 0.0), Upload::flags);
        flat.extend([
            if drain_requested() { 1.0 } else { 0.0 },
            uploaded,
            upload_failed,
        ]);
        let scale = 1.0 / (micro * dp) as f32;
        flat.iter_mut().for_each(|v| *v *= scale);
        // DDP-style buckets, each all-reduced as one buffer.
        let reduce_started = Instant::now();
        let mut dp_group = comm.group(&dp_members)?;
        for chunk in flat.chunks_mut(bucket) {
            dp_group.all_reduce(chunk, ReduceOp::Sum)?;
        }
        // Bus bandwidth as nccl-tests defines it: bytes · 2(n-1)/n per second.
        let allreduce_gbps = (dp > 1).then(|| {
            let bytes = (flat.len() * 4) as f64 * 2.0 * (dp - 1) as f64 / dp as f64;
            bytes / reduce_started.elapsed().as_secs_f64().max(1e-9) / 1e9
        });
        let control: Vec<f32> = flat
            .drain(n_params + 1..)
            .map(|v| (v / scale).round())
            .collect();
        let loss = f64::from(flat.pop().expect("loss slot"));
        debug_assert_eq!(flat.len(), n_params);

        // The global norm of the whole model's gradient: tensor-parallel shards summed over the
        // tp group, replicated parameters counted once, stages summed over the pipeline.
        let mut square = [
            squared_norm(&model, &flat, &sharded, coords.tp == 0),
            control[0],
            control[1],
            control[2],
        ];
        comm.group(&tp_members)?
            .all_reduce(&mut square, ReduceOp::Sum)?;
        comm.group(&pp_members)?
            .all_reduce(&mut square, ReduceOp::Sum)?;
        let norm = f64::from(square[0]).sqrt();
        let draining = square[1] > 0.0;
        let (all_uploaded, any_failed) = (square[2] as u32 == world, square[3] > 0.0);
        if let Some(pending) = upload.take_if(|_| all_uploaded || any_failed) {
            // Every rank sees the same sums, so all settle the upload in this same step.
            committing = pending.settle(any_failed, job, &store, world, reporter);
        }
        if let Some(commit) = committing.take_if(|c| c.ended()) {
            commit.wait()?;
        }
        if t.grad_clip > 0.0 && norm > t.grad_clip {
            let factor = (t.grad_clip / (norm + 1e-6)) as f32;
            flat.iter_mut().for_each(|g| *g *= factor);
        }
        let mut unflatten = Unflatten {
            flat: &flat,
            offset: 0,
            device: device.clone(),
            grads: GradientsParams::new(),
        };
        model.visit(&mut unflatten);
        let lr = learning_rate(spec, step);
        model = optimizer.step(lr, model, unflatten.grads);

        let done = step + 1;
        let step_seconds = started.elapsed().as_secs_f64();
        let samples_per_sec = t.global_batch as f64 / step_seconds.max(1e-9);
        let last = done == t.steps;
        let eval_loss = if (t.eval_every > 0 && done % t.eval_every == 0) || last {
            let mut ctx = step_context!();
            model.evaluate(&mut ctx, Split::Validation)?
        } else {
            None
        };
        reporter.progress(&StepReport {
            step: done,
            total: t.steps,
            loss,
            eval_loss,
            grad_norm: Some(norm),
            lr,
            samples_per_sec,
            step_seconds,
            allreduce_gbps,
        });
        last_eval = eval_loss.or(last_eval);

        let every = spec.checkpoint.every_steps;
        let periodic = every > 0 && done % every == 0;
        if periodic || last || draining {
            let reported = (loss, last_eval);
            // At most one checkpoint in flight: finish the previous one first.
            if let Some(pending) = upload.take() {
                committing = pending.finish(job, &store, comm, reporter)?;
            }
            if let Some(commit) = committing.take() {
                commit.wait()?;
            }
            let started = Instant::now();
            // One replica writes each position's shard; the others hold the same state.
            let taken = writes.then(|| snapshot(&model, &optimizer, done, reported));
            if last || draining || !spec.checkpoint.async_upload {
                // The run ends here (or asked to wait): write and commit before going on.
                if let Some(taken) = taken {
                    io.block_on(store.write_shard(done, job.rank, taken.into_shard()?))?;
                }
                comm.world().barrier()?;
                if job.rank == 0 {
                    let keep_last = spec.checkpoint.keep_last;
                    let manifest = manifest(job, world, done);
                    commit(&store, manifest, keep_last, started, reporter, io)?;
                }
                // Nobody moves on (and possibly exits) before the commit is known.
                comm.world().barrier()?;
            } else {
                upload = Some(match taken {
                    Some(taken) => Upload::start(store.clone(), done, job.rank, taken, started),
                    None => Upload::nothing(done, started),
                });
            }
        }
        if draining && !last {
            return Err(Drained(done).into());
        }
    }
    if let Some(commit) = committing.take() {
        commit.wait()?;
    }
    if start < t.steps {
        let mut ctx = step_context!();
        let test_loss = model.evaluate(&mut ctx, Split::Test)?;
        let accuracy = model.test_accuracy(&mut ctx)?;
        if let Some(loss) = test_loss {
            reporter.test(loss, accuracy);
        }
    }
    Ok(())
}

/// The checkpoint to resume from and this rank's shard of it: the newest committed step
/// (or `job.resume_step`) whose shards every rank read and found intact. Each rank reads only
/// the shard it needs and checks it against the manifest; an all-reduce of "mine is damaged"
/// makes every rank skip a step that any rank cannot use, so all resume from the same one.
///
/// A checkpoint written at another tensor- or pipeline-parallel layout is resharded: the rank
/// reads the shards that hold its stage's blocks (`sources`) and cuts its own from them
/// (`reshard`), for which `fresh` gives the record of its freshly built stage.
fn restore_point(
    job: &RankJob,
    mesh: Mesh,
    fresh: &dyn Fn() -> anyhow::Result<bytes::Bytes>,
    comm: &mut TcpComm,
    reporter: &Reporter,
    store: &CheckpointStore,
    io: &tokio::runtime::Runtime,
) -> anyhow::Result<Option<(Manifest, Shard)>> {
    use crate::runtime::checkpoint::CheckpointError;
    let candidates = match job.resume_step {
        Some(step) => vec![step],
        None => io.block_on(store.steps())?,
    };
    // (damaged, why): a damaged checkpoint is skipped for the one before; a store that cannot
    // be read fails the attempt, whose restart tries again, rather than resume from further
    // back than it must.
    let unusable = |e: CheckpointError| match e {
        CheckpointError::Invalid { message, .. } => (true, message),
        other => (store.is_damage(&other), other.to_string()),
    };
    for step in candidates {
        // Damage anywhere makes the step unusable for every rank; a store that cannot be read
        // anywhere, or a layout that cannot be resumed at all, is an error.
        let mine = match io.block_on(store.committed(step)) {
            Ok(manifest) if manifest.tp == mesh.tp && manifest.pp == mesh.pp => {
                // The layout is the same: the shard of this rank's position, whichever
                // replica wrote it, at whatever data-parallel degree.
                let source = manifest.holder(mesh.coords(job.rank));
                io.block_on(store.read_verified_shard(&manifest, source))
                    .map(|shard| (manifest, shard))
                    .map_err(unusable)
            }
            Ok(manifest) => {
                let saved = manifest.mesh();
                let read = io.block_on(async {
                    let mut shards = BTreeMap::new();
                    for rank in sources(&job.spec, saved, mesh, job.rank) {
                        shards.insert(rank, store.read_verified_shard(&manifest, rank).await?);
                    }
                    Ok(shards)
                });
                match read {
                    // A checkpoint that cannot be resharded is an error, not damage: every
                    // older one has the same layout.
                    Ok(shards) => {
                        let shard = reshard(&job.spec, saved, &shards, mesh, job.rank, fresh()?)
                            .map_err(|e| {
                                e.context(format!(
                                    "resharding the checkpoint at step {} from tp={} pp={} to \
                                     tp={} pp={}",
                                    manifest.step, saved.tp, saved.pp, mesh.tp, mesh.pp
                                ))
                            })?;
                        Ok((manifest, shard))
                    }
                    Err(e) => Err(unusable(e)),
                }
            }
            Err(e) => Err(unusable(e)),
        };
        // 0: usable here, 1: damaged, 2: unreadable; the worst over every rank decides.
        let mut verdict = [match &mine {
            Ok(_) => 0.0,
            Err((true, _)) => 1.0,
            Err((false, _)) => 2.0,
        }];
        comm.world().all_reduce(&mut verdict, ReduceOp::Max)?;
        let why = match mine {
            Ok(found) if verdict[0] == 0.0 => return Ok(Some(found)),
            Err((false, why)) => {
                anyhow::bail!("could not read the checkpoint at step {step} from its store: {why}")
            }
            _ if verdict[0] == 2.0 => anyhow::bail!(
                "another rank could not read the checkpoint at step {step} from its store"
            ),
            Ok(_) => "another rank's shard is damaged".to_string(),
            Err((true, why)) => why,
        };
        if job.resume_step.is_some() {
            anyhow::bail!("checkpoint at step {step} cannot be resumed from: {why}");
        }
        // A partial step (no manifest) is the same for every rank: rank 0 reports it.
        if job.rank == 0 || !why.starts_with("no manifest") {
            reporter.log(&format!("skipping checkpoint at step {step}: {why}"));
        }
    }
    Ok(None)
}

/// This rank's state at a step. Taking it only clones handles: tensors are immutable and
/// shared, so the steps that follow cannot change what it holds. Serialising it is the
/// expensive part, which an asynchronous checkpoint leaves to its upload thread.
pub struct Snapshot<M> {
    model: M,
    optimizer: burn::optim::ModuleOptimizer,
    step: u64,
    reported: (f64, Option<f64>),
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
    }
}

impl<M: Module> Snapshot<M> {
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
                .map(checkpoint::shared)
                .map_err(|e| anyhow::anyhow!("model record: {e:?}"))?,
            optimizer: optimizer
                .into_bytes()
                .map(checkpoint::shared)
                .map_err(|e| anyhow::anyhow!("optimizer record: {e:?}"))?,
            data_cursor: self.step,
            loss: Some(loss),
            eval_loss,
        })
    }
}

/// The manifest of this rank's job's checkpoint at `step`.
fn manifest(job: &RankJob, world: u32, step: u64) -> Manifest {
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
    }
}

/// Rank 0's commit of a step once every shard of it is written.
fn commit(
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
        Err(checkpoint::CheckpointError::Invalid { message, .. }) => {
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
struct Commit {
    step: u64,
    task: Background,
}

impl Commit {
    fn start(
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

    fn ended(&self) -> bool {
        self.task.ended().is_some()
    }

    fn wait(self) -> anyhow::Result<()> {
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
        rank: u32,
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

    /// (finished well, failed) as 0/1 flags for the step's all-reduce.
    fn flags(&self) -> (f32, f32) {
        match self.task.ended() {
            None => (0.0, 0.0),
            Some(Ok(())) => (1.0, 0.0),
            Some(Err(_)) => (0.0, 1.0),
        }
    }

    /// Settles the upload once every rank's has ended, given whether any failed: rank 0
    /// starts the commit of a checkpoint whose every shard is uploaded; otherwise nobody
    /// commits, and the logs say why.
    fn settle(
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
        (job.rank == 0).then(|| {
            let keep_last = job.spec.checkpoint.keep_last;
            let manifest = manifest(job, world, self.step);
            Commit::start(store, manifest, keep_last, self.started, reporter)
        })
    }

    /// Settles the upload now: waits for this rank's to end, then a world all-reduce tells
    /// whether any rank's failed.
    fn finish(
        self,
        job: &RankJob,
        store: &CheckpointStore,
        comm: &mut TcpComm,
        reporter: &Reporter,
    ) -> anyhow::Result<Option<Commit>> {
        let mut failed = [if self.task.wait().is_err() { 1.0 } else { 0.0 }];
        comm.world().all_reduce(&mut failed, ReduceOp::Sum)?;
        Ok(self.settle(failed[0] > 0.0, job, store, comm.world_size(), reporter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let spec = JobSpec::from_json(
            r#"{"name":"t","model":{"kind":"mlp"},"train":{"steps":100,"global_batch":4,"lr":1.0,"warmup_steps":10}}"#,
        )
        .unwrap();
        assert!((learning_rate(&spec, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&spec, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&spec, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&spec, 100) - 0.1).abs() < 1e-12);
        let mid = learning_rate(&spec, 55);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
    }
}
