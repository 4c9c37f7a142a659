//! What one rank computes in a training step, given the shared loop in `train`: a data-parallel
//! replica runs its micro-batches through the whole model; a pipeline stage (with tensor
//! parallelism, its share of each layer) runs its part of the model on every micro-batch,
//! exchanging activations (forward) and their gradients (backward) with the neighbouring stages
//! under the GPipe or 1F1B schedule.
//!
//! Gradients leave the autodiff graph at two kinds of boundary: between pipeline stages, and at
//! the inputs of column-parallel layers, whose gradients are summed over the tensor-parallel
//! group. A stage's forward pass is recorded as [`Segment`]s split at those points, each starting
//! from fresh leaves that require a gradient. Backward runs segment by segment from the last:
//! each continues from `(output · upstream_gradient).sum()` and hands its leaves' gradients
//! (summed over tp where flagged) to the segment before, or to the previous stage.

use crate::data::{Batch, Dataset, Split};
use crate::gradients::accumulate_gradients;
use crate::model::{
    GptStage, MlpStage, PipelineModel, Segment, TpSum, TrainModel, answer_batch, exact_matches,
    materialize,
};
use burn::module::{Module, ParamId};
use burn::prelude::*;
use gantry_collective::{ReduceOp, World};
use gantry_core::{Coords, JobSpec, Mesh, PipelineSchedule};

/// What a stage needs to know about its place in the job.
pub struct StepContext<'a> {
    pub spec: &'a JobSpec,
    pub data: &'a Dataset,
    pub comm: &'a mut dyn World,
    pub mesh: Mesh,
    pub rank: u32,
    /// The autodiff device the model lives on.
    pub device: Device,
    /// What the loss is multiplied by before the backward pass: fp16's loss scale, else 1.
    pub loss_scale: f32,
}

impl StepContext<'_> {
    pub fn coords(&self) -> Coords {
        self.mesh.coords(self.rank)
    }

    pub fn dp_group(&self) -> Vec<u32> {
        self.mesh.dp_group(self.rank)
    }

    pub fn pp_group(&self) -> Vec<u32> {
        self.mesh.pp_group(self.rank)
    }

    fn is_last_stage(&self) -> bool {
        self.coords().pp + 1 == self.mesh.pp
    }
}

/// What an evaluation of a split found, on the ranks that see the model's output (empty on
/// the others).
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The mean loss.
    pub loss: Option<f64>,
    /// A classifier's confusion matrix, `[truth · labels + predicted]`, summed over the
    /// data-parallel group.
    pub confusion: Option<Vec<f64>>,
}

/// One rank's part of the model and how it runs a step.
pub trait Stage: Module + Clone + Send + Sized + 'static {
    fn init(spec: &JobSpec, mesh: Mesh, rank: u32, device: &Device) -> Self;

    /// Adds the gradient of every micro-batch (given as training-sample indices) into `flat`
    /// and returns the sum of the micro-batch losses (0 on stages that compute no loss).
    fn accumulate(
        &self,
        ctx: &mut StepContext<'_>,
        micro_batches: &[&[usize]],
        flat: &mut Vec<f32>,
    ) -> anyhow::Result<f32>;

    /// The mean loss over (up to 512 samples of) a split and, for a classifier, its confusion
    /// matrix, from one forward pass, on the ranks that compute the loss.
    fn evaluate(&self, ctx: &mut StepContext<'_>, split: Split) -> anyhow::Result<Evaluation>;

    /// Exact-match accuracy of the test split's arithmetic answers (up to 512), on the ranks
    /// that see the model's output; None for data without answers.
    fn test_accuracy(&self, ctx: &mut StepContext<'_>) -> anyhow::Result<Option<f64>>;

    /// Parameters split over the tensor-parallel group; the others are replicated on it.
    fn tp_sharded(&self) -> Vec<ParamId> {
        Vec::new()
    }

    /// Replicated parameters whose gradient each tensor-parallel rank computes only in part:
    /// summed over the group before the update.
    fn tp_partial(&self) -> Vec<ParamId> {
        Vec::new()
    }

    /// The `new` tokens greedy decoding appends to `prompt`, for whole models that predict
    /// tokens (None for the others, and for pipeline stages).
    fn greedy(&self, _prompt: &[i64], _new: usize, _ctx: &StepContext<'_>) -> Option<Vec<i64>> {
        None
    }
}

/// This dp rank's share of the test answers, in chunks of 64 lines.
fn answer_chunks<'d>(ctx: &StepContext<'d>) -> Vec<Vec<(&'d [i64], usize)>> {
    let dp = ctx.mesh.dp as usize;
    let dp_rank = ctx.coords().dp as usize;
    let mine: Vec<(&[i64], usize)> = ctx
        .data
        .test_answers()
        .take(512)
        .enumerate()
        .filter(|(i, _)| i % dp == dp_rank)
        .map(|(_, line)| line)
        .collect();
    mine.chunks(64).map(<[_]>::to_vec).collect()
}

/// This dp rank's evaluation samples, in chunks of 64.
fn eval_chunks(ctx: &StepContext<'_>, split: Split) -> Vec<Vec<usize>> {
    let n = ctx.data.len(split).min(crate::data::EVAL_SAMPLES);
    let dp = ctx.mesh.dp as usize;
    let dp_rank = ctx.coords().dp as usize;
    let mine: Vec<usize> = (0..n).filter(|i| i % dp == dp_rank).collect();
    mine.chunks(64).map(<[usize]>::to_vec).collect()
}

/// Averages (loss sum, count) over the data-parallel group.
fn mean_over_dp(ctx: &mut StepContext<'_>, mut sums: [f32; 2]) -> anyhow::Result<f64> {
    let group = ctx.dp_group();
    ctx.comm
        .group(&group)?
        .all_reduce(&mut sums, ReduceOp::Sum)?;
    Ok(f64::from(sums[0] / sums[1].max(1.0)))
}

/// A whole model on one rank (pp = 1): data parallelism only.
impl<M: TrainModel> Stage for M {
    fn init(spec: &JobSpec, _mesh: Mesh, _rank: u32, device: &Device) -> Self {
        let model = M::init(spec, device);
        materialize(&model);
        model
    }

    fn accumulate(
        &self,
        ctx: &mut StepContext<'_>,
        micro_batches: &[&[usize]],
        flat: &mut Vec<f32>,
    ) -> anyhow::Result<f32> {
        let mut loss_sum = 0.0;
        // Mixed precision: the passes run on a bf16 or fp16 copy whose gradients land in `flat`
        // (f32) like the master's would; the update runs on the f32 master (precision.rs). fp16
        // scales the loss, so `flat` holds scaled gradients: the step unscales them.
        let copy = crate::precision::compute_copy(self, ctx.spec.train.precision);
        let compute = copy.as_ref().unwrap_or(self);
        for indices in micro_batches {
            let batch = ctx.data.batch(Split::Train, indices);
            let loss = compute.loss(&batch, &ctx.device);
            loss_sum += loss.clone().into_scalar::<f32>();
            let scaled = if ctx.loss_scale == 1.0 {
                loss
            } else {
                loss * ctx.loss_scale
            };
            accumulate_gradients(scaled.backward(), compute, flat);
        }
        Ok(loss_sum)
    }

    fn evaluate(&self, ctx: &mut StepContext<'_>, split: Split) -> anyhow::Result<Evaluation> {
        let mut sums = [0.0f32; 2];
        for chunk in eval_chunks(ctx, split) {
            let batch = ctx.data.batch(split, &chunk);
            sums[0] += self.loss(&batch, &ctx.device).into_scalar::<f32>() * chunk.len() as f32;
            sums[1] += chunk.len() as f32;
        }
        Ok(Evaluation {
            loss: Some(mean_over_dp(ctx, sums)?),
            confusion: None,
        })
    }

    fn greedy(&self, prompt: &[i64], new: usize, ctx: &StepContext<'_>) -> Option<Vec<i64>> {
        crate::model::greedy(
            self,
            prompt,
            new,
            ctx.spec.data.seq_len as usize,
            &ctx.device,
        )
    }

    fn test_accuracy(&self, ctx: &mut StepContext<'_>) -> anyhow::Result<Option<f64>> {
        if ctx.data.test_answers().next().is_none() {
            return Ok(None);
        }
        let mut counts = [0.0f32; 2];
        for lines in &answer_chunks(ctx) {
            let Some(logits) = self.logits_for(&answer_batch(lines), &ctx.device) else {
                return Ok(None);
            };
            counts[0] += exact_matches(logits, lines) as f32;
            counts[1] += lines.len() as f32;
        }
        mean_over_dp(ctx, counts).map(Some)
    }
}

/// A micro-batch's forward pass, kept for its backward pass: the stage's segments, whose last
/// output is the loss (shaped `[1, 1, 1]`) on the last stage.
struct InFlight {
    segments: Vec<Segment>,
}

impl InFlight {
    fn output(&self) -> Tensor<3> {
        self.segments
            .last()
            .and_then(|s| s.outputs.last())
            .expect("a stage has an output")
            .clone()
    }
}

fn neighbours(ctx: &StepContext<'_>) -> (Option<u32>, Option<u32>) {
    let stages = ctx.pp_group();
    let s = ctx.coords().pp as usize;
    (
        s.checked_sub(1).map(|p| stages[p]),
        stages.get(s + 1).copied(),
    )
}

/// Receives an activation (or its gradient) of `shape` from `peer`.
fn receive(ctx: &mut StepContext<'_>, peer: u32, shape: [usize; 3]) -> anyhow::Result<Tensor<3>> {
    let mut buf = vec![0.0f32; shape.iter().product()];
    ctx.comm.world().recv(&mut buf, peer)?;
    Ok(Tensor::<3>::from_data(
        TensorData::new(buf, shape),
        &ctx.device,
    ))
}

fn send(ctx: &mut StepContext<'_>, peer: u32, tensor: Tensor<3>) -> anyhow::Result<()> {
    let data = tensor.into_data().convert::<f32>();
    ctx.comm
        .world()
        .send(data.as_slice::<f32>().expect("f32 activations"), peer)?;
    Ok(())
}

/// This rank's tensor-parallel group, as the models see it.
struct TpGroup<'c> {
    comm: &'c mut dyn World,
    members: Vec<u32>,
    device: Device,
}

impl TpSum for TpGroup<'_> {
    fn size(&self) -> usize {
        self.members.len()
    }

    fn sum(&mut self, t: Tensor<3>) -> anyhow::Result<Tensor<3>> {
        let shape = t.dims();
        let mut values = t.into_data().convert::<f32>().try_into_vec::<f32>()?;
        self.comm
            .group(&self.members)?
            .all_reduce(&mut values, ReduceOp::Sum)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }
}

impl StepContext<'_> {
    fn tp(&mut self) -> TpGroup<'_> {
        TpGroup {
            members: self.mesh.tp_group(self.rank),
            device: self.device.clone(),
            comm: &mut *self.comm,
        }
    }
}

/// Runs a stage's forward pass of one micro-batch. The last stage's output is the loss, or with
/// `raw_output` the model's output itself (logits).
fn forward_micro<P: PipelineModel>(
    stage: &P,
    ctx: &mut StepContext<'_>,
    batch: &Batch,
    raw_output: bool,
) -> anyhow::Result<InFlight> {
    let (prev, next) = neighbours(ctx);
    let shape = P::activation_shape(ctx.spec, batch);
    let input = match prev {
        None => None,
        Some(p) => Some(crate::model::leaf(receive(ctx, p, shape)?)),
    };
    let device = ctx.device.clone();
    let mut segments = stage.forward_stage(input, batch, &mut ctx.tp(), &device)?;
    let last = segments.last_mut().expect("a stage has a segment");
    let out = last.outputs.pop().expect("a segment has an output");
    let output = match next {
        Some(n) => {
            send(ctx, n, out.clone().detach())?;
            out
        }
        None if raw_output => out,
        None => P::stage_loss(out, batch, &device).reshape([1, 1, 1]),
    };
    last.outputs.push(output);
    Ok(InFlight { segments })
}

/// Runs a stage's backward pass of one micro-batch, segment by segment from the last, and
/// returns its loss on the last stage. Each segment's backward starts from its outputs times
/// their gradients (the loss itself on the last stage), and hands its inputs' gradients, summed
/// over tp where flagged, to the segment before; the first segment's go to the previous stage.
fn backward_micro<P: PipelineModel>(
    stage: &P,
    ctx: &mut StepContext<'_>,
    f: InFlight,
    batch: &Batch,
    flat: &mut Vec<f32>,
) -> anyhow::Result<f32> {
    let (prev, next) = neighbours(ctx);
    let (loss, mut upstream) = match next {
        None => (f.output().into_scalar::<f32>(), vec![None]),
        Some(n) => {
            let grad = receive(ctx, n, P::activation_shape(ctx.spec, batch))?;
            (0.0, vec![Some(grad)])
        }
    };
    for segment in f.segments.into_iter().rev() {
        let objective = segment
            .outputs
            .into_iter()
            .zip(upstream)
            .map(|(output, grad)| match grad {
                Some(g) => (output * g).sum(),
                None => output.sum(),
            })
            .reduce(|a, b| a + b)
            .expect("a segment has outputs");
        let grads = objective.backward();
        upstream = Vec::with_capacity(segment.inputs.len());
        for (input, summed) in &segment.inputs {
            // Back onto the autodiff device as a plain tensor (the sum over tp does that too).
            let grad = input
                .grad(&grads)
                .unwrap_or_else(|| input.zeros_like().detach());
            upstream.push(Some(if *summed {
                ctx.tp().sum(grad)?
            } else {
                Tensor::<3>::from_data(grad.into_data(), &ctx.device)
            }));
        }
        accumulate_gradients(grads, stage, flat);
    }
    if let Some(p) = prev {
        let grad = upstream
            .pop()
            .flatten()
            .expect("a later stage starts from its input activation");
        send(ctx, p, grad)?;
    }
    Ok(loss)
}

fn pipeline_accumulate<P: PipelineModel>(
    stage: &P,
    ctx: &mut StepContext<'_>,
    micro_batches: &[&[usize]],
    flat: &mut Vec<f32>,
) -> anyhow::Result<f32> {
    let m = micro_batches.len();
    let batches: Vec<Batch> = micro_batches
        .iter()
        .map(|i| ctx.data.batch(Split::Train, i))
        .collect();
    let mut in_flight = std::collections::VecDeque::new();
    let mut loss_sum = 0.0;
    let mut done = 0;
    // Forward and backward passes run in micro-batch order on every stage, so neighbours'
    // sends and receives pair up; the schedules differ in how they interleave: GPipe runs every
    // forward first, 1F1B only enough to fill the pipeline, then alternates.
    let warmup = match ctx.spec.parallel.schedule {
        PipelineSchedule::GPipe => m,
        PipelineSchedule::OneFOneB => ((ctx.mesh.pp - ctx.coords().pp - 1) as usize).min(m),
    };
    for (i, batch) in batches.iter().enumerate() {
        in_flight.push_back(forward_micro(stage, ctx, batch, false)?);
        if i >= warmup {
            let f = in_flight
                .pop_front()
                .expect("a forward precedes its backward");
            loss_sum += backward_micro(stage, ctx, f, &batches[done], flat)?;
            done += 1;
        }
    }
    while let Some(f) = in_flight.pop_front() {
        loss_sum += backward_micro(stage, ctx, f, &batches[done], flat)?;
        done += 1;
    }
    Ok(loss_sum)
}

fn pipeline_evaluate<P: PipelineModel>(
    stage: &P,
    ctx: &mut StepContext<'_>,
    split: Split,
) -> anyhow::Result<Evaluation> {
    let labels = ctx.data.label_names().len();
    let mut sums = [0.0f32; 2];
    let mut counts = vec![0.0f32; labels * labels];
    for chunk in eval_chunks(ctx, split) {
        let batch = ctx.data.batch(split, &chunk);
        let f = forward_micro(stage, ctx, &batch, true)?;
        if !ctx.is_last_stage() {
            continue;
        }
        let output = f.output();
        let loss = P::stage_loss(output.clone(), &batch, &ctx.device);
        sums[0] += loss.into_scalar::<f32>() * chunk.len() as f32;
        sums[1] += chunk.len() as f32;
        if let Batch::Labelled { labels: truth, .. } = &batch {
            // The classifier's output is [n, 1, labels].
            let predicted = output.argmax(2).into_data().convert::<i64>();
            let predicted = predicted.as_slice::<i64>().expect("i64 predictions");
            for (t, p) in truth.iter().zip(predicted) {
                counts[*t as usize * labels + *p as usize] += 1.0;
            }
        }
    }
    if !ctx.is_last_stage() {
        return Ok(Evaluation::default());
    }
    let loss = mean_over_dp(ctx, sums)?;
    let confusion = if labels > 0 {
        let group = ctx.dp_group();
        ctx.comm
            .group(&group)?
            .all_reduce(&mut counts, ReduceOp::Sum)?;
        Some(counts.into_iter().map(f64::from).collect())
    } else {
        None
    };
    Ok(Evaluation {
        loss: Some(loss),
        confusion,
    })
}

fn pipeline_test_accuracy<P: PipelineModel>(
    stage: &P,
    ctx: &mut StepContext<'_>,
) -> anyhow::Result<Option<f64>> {
    if ctx.data.test_answers().next().is_none() {
        return Ok(None);
    }
    let mut counts = [0.0f32; 2];
    for lines in answer_chunks(ctx) {
        let f = forward_micro(stage, ctx, &answer_batch(&lines), true)?;
        if ctx.is_last_stage() {
            counts[0] += exact_matches(f.output(), &lines) as f32;
            counts[1] += lines.len() as f32;
        }
    }
    if ctx.is_last_stage() {
        mean_over_dp(ctx, counts).map(Some)
    } else {
        Ok(None)
    }
}

/// A pipeline stage of a model is a [`Stage`]; the work is in the generic functions above.
macro_rules! pipeline_stage {
    ($stage:ty) => {
        impl Stage for $stage {
            fn init(spec: &JobSpec, mesh: Mesh, rank: u32, device: &Device) -> Self {
                <$stage as PipelineModel>::new_stage(spec, mesh, mesh.coords(rank), device)
            }

            fn accumulate(
                &self,
                ctx: &mut StepContext<'_>,
                micro_batches: &[&[usize]],
                flat: &mut Vec<f32>,
            ) -> anyhow::Result<f32> {
                pipeline_accumulate(self, ctx, micro_batches, flat)
            }

            fn evaluate(
                &self,
                ctx: &mut StepContext<'_>,
                split: Split,
            ) -> anyhow::Result<Evaluation> {
                pipeline_evaluate(self, ctx, split)
            }

            fn test_accuracy(&self, ctx: &mut StepContext<'_>) -> anyhow::Result<Option<f64>> {
                pipeline_test_accuracy(self, ctx)
            }

            fn tp_sharded(&self) -> Vec<ParamId> {
                <$stage as PipelineModel>::tp_sharded(self)
            }

            fn tp_partial(&self) -> Vec<ParamId> {
                <$stage as PipelineModel>::tp_partial(self)
            }
        }
    };
}

pipeline_stage!(MlpStage);
pipeline_stage!(GptStage);
pipeline_stage!(crate::llama::LlamaStage);
pipeline_stage!(crate::bert::Bert);
