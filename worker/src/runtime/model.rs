//! The built-in models. A [`TrainModel`] builds itself from a spec and turns a [`Batch`] into a
//! scalar loss (mean over the batch), which is all the training loop needs.

use crate::runtime::data::{Batch, REGRESSION_IN, REGRESSION_OUT, VOCAB};
use burn::module::Module;
use burn::nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, relu, softmax};
use gantry_core::JobSpec;

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
        let x = Tensor::<2>::from_data(TensorData::new(x.clone(), [*n, REGRESSION_IN]), device);
        let y = Tensor::<2>::from_data(TensorData::new(y.clone(), [*n, REGRESSION_OUT]), device);
        let hidden = self
            .layers
            .iter()
            .fold(x, |h, layer| relu(layer.forward(h)));
        MseLoss::new()
            .forward(self.output.forward(hidden), y, Reduction::Mean)
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

/// Blocks `[start, end)` of `blocks` that stage `stage` of `stages` holds: balanced by count.
pub fn stage_blocks(blocks: usize, stage: usize, stages: usize) -> std::ops::Range<usize> {
    (stage * blocks / stages)..((stage + 1) * blocks / stages)
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
    /// Stage `stage` of `stages`, initialised exactly as the same layers of one process are.
    fn new_stage(spec: &JobSpec, stage: usize, stages: usize, device: &Device) -> Self;
    /// This stage's output for a micro-batch: computed from the batch itself on the first stage
    /// (`input` is None), from the previous stage's activation otherwise.
    fn forward_stage(&self, input: Option<Tensor<3>>, batch: &Batch, device: &Device) -> Tensor<3>;
    /// The last stage's loss (mean over the batch) from its output.
    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1>;
    /// The shape of the activation a stage passes on for `batch`.
    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3];
}

impl PipelineModel for MlpStage {
    fn new_stage(spec: &JobSpec, stage: usize, stages: usize, device: &Device) -> Self {
        Self::new(spec, stage, stages, device)
    }

    fn forward_stage(&self, input: Option<Tensor<3>>, batch: &Batch, device: &Device) -> Tensor<3> {
        let x = input.unwrap_or_else(|| {
            let Batch::Regression { x, n, .. } = batch else {
                panic!("the mlp trains on regression batches");
            };
            Tensor::<3>::from_data(TensorData::new(x.clone(), [*n, 1, REGRESSION_IN]), device)
        });
        let hidden = self
            .layers
            .iter()
            .fold(x, |h, layer| relu(layer.forward(h)));
        match &self.output {
            Some(output) => output.forward(hidden),
            None => hidden,
        }
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
        let [b, t, d] = x.dims();
        let h = self.heads;
        let dh = d / h;
        let qkv = self.qkv.forward(self.ln1.forward(x.clone()));
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([b, t, h, dh])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt()) + mask.clone();
        let attended = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, d]);
        let x = x + self.proj.forward(attended);
        let mlp = self
            .fc_out
            .forward(gelu(self.fc.forward(self.ln2.forward(x.clone()))));
        x + mlp
    }
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
fn next_token_loss(logits: Tensor<3>, targets: &[i64], device: &Device) -> Tensor<1> {
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
        let mask = causal_mask(seq_len, device);
        for block in &self.blocks {
            x = block.forward(x, &mask);
        }
        self.head.forward(self.ln_f.forward(x))
    }
}

/// The part of the gpt one pipeline stage holds: the embeddings (first stage), a run of
/// transformer blocks, and the final norm and output head (last stage).
#[derive(Module, Debug)]
pub struct GptStage {
    tokens: Option<Embedding>,
    positions: Option<Embedding>,
    blocks: Vec<Block>,
    ln_f: Option<LayerNorm>,
    head: Option<Linear>,
}

impl PipelineModel for GptStage {
    fn new_stage(spec: &JobSpec, stage: usize, stages: usize, device: &Device) -> Self {
        let full = Gpt::init(spec, device);
        materialize(&full);
        let mine = stage_blocks(full.blocks.len(), stage, stages);
        let (first, last) = (stage == 0, stage + 1 == stages);
        Self {
            tokens: first.then_some(full.tokens),
            positions: first.then_some(full.positions),
            blocks: full
                .blocks
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mine.contains(i))
                .map(|(_, b)| b)
                .collect(),
            ln_f: last.then_some(full.ln_f),
            head: last.then_some(full.head),
        }
    }

    fn forward_stage(&self, input: Option<Tensor<3>>, batch: &Batch, device: &Device) -> Tensor<3> {
        let Batch::Tokens {
            inputs, n, seq_len, ..
        } = batch
        else {
            panic!("the gpt trains on token batches");
        };
        let mut x = match (input, &self.tokens, &self.positions) {
            (Some(x), _, _) => x,
            (None, Some(t), Some(p)) => embed(t, p, inputs, *n, *seq_len, device),
            (None, _, _) => panic!("only the first stage starts from tokens"),
        };
        let mask = causal_mask(*seq_len, device);
        for block in &self.blocks {
            x = block.forward(x, &mask);
        }
        match (&self.ln_f, &self.head) {
            (Some(ln_f), Some(head)) => head.forward(ln_f.forward(x)),
            _ => x,
        }
    }

    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
        let Batch::Tokens { targets, .. } = batch else {
            panic!("the gpt trains on token batches");
        };
        next_token_loss(output, targets, device)
    }

    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
        let Batch::Tokens { n, seq_len, .. } = batch else {
            panic!("the gpt trains on token batches");
        };
        [*n, *seq_len, spec.model.d_model as usize]
    }
}

fn causal_mask(t: usize, device: &Device) -> Tensor<4> {
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
            tokens: EmbeddingConfig::new(VOCAB.len(), d).init(device),
            positions: EmbeddingConfig::new(spec.data.seq_len as usize, d).init(device),
            blocks: (0..spec.model.layers)
                .map(|_| Block::new(d, heads, device))
                .collect(),
            ln_f: LayerNormConfig::new(d).init(device),
            head: LinearConfig::new(d, VOCAB.len()).init(device),
        }
    }

    fn loss(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        let Batch::Tokens {
            inputs,
            targets,
            n,
            seq_len,
        } = batch
        else {
            panic!("the gpt trains on token batches");
        };
        next_token_loss(self.logits(inputs, *n, *seq_len, device), targets, device)
    }

    fn logits_for(&self, batch: &Batch, device: &Device) -> Option<Tensor<3>> {
        let Batch::Tokens {
            inputs, n, seq_len, ..
        } = batch
        else {
            return None;
        };
        Some(self.logits(inputs, *n, *seq_len, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
