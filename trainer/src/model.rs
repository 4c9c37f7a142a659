//! The built-in models. A [`TrainModel`] builds itself from a spec and turns a [`Batch`] into a
//! scalar loss (mean over the batch), which is all the training loop needs.

use crate::data::{Batch, REGRESSION_IN, REGRESSION_OUT};
use crate::layout::{Split, block_split, stage_blocks};
use burn::module::{Module, Param, ParamId};
use burn::nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::{gelu, relu, softmax};
use gantry_core::{Coords, JobSpec, Mesh};

/// A model the runtime can train.
pub trait TrainModel: Module + Clone + Send + Sized + 'static {
    fn init(spec: &JobSpec, device: &Device) -> Self;
    /// Mean loss over the batch, as a one-element tensor.
    fn loss(&self, batch: &Batch, device: &Device) -> Tensor<1>;
    /// Next-token logits `[n, seq_len, vocab]`, for models that predict tokens.
    fn logits_for(&self, _batch: &Batch, _device: &Device) -> Option<Tensor<3>> {
        None
    }
}

/// Test lines (tokens, answer start) padded with newlines into one batch.
pub fn answer_batch(lines: &[(&[i64], usize)]) -> Batch {
    let len = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(1);
    let inputs: Vec<i64> = lines
        .iter()
        .flat_map(|(l, _)| l.iter().copied().chain(std::iter::repeat(0)).take(len))
        .collect();
    Batch::Tokens {
        targets: inputs.clone(),
        inputs,
        n: lines.len(),
        seq_len: len,
    }
}

/// The `new` tokens greedy decoding appends to `prompt` (each step sees at most the last
/// `seq_len` tokens); None for models that do not predict tokens.
pub fn greedy<M: TrainModel>(
    model: &M,
    prompt: &[i64],
    new: usize,
    seq_len: usize,
    device: &Device,
) -> Option<Vec<i64>> {
    let mut tokens = prompt.to_vec();
    for _ in 0..new {
        let window = tokens[tokens.len().saturating_sub(seq_len)..].to_vec();
        let len = window.len();
        let batch = Batch::Tokens {
            targets: window.clone(),
            inputs: window,
            n: 1,
            seq_len: len,
        };
        let logits = model.logits_for(&batch, device)?;
        let next = logits
            .slice([0..1, len - 1..len])
            .argmax(2)
            .into_data()
            .convert::<i64>();
        tokens.push(next.as_slice::<i64>().expect("i64 argmax")[0]);
    }
    Some(tokens.split_off(prompt.len()))
}

/// How many lines have every answer token (after `=`, through the newline) as the model's most
/// likely next token given the correct prefix: what greedy decoding would produce.
pub fn exact_matches(logits: Tensor<3>, lines: &[(&[i64], usize)]) -> usize {
    let [_, len, _] = logits.dims();
    let predicted = logits.argmax(2).into_data().convert::<i64>();
    let predicted = predicted.as_slice::<i64>().expect("i64 predictions");
    lines
        .iter()
        .enumerate()
        .filter(|(i, (line, start))| {
            (*start..line.len()).all(|p| predicted[i * len + p - 1] == line[p])
        })
        .count()
}

/// A multi-layer perceptron for the synthetic regression task.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    output: Linear,
}

impl TrainModel for Mlp {
    fn init(spec: &JobSpec, device: &Device) -> Self {
        let width = spec.model.d_model as usize;
        let layers = (0..spec.model.layers as usize)
            .map(|i| {
                let d_in = if i == 0 { REGRESSION_IN } else { width };
                LinearConfig::new(d_in, width).init(device)
            })
            .collect();
        Self {
            layers,
            output: LinearConfig::new(width, REGRESSION_OUT).init(device),
        }
    }

    fn loss(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        let Batch::Regression { x, y, n } = batch else {
            panic!("the mlp trains on regression batches");
        };
        // The inputs in the parameters' precision (bf16 for a mixed-precision compute copy); the
        // loss in f32 whatever it is.
        let x = Tensor::<2>::from_data(TensorData::new(x.clone(), [*n, REGRESSION_IN]), device)
            .cast(self.output.weight.val().dtype());
        let y = Tensor::<2>::from_data(TensorData::new(y.clone(), [*n, REGRESSION_OUT]), device);
        let hidden = self
            .layers
            .iter()
            .fold(x, |h, layer| relu(layer.forward(h)));
        let prediction = self.output.forward(hidden).cast(FloatDType::F32);
        MseLoss::new()
            .forward(prediction, y, Reduction::Mean)
            .reshape([1])
    }
}

/// Reads every parameter once, in visiting order. burn initialises parameters lazily, on first
/// read, from the seeded generator: this fixes their values whatever the model later touches first.
pub fn materialize<M: Module>(model: &M) {
    struct Touch;
    impl burn::module::ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    model.visit(&mut Touch);
}

/// The blocks of the MLP (hidden layers, then the output layer) that one pipeline stage holds.
#[derive(Module, Debug)]
pub struct MlpStage {
    layers: Vec<Linear>,
    output: Option<Linear>,
}

impl MlpStage {
    /// Initialises the whole model exactly as one process would, then keeps this stage's part,
    /// so every layout starts from the same parameters (and parameter ids) as pp = 1.
    pub fn new(spec: &JobSpec, stage: usize, stages: usize, device: &Device) -> Self {
        let full = Mlp::init(spec, device);
        // burn draws a parameter's initial values when it is first read: read them all, in
        // order, before dropping the layers other stages hold.
        materialize(&full);
        let blocks = full.layers.len() + 1;
        let mine = stage_blocks(blocks, stage, stages);
        Self {
            layers: full
                .layers
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mine.contains(i))
                .map(|(_, l)| l)
                .collect(),
            output: mine.contains(&(blocks - 1)).then_some(full.output),
        }
    }
}

/// A part of a model that runs as one pipeline stage. Activations between stages are 3-D:
/// `[n, 1, width]` for the mlp, `[n, seq_len, d_model]` for the gpt.
pub trait PipelineModel: Module + Clone + Send + Sized + 'static {
    /// The part of the model that the rank at `at` holds, initialised exactly as the same
    /// layers of one process are.
    fn new_stage(spec: &JobSpec, mesh: Mesh, at: Coords, device: &Device) -> Self;
    /// This stage's forward pass of a micro-batch, as segments whose last output is the stage's
    /// output: computed from the batch itself on the first stage (`input` is None), from the
    /// previous stage's activation (a leaf that requires a gradient) otherwise.
    fn forward_stage(
        &self,
        input: Option<Tensor<3>>,
        batch: &Batch,
        tp: &mut dyn TpSum,
        device: &Device,
    ) -> anyhow::Result<Vec<Segment>>;
    /// Parameters split over the tensor-parallel group (the others are replicated on it).
    fn tp_sharded(&self) -> Vec<ParamId> {
        Vec::new()
    }
    /// Replicated parameters whose gradient each tensor-parallel rank computes only in part
    /// (a llama's replicated key/value projections): summed over the group before the update.
    fn tp_partial(&self) -> Vec<ParamId> {
        Vec::new()
    }
    /// The last stage's loss (mean over the batch) from its output.
    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1>;
    /// The shape of the activation a stage passes on for `batch`.
    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3];
}

impl PipelineModel for MlpStage {
    fn new_stage(spec: &JobSpec, mesh: Mesh, at: Coords, device: &Device) -> Self {
        Self::new(spec, at.pp as usize, mesh.pp as usize, device)
    }

    fn forward_stage(
        &self,
        input: Option<Tensor<3>>,
        batch: &Batch,
        _tp: &mut dyn TpSum,
        device: &Device,
    ) -> anyhow::Result<Vec<Segment>> {
        let x = input.clone().unwrap_or_else(|| {
            let Batch::Regression { x, n, .. } = batch else {
                panic!("the mlp trains on regression batches");
            };
            Tensor::<3>::from_data(TensorData::new(x.clone(), [*n, 1, REGRESSION_IN]), device)
        });
        let hidden = self
            .layers
            .iter()
            .fold(x, |h, layer| relu(layer.forward(h)));
        let output = match &self.output {
            Some(output) => output.forward(hidden),
            None => hidden,
        };
        Ok(vec![Segment {
            inputs: input.map(|x| (x, false)).into_iter().collect(),
            outputs: vec![output],
        }])
    }

    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
        let Batch::Regression { y, n, .. } = batch else {
            panic!("the mlp trains on regression batches");
        };
        let y = Tensor::<2>::from_data(TensorData::new(y.clone(), [*n, REGRESSION_OUT]), device);
        MseLoss::new()
            .forward(output.reshape([*n, REGRESSION_OUT]), y, Reduction::Mean)
            .reshape([1])
    }

    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
        [batch.len(), 1, spec.model.d_model as usize]
    }
}

/// One pre-norm transformer block with causal self-attention.
#[derive(Module, Debug)]
pub struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    fc_out: Linear,
    heads: usize,
}

impl Block {
    fn new(d_model: usize, heads: usize, device: &Device) -> Self {
        Self {
            ln1: LayerNormConfig::new(d_model).init(device),
            qkv: LinearConfig::new(d_model, 3 * d_model).init(device),
            proj: LinearConfig::new(d_model, d_model).init(device),
            ln2: LayerNormConfig::new(d_model).init(device),
            fc: LinearConfig::new(d_model, 4 * d_model).init(device),
            fc_out: LinearConfig::new(4 * d_model, d_model).init(device),
            heads,
        }
    }

    /// `x` is `[batch, time, d_model]`; `mask` is `[1, 1, time, time]`, -inf above the diagonal.
    fn forward(&self, x: Tensor<3>, mask: &Tensor<4>) -> Tensor<3> {
        let qkv = self.qkv.forward(self.ln1.forward(x.clone()));
        let x = x + self.proj.forward(attention(qkv, self.heads, mask));
        let mlp = self
            .fc_out
            .forward(gelu(self.fc.forward(self.ln2.forward(x.clone()))));
        x + mlp
    }
}

/// Causal self-attention of `heads` heads from their queries, keys and values side by side
/// (`[batch, time, 3 · heads · head_dim]`, all queries first); returns `[batch, time, heads ·
/// head_dim]`.
fn attention(qkv: Tensor<3>, heads: usize, mask: &Tensor<4>) -> Tensor<3> {
    let [b, t, width] = qkv.dims();
    let d = width / 3;
    let dh = d / heads;
    let split = |i: usize| {
        qkv.clone()
            .narrow(2, i * d, d)
            .reshape([b, t, heads, dh])
            .swap_dims(1, 2)
    };
    let (q, k, v) = (split(0), split(1), split(2));
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt()) + mask.clone();
    softmax(scores, 3)
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([b, t, d])
}

/// A transformer block's share on one tensor-parallel rank, Megatron-style: this rank's
/// attention heads (the column-parallel QKV projection, the row-parallel output projection)
/// and its slice of the MLP (column-parallel `fc`, row-parallel `fc_out`). The layer norms and
/// the row-parallel layers' biases are replicated: they are added once, after the sum.
#[derive(Module, Debug)]
pub struct ShardedBlock {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    proj_bias: Param<Tensor<1>>,
    ln2: LayerNorm,
    fc: Linear,
    fc_out: Linear,
    fc_out_bias: Param<Tensor<1>>,
    /// This rank's attention heads.
    heads: usize,
}

/// The ids of a linear layer's weight and (if it has one) bias.
pub(crate) fn linear_ids(l: &Linear) -> impl Iterator<Item = ParamId> + '_ {
    std::iter::once(l.weight.id).chain(l.bias.as_ref().map(|b| b.id))
}

/// The blocks of the whole model's `blocks` that the pipeline stage at `at` holds.
pub(crate) fn stage_share<T>(blocks: Vec<T>, at: Coords, mesh: Mesh) -> impl Iterator<Item = T> {
    let mine = stage_blocks(blocks.len(), at.pp as usize, mesh.pp as usize);
    blocks
        .into_iter()
        .enumerate()
        .filter(move |(i, _)| mine.contains(i))
        .map(|(_, b)| b)
}

/// A fresh leaf of the autodiff graph from `t`, when `t` is on an autodiff device (training);
/// `t` itself otherwise (an evaluation without autodiff has no graph to cut).
pub(crate) fn leaf(t: Tensor<3>) -> Tensor<3> {
    if t.is_autodiff() { t.require_grad() } else { t }
}

/// A fresh trainable copy of (part of) an initialised parameter.
pub(crate) fn param<const D: usize>(value: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(value.detach())
}

/// Rank `rank` of `tp`'s piece of a block's parameter `field`, cut as the split table says
/// ([`block_split`]): of `parts` equal parts along `dim`, each cut into `tp` slices, slice
/// `rank` of each, side by side (one rank's columns of a fused QKV weight, `parts` = 3).
pub(crate) fn shard<const D: usize>(
    t: Tensor<D>,
    field: &str,
    rank: usize,
    tp: usize,
) -> Tensor<D> {
    let Split::Along { dim, parts } = block_split(field, tp as u32) else {
        return t;
    };
    let part = t.dims()[dim] / parts;
    let slice = part / tp;
    let pieces = (0..parts)
        .map(|p| t.clone().narrow(dim, p * part + rank * slice, slice))
        .collect();
    Tensor::cat(pieces, dim)
}

impl ShardedBlock {
    /// Rank `rank` of `tp`'s share of an initialised block.
    fn from_block(b: Block, rank: usize, tp: usize) -> Self {
        let bias = |l: &Linear| l.bias.as_ref().expect("linear layers have biases").val();
        // Column-parallel layers keep their (split) bias; a row-parallel layer's bias is
        // added once, after the sum over tp, so it leaves the layer.
        let column = |l: &Linear, name: &str| Linear {
            weight: param(shard(l.weight.val(), &format!("{name}.weight"), rank, tp)),
            bias: Some(param(shard(bias(l), &format!("{name}.bias"), rank, tp))),
        };
        let row = |l: &Linear, name: &str| Linear {
            weight: param(shard(l.weight.val(), &format!("{name}.weight"), rank, tp)),
            bias: None,
        };
        Self {
            qkv: column(&b.qkv, "qkv"),
            proj: row(&b.proj, "proj"),
            proj_bias: param(shard(bias(&b.proj), "proj.bias", rank, tp)),
            fc: column(&b.fc, "fc"),
            fc_out: row(&b.fc_out, "fc_out"),
            fc_out_bias: param(shard(bias(&b.fc_out), "fc_out.bias", rank, tp)),
            ln1: b.ln1,
            ln2: b.ln2,
            heads: b.heads / tp,
        }
    }
}

/// A piece of a stage's forward pass that ends where a gradient has to leave the autodiff graph:
/// at the stage's output, or at the input of a column-parallel layer, whose gradient is summed
/// over the tensor-parallel group (Megatron's f) before the previous piece's backward pass.
pub struct Segment {
    /// The leaves this piece starts from, each flagged when its gradient is summed over tp.
    pub inputs: Vec<(Tensor<3>, bool)>,
    pub outputs: Vec<Tensor<3>>,
}

/// Tensor parallelism of 1: nothing to sum.
pub(crate) struct Alone;

impl TpSum for Alone {
    fn size(&self) -> usize {
        1
    }

    fn sum(&mut self, t: Tensor<3>) -> anyhow::Result<Tensor<3>> {
        Ok(t)
    }
}

/// Sums a tensor over this rank's tensor-parallel group.
pub trait TpSum {
    /// The group's size; 1 means no tensor parallelism (and no communication).
    fn size(&self) -> usize;
    fn sum(&mut self, t: Tensor<3>) -> anyhow::Result<Tensor<3>>;
}

/// Records a stage's forward pass as [`Segment`]s. Without tensor parallelism there is nothing
/// to cut and the whole stage is one segment.
pub(crate) struct Tape<'a> {
    tp: &'a mut dyn TpSum,
    done: Vec<Segment>,
    open: Vec<(Tensor<3>, bool)>,
}

impl<'a> Tape<'a> {
    pub(crate) fn new(tp: &'a mut dyn TpSum, inputs: Vec<(Tensor<3>, bool)>) -> Self {
        Self {
            tp,
            done: Vec::new(),
            open: inputs,
        }
    }

    /// Ends the open segment at `(residual, normed)`, the input of a column-parallel layer, and
    /// opens the next from fresh leaves of both; the normed leaf's gradient is summed over tp.
    pub(crate) fn cut(&mut self, residual: Tensor<3>, normed: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        if self.tp.size() == 1 {
            return (residual, normed);
        }
        let leaf = |t: &Tensor<3>| leaf(t.clone().detach());
        let (r, n) = (leaf(&residual), leaf(&normed));
        self.done.push(Segment {
            inputs: std::mem::replace(&mut self.open, vec![(r.clone(), false), (n.clone(), true)]),
            outputs: vec![residual, normed],
        });
        (r, n)
    }

    /// Megatron's g: the sum of a row-parallel layer's partial outputs over tp in the forward
    /// pass; the identity in the backward pass (every rank already has the whole gradient).
    pub(crate) fn sum(&mut self, partial: Tensor<3>) -> anyhow::Result<Tensor<3>> {
        if self.tp.size() == 1 {
            return Ok(partial);
        }
        let total = self.tp.sum(partial.clone().detach())?;
        Ok(total + (partial.clone() - partial.detach()))
    }

    pub(crate) fn finish(mut self, output: Tensor<3>) -> Vec<Segment> {
        self.done.push(Segment {
            inputs: self.open,
            outputs: vec![output],
        });
        self.done
    }
}

impl ShardedBlock {
    fn forward(
        &self,
        x: Tensor<3>,
        mask: &Tensor<4>,
        tape: &mut Tape<'_>,
    ) -> anyhow::Result<Tensor<3>> {
        let normed = self.ln1.forward(x.clone());
        let (x, normed) = tape.cut(x, normed);
        let attended = attention(self.qkv.forward(normed), self.heads, mask);
        let x = x + (tape.sum(self.proj.forward(attended))? + bias3(&self.proj_bias));
        let normed = self.ln2.forward(x.clone());
        let (x, normed) = tape.cut(x, normed);
        let mlp = self.fc_out.forward(gelu(self.fc.forward(normed)));
        Ok(x + (tape.sum(mlp)? + bias3(&self.fc_out_bias)))
    }
}

/// A bias vector shaped to broadcast over `[batch, time, width]`.
pub(crate) fn bias3(b: &Param<Tensor<1>>) -> Tensor<3> {
    let [width] = b.val().dims();
    b.val().reshape([1, 1, width])
}

/// A character-level decoder-only transformer language model.
#[derive(Module, Debug)]
pub struct Gpt {
    tokens: Embedding,
    positions: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Linear,
}

/// Token plus position embeddings of a `[n, seq_len]` batch of token ids.
fn embed(
    tokens_table: &Embedding,
    positions_table: &Embedding,
    inputs: &[i64],
    n: usize,
    seq_len: usize,
    device: &Device,
) -> Tensor<3> {
    let tokens =
        Tensor::<2, Int>::from_data(TensorData::new(inputs.to_vec(), [n, seq_len]), device);
    let positions: Vec<i64> = (0..n).flat_map(|_| 0..seq_len as i64).collect();
    let positions = Tensor::<2, Int>::from_data(TensorData::new(positions, [n, seq_len]), device);
    tokens_table.forward(tokens) + positions_table.forward(positions)
}

/// Mean next-token cross-entropy of `[n, seq_len, vocab]` logits.
pub(crate) fn next_token_loss(logits: Tensor<3>, targets: &[i64], device: &Device) -> Tensor<1> {
    let [n, t, v] = logits.dims();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), [n * t]), device);
    CrossEntropyLossConfig::new()
        .init(device)
        .forward(logits.reshape([n * t, v]), targets)
}

impl Gpt {
    /// Next-token logits, `[batch, time, vocab]`.
    pub fn logits(&self, inputs: &[i64], n: usize, seq_len: usize, device: &Device) -> Tensor<3> {
        let mut x = embed(&self.tokens, &self.positions, inputs, n, seq_len, device);
        let mask = causal_mask(seq_len, device).cast(self.head.weight.val().dtype());
        for block in &self.blocks {
            x = block.forward(x, &mask);
        }
        self.head.forward(self.ln_f.forward(x))
    }
}

/// The part of the gpt one rank holds: for its pipeline stage, the embeddings (first stage), a
/// run of transformer blocks (its tensor-parallel share of each), and the final norm and output
/// head (last stage). Embeddings, norms and the head are replicated over the tp group.
#[derive(Module, Debug)]
pub struct GptStage {
    tokens: Option<Embedding>,
    positions: Option<Embedding>,
    blocks: Vec<ShardedBlock>,
    ln_f: Option<LayerNorm>,
    head: Option<Linear>,
}

impl PipelineModel for GptStage {
    fn new_stage(spec: &JobSpec, mesh: Mesh, at: Coords, device: &Device) -> Self {
        let full = Gpt::init(spec, device);
        materialize(&full);
        let (first, last) = (at.pp == 0, at.pp + 1 == mesh.pp);
        Self {
            tokens: first.then_some(full.tokens),
            positions: first.then_some(full.positions),
            blocks: stage_share(full.blocks, at, mesh)
                .map(|b| ShardedBlock::from_block(b, at.tp as usize, mesh.tp as usize))
                .collect(),
            ln_f: last.then_some(full.ln_f),
            head: last.then_some(full.head),
        }
    }

    fn forward_stage(
        &self,
        input: Option<Tensor<3>>,
        batch: &Batch,
        tp: &mut dyn TpSum,
        device: &Device,
    ) -> anyhow::Result<Vec<Segment>> {
        let Batch::Tokens {
            inputs, n, seq_len, ..
        } = batch
        else {
            panic!("the gpt trains on token batches");
        };
        let mut tape = Tape::new(tp, input.clone().map(|x| (x, false)).into_iter().collect());
        let mut x = match (input, &self.tokens, &self.positions) {
            (Some(x), _, _) => x,
            (None, Some(t), Some(p)) => embed(t, p, inputs, *n, *seq_len, device),
            (None, _, _) => panic!("only the first stage starts from tokens"),
        };
        let mask = causal_mask(*seq_len, device);
        for block in &self.blocks {
            x = block.forward(x, &mask, &mut tape)?;
        }
        let output = match (&self.ln_f, &self.head) {
            (Some(ln_f), Some(head)) => head.forward(ln_f.forward(x)),
            _ => x,
        };
        Ok(tape.finish(output))
    }

    fn tp_sharded(&self) -> Vec<ParamId> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.proj, &b.fc, &b.fc_out].map(linear_ids))
            .flatten()
            .collect()
    }

    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
        token_stage_loss(output, batch, device)
    }

    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
        token_activation_shape(spec, batch)
    }
}

pub(crate) fn causal_mask(t: usize, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
        .collect();
    Tensor::<4>::from_data(TensorData::new(values, [1, 1, t, t]), device)
}

impl TrainModel for Gpt {
    fn init(spec: &JobSpec, device: &Device) -> Self {
        let d = spec.model.d_model as usize;
        let heads = spec.model.heads as usize;
        Self {
            tokens: EmbeddingConfig::new(spec.vocab_size(), d).init(device),
            positions: EmbeddingConfig::new(spec.data.seq_len as usize, d).init(device),
            blocks: (0..spec.model.layers)
                .map(|_| Block::new(d, heads, device))
                .collect(),
            ln_f: LayerNormConfig::new(d).init(device),
            head: LinearConfig::new(d, spec.vocab_size()).init(device),
        }
    }

    fn loss(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        token_loss(batch, device, |i, n, t| self.logits(i, n, t, device))
    }

    fn logits_for(&self, batch: &Batch, device: &Device) -> Option<Tensor<3>> {
        token_logits(batch, |i, n, t| self.logits(i, n, t, device))
    }
}

/// A language model's mean next-token loss on a token batch, from its `logits(inputs, n,
/// seq_len)`, in f32 whatever precision the logits were computed in.
pub(crate) fn token_loss(
    batch: &Batch,
    device: &Device,
    logits: impl FnOnce(&[i64], usize, usize) -> Tensor<3>,
) -> Tensor<1> {
    let Batch::Tokens {
        inputs,
        targets,
        n,
        seq_len,
    } = batch
    else {
        panic!("a language model trains on token batches");
    };
    next_token_loss(
        logits(inputs, *n, *seq_len).cast(FloatDType::F32),
        targets,
        device,
    )
}

/// A language model's logits for a token batch (None for other batches).
pub(crate) fn token_logits(
    batch: &Batch,
    logits: impl FnOnce(&[i64], usize, usize) -> Tensor<3>,
) -> Option<Tensor<3>> {
    let Batch::Tokens {
        inputs, n, seq_len, ..
    } = batch
    else {
        return None;
    };
    Some(logits(inputs, *n, *seq_len))
}

/// A language model's last pipeline stage's loss: its output is the logits.
pub(crate) fn token_stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
    token_loss(batch, device, |_, _, _| output)
}

/// The activations between a language model's pipeline stages: `[n, seq_len, d_model]`.
pub(crate) fn token_activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
    let Batch::Tokens { n, seq_len, .. } = batch else {
        panic!("a language model trains on token batches");
    };
    [*n, *seq_len, spec.model.d_model as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::VOCAB;

    /// Copies all parameters into one flat vector, in visiting order.
    fn flat_parameters<M: Module>(model: &M) -> Vec<f32> {
        struct Collect(Vec<f32>);
        impl burn::module::ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                let data = param.val().into_data().convert::<f32>();
                self.0
                    .extend_from_slice(data.as_slice::<f32>().expect("f32 parameters"));
            }
        }
        let mut c = Collect(Vec::new());
        model.visit(&mut c);
        c.0
    }

    fn spec() -> JobSpec {
        JobSpec::from_json(
            r#"{"name":"t","model":{"kind":"mlp","layers":3},"train":{"steps":1,"global_batch":8,"lr":0.1}}"#,
        )
        .unwrap()
    }

    #[test]
    fn exact_match_counts_lines_whose_whole_answer_is_predicted() {
        // "1+2=3\n" and "4+4=8\n" as tokens; answers start after '=' (index 4).
        let tok = |c: u8| VOCAB.iter().position(|&v| v == c).unwrap() as i64;
        let line = |s: &str| s.bytes().map(tok).collect::<Vec<i64>>();
        let (a, b) = (line("1+2=3\n"), line("4+4=8\n"));
        let lines = [(a.as_slice(), 4), (b.as_slice(), 4)];
        let v = VOCAB.len();
        // Logits that predict each line's next token perfectly, except b's last answer token.
        let mut logits = vec![0.0f32; 2 * 6 * v];
        for (i, l) in [&a, &b].iter().enumerate() {
            for p in 0..5 {
                let mut next = l[p + 1] as usize;
                if i == 1 && p == 4 {
                    next = tok(b'7') as usize; // predicts '7' where '\n' follows
                }
                logits[(i * 6 + p) * v + next] = 1.0;
            }
        }
        let device = Device::flex();
        let logits = Tensor::<3>::from_data(TensorData::new(logits, [2, 6, v]), &device);
        assert_eq!(exact_matches(logits, &lines), 1);
    }

    #[test]
    fn pipeline_stages_hold_exactly_the_unsplit_models_parameters() {
        let _rng = crate::rng_lock();
        let device = Device::flex();
        device.seed(7);
        let whole = flat_parameters(&Mlp::init(&spec(), &device));
        for stages in [1, 2, 4] {
            let mut joined = Vec::new();
            for stage in 0..stages {
                device.seed(7);
                joined.extend(flat_parameters(&MlpStage::new(
                    &spec(),
                    stage,
                    stages,
                    &device,
                )));
            }
            assert!(
                joined == whole,
                "{stages} stages hold other parameters than the whole model"
            );
        }
    }
}
