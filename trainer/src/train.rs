//! The training loop of one rank.
//!
//! Each step: every dp rank takes its contiguous share of the global batch and its [`Stage`]
//! turns the micro-batches into summed gradients (a whole model, or one pipeline stage); the
//! gradients are flattened into one buffer with the loss appended, all-reduced over the
//! data-parallel group in buckets (average), clipped by the global norm (summed over pipeline
//! stages), and Adam steps with the scheduled learning rate. Replicas start from the same seed
//! and apply identical averaged gradients, so they stay bit-identical. In fp16 the loss is
//! scaled before the backward pass and the gradients unscaled after the all-reduce; a step
//! whose gradients overflowed changes nothing but the scale (the same on every rank: the norm
//! it is judged by is the global one).

use crate::control::{Control, Drained, drain_requested};
use crate::data::{Dataset, PREFETCH_STEPS, Split, shard};
use crate::finetune::ParamGroups;
use crate::gradients::{ranges_of, squared_norm, unflatten, unflatten_where};
use crate::precision::{LossScaler, Verdict};
use crate::report::{Reporter, StepReport};
use crate::stage::{Evaluation, Stage, StepContext};
use burn::module::ParamId;
use burn::optim::AdamConfig;
use burn::store::ModuleRecord;
use gantry_checkpoint::{self as checkpoint, CheckpointStore};
use gantry_collective::{ReduceOp, World};
use gantry_core::{ClassMetrics, Mesh, Rank};
use std::collections::HashSet;
use std::time::Instant;

pub use crate::job::{RankJob, learning_rate};
use crate::restore::restore_point;
use crate::upload::{Commit, Upload, commit, manifest, snapshot};
/// Trains this rank's stage `S` on `data` from the newest checkpoint (or from scratch) to the
/// last step.
pub fn train<S: Stage>(
    job: &RankJob,
    data: &Dataset,
    comm: &mut dyn World,
    reporter: &Reporter,
    io: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let spec = &job.spec;
    let t = &spec.train;
    let p = spec.parallel;
    let mesh = Mesh::new(p.dp, p.tp, p.pp);
    let rank = job.rank.get();
    let coords = mesh.coords(rank);
    let dp_members = mesh.dp_group(rank);
    let pp_members = mesh.pp_group(rank);
    let tp_members = mesh.tp_group(rank);
    let dp = dp_members.len();
    let dp_rank = coords.dp as usize;
    let bucket = ((p.bucket_mb * (1 << 20) as f64 / 4.0) as usize).max(1);
    let device = crate::device::for_spec(spec)?;
    device.seed(t.seed);
    let ad = if t.activation_checkpointing {
        device.clone().autodiff().gradient_checkpointing()
    } else {
        device.clone().autodiff()
    };
    let mut model = S::init(spec, mesh, rank, &ad);
    let mut optimizer = AdamConfig::new().init();
    let store =
        CheckpointStore::for_job(&spec.checkpoint, job.job_id.as_str(), &job.store_options)?;

    if job.rank == Rank::LEADER {
        // From now on, no older attempt of this job may commit a checkpoint.
        io.block_on(store.fence(job.attempt))?;
    }
    let fresh = || {
        model
            .clone()
            .into_record()
            .into_bytes()
            .map(crate::records::shared)
            .map_err(|e| anyhow::anyhow!("model record: {e:?}"))
    };
    let restored = restore_point(job, mesh, &fresh, comm, reporter, &store, io)?;
    // A fresh run starts from pretrained weights when asked (a resumed one has its own).
    if restored.is_none()
        && let Some(url) = &spec.model.init_from
    {
        let loading = Instant::now();
        let options =
            gantry_core::store_options::for_url(url, &job.store_options, &spec.data.options);
        let pretrained = io.block_on(crate::pretrained::load(
            spec,
            url,
            &options,
            data.vocab_size(spec),
        ))?;
        model = pretrained.apply(model, spec, mesh, coords)?;
        if job.rank == Rank::LEADER {
            reporter.log(&format!(
                "initialised from {url} ({} tensors) in {:.2} s",
                pretrained.tensors(),
                loading.elapsed().as_secs_f64()
            ));
            if !pretrained.fresh.is_empty() {
                reporter.log(&format!(
                    "new head, initialised from the seed: {}",
                    pretrained.fresh.join(", ")
                ));
            }
            if !pretrained.unused.is_empty() {
                reporter.log(&format!(
                    "not used by this task: {}",
                    pretrained.unused.join(", ")
                ));
            }
        }
    }
    let mut scaler = LossScaler::for_spec(spec);
    let mut start = 0;
    let mut last_eval = None;
    if let Some((manifest, shard)) = restored {
        if let (Some(url), Some(saved)) = (spec.dataset(), manifest.dataset_sha256.as_deref()) {
            let now = data.manifest_sha256().unwrap_or_default();
            anyhow::ensure!(
                saved == now,
                "data.source: dataset {url} changed since the checkpoint at step {} (its manifest \
                 has sha256 {now}; the checkpoint was taken on {saved}); resume on the dataset \
                 it trained on",
                manifest.step
            );
        }
        let record = ModuleRecord::from_bytes(crate::records::record(shard.model))
            .map_err(|e| anyhow::anyhow!("model record: {e:?}"))?;
        model = model.load_record(record);
        optimizer = optimizer
            .from_bytes(crate::records::record(shard.optimizer))
            .map_err(|e| anyhow::anyhow!("optimizer record: {e:?}"))?;
        start = shard.data_cursor;
        if let (Some(scaler), Some(state)) = (scaler.as_mut(), shard.loss_scale) {
            scaler.restore(state);
        }
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
                eval_metrics: None,
            });
        }
        last_eval = shard.eval_loss;
    }

    // What a stage sees of this rank; rebuilt for each use because it borrows the communicator.
    macro_rules! step_context {
        () => {
            StepContext {
                spec,
                data,
                comm: &mut *comm,
                mesh,
                rank,
                device: ad.clone(),
                loss_scale: scaler.as_ref().map_or(1.0, |s| s.scale() as f32),
            }
        };
    }
    let micro = t.micro_batches as usize;
    let sharded: HashSet<ParamId> = model.tp_sharded().into_iter().collect();
    let groups = ParamGroups::of(&model, spec, mesh, coords);
    let partial = ranges_of(&model, &model.tp_partial().into_iter().collect());
    // The evaluations' context: the plain device, for the model without autodiff.
    macro_rules! eval_context {
        () => {
            StepContext {
                device: device.clone(),
                ..step_context!()
            }
        };
    }
    let world = comm.world_size();
    let writes = checkpoint::writes_shard(mesh, coords);
    let mut upload: Option<Upload> = None;
    // Rank 0's commit of the checkpoint in flight, once every shard of it is uploaded.
    let mut committing: Option<Commit> = None;
    let mut flat = Vec::new();
    let global_batch = t.global_batch as usize;
    for ahead in start..(start + PREFETCH_STEPS).min(t.steps) {
        data.prefetch_step(ahead, global_batch, dp_rank, dp);
    }
    for step in start..t.steps {
        let started = Instant::now();
        if step + PREFETCH_STEPS < t.steps {
            data.prefetch_step(step + PREFETCH_STEPS, global_batch, dp_rank, dp);
        }
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
        let (uploaded, upload_failed) = upload.as_ref().map_or((false, false), Upload::flags);
        let control = Control {
            drain: drain_requested(),
            uploaded,
            upload_failed,
        };
        flat.extend(control.encode());
        let scale = 1.0 / (micro * dp) as f32;
        flat.iter_mut().for_each(|v| *v *= scale);
        // DDP-style buckets, each all-reduced as one buffer.
        let reduce_started = Instant::now();
        {
            let mut dp_group = comm.group(&dp_members)?;
            for chunk in flat.chunks_mut(bucket) {
                dp_group.all_reduce(chunk, ReduceOp::Sum)?;
            }
        }
        // Bus bandwidth as nccl-tests defines it: bytes · 2(n-1)/n per second.
        let allreduce_gbps = (dp > 1).then(|| {
            let bytes = (flat.len() * 4) as f64 * 2.0 * (dp - 1) as f64 / dp as f64;
            bytes / reduce_started.elapsed().as_secs_f64().max(1e-9) / 1e9
        });
        let control = Control::unscale(&flat[n_params + 1..], scale);
        flat.truncate(n_params + 1);
        let loss = f64::from(flat.pop().expect("loss slot"));
        debug_assert_eq!(flat.len(), n_params);
        groups.drop_frozen(&mut flat);
        // Replicated parameters each tp rank has only part of the gradient of: their sum.
        if !partial.is_empty() {
            let mut summed: Vec<f32> = partial
                .iter()
                .flat_map(|r| flat[r.clone()].iter().copied())
                .collect();
            comm.group(&tp_members)?
                .all_reduce(&mut summed, ReduceOp::Sum)?;
            let mut from = 0;
            for r in &partial {
                flat[r.clone()].copy_from_slice(&summed[from..from + r.len()]);
                from += r.len();
            }
        }
        if let Some(s) = scaler.as_ref() {
            let unscale = (1.0 / s.scale()) as f32;
            flat.iter_mut().for_each(|g| *g *= unscale);
        }

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
        let flags = Control::decode(&square[1..]);
        let draining = flags.draining > 0;
        let (all_uploaded, any_failed) = (flags.uploaded == world, flags.upload_failed > 0);
        if let Some(pending) = upload.take_if(|_| all_uploaded || any_failed) {
            // Every rank sees the same sums, so all settle the upload in this same step.
            committing = pending.settle(any_failed, job, &store, world, reporter);
        }
        if let Some(commit) = committing.take_if(|c| c.ended()) {
            commit.wait()?;
        }
        let verdict = scaler.as_mut().map_or(Verdict::Apply, |s| s.update(norm));
        let lr = learning_rate(spec, step);
        if verdict == Verdict::Apply {
            if t.grad_clip > 0.0 && norm > t.grad_clip {
                let factor = (t.grad_clip / (norm + 1e-6)) as f32;
                flat.iter_mut().for_each(|g| *g *= factor);
            }
            if groups.frozen.is_empty() && groups.head.is_empty() {
                let grads = unflatten(&model, &flat, &device);
                model = optimizer.step(lr, model, grads);
            } else {
                // The head on its own learning rate (the same schedule), then the rest; frozen
                // parameters get no gradient, so Adam keeps no state for them and moves nothing.
                if let Some(head_lr) = t.head_lr.filter(|_| !groups.head.is_empty()) {
                    let head =
                        unflatten_where(&model, &flat, &device, &|id| groups.head.contains(&id));
                    model = optimizer.step(lr * head_lr / t.lr, model, head);
                }
                let keep = |id| !groups.frozen.contains(&id) && !groups.head.contains(&id);
                let rest = unflatten_where(&model, &flat, &device, &keep);
                model = optimizer.step(lr, model, rest);
            }
        } else if let Some(s) = scaler.as_ref() {
            reporter.log(&format!(
                "step {}: fp16 gradients overflowed, step skipped; loss scale now {} ({} \
                 skipped so far)",
                step + 1,
                s.scale(),
                s.skipped()
            ));
        }

        let done = step + 1;
        let step_seconds = started.elapsed().as_secs_f64();
        let samples_per_sec = t.global_batch as f64 / step_seconds.max(1e-9);
        let last = done == t.steps;
        let mut eval_metrics = None;
        let eval_loss = if (t.eval_every > 0 && done % t.eval_every == 0) || last {
            // Evaluations run without autodiff: on its device, a model keeps every activation
            // of a forward pass that no backward pass follows.
            let valid = model.valid();
            let mut ctx = eval_context!();
            let evaluation = valid.evaluate(&mut ctx, Split::Validation)?;
            eval_metrics = classifier_metrics(&evaluation, data);
            // What the model writes now, from a fixed prompt of the dataset (one rank says it).
            let leader = job.rank == Rank::LEADER;
            if let Some(prompt) = data.sample_prompt(16).filter(|_| leader)
                && let Some(more) = valid.greedy(&prompt, 32, &ctx)
                && let (Some(p), Some(m)) = (data.decode(&prompt), data.decode(&more))
            {
                reporter.log(&format!("sample at step {done}: {p:?} → {m:?}"));
            }
            evaluation.loss
        } else {
            None
        };
        reporter.progress(&StepReport {
            step: done,
            total: t.steps,
            loss,
            eval_loss,
            // An fp16 step that overflowed has no norm to report.
            grad_norm: norm.is_finite().then_some(norm),
            lr,
            samples_per_sec,
            step_seconds,
            allreduce_gbps,
            eval_metrics,
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
            let loss_scale = scaler.as_ref().map(LossScaler::state);
            let taken = writes
                .then(|| snapshot(&model, &optimizer, done, reported).with_loss_scale(loss_scale));
            if last || draining || !spec.checkpoint.async_upload {
                // The run ends here (or asked to wait): write and commit before going on.
                if let Some(taken) = taken {
                    io.block_on(store.write_shard(done, job.rank, taken.into_shard()?))?;
                }
                comm.world().barrier()?;
                if job.rank == Rank::LEADER {
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
        let valid = model.valid();
        let mut ctx = eval_context!();
        let test = valid.evaluate(&mut ctx, Split::Test)?;
        let accuracy = valid.test_accuracy(&mut ctx)?;
        if let Some(loss) = test.loss {
            reporter.test(loss, accuracy, classifier_metrics(&test, data));
        }
    }
    if let Some(io) = data.io_report().filter(|_| job.rank == Rank::LEADER) {
        reporter.log(&format!("dataset reads (rank 0): {io}"));
    }
    Ok(())
}

/// A classifier's accuracy, precision, recall and F1 from an evaluation's confusion matrix;
/// None for other models.
fn classifier_metrics(evaluation: &Evaluation, data: &Dataset) -> Option<ClassMetrics> {
    let labels = data.label_names().len();
    ClassMetrics::from_confusion(evaluation.confusion.as_ref()?, labels)
}
