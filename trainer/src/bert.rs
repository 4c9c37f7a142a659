//! The `bert` family, as Hugging Face's `BertModel` computes it: word, position and token-type
//! embeddings summed and layer-normed, then encoder layers of self-attention → residual →
//! LayerNorm, GELU MLP → residual → LayerNorm (post-LN), with biases everywhere; on top either
//! the masked-LM head of `BertForMaskedLM` (dense → GELU → LayerNorm → decoder, tied to the
//! word embeddings or its own, plus a bias) or the pooler (dense → tanh on `[CLS]`) and the
//! classifier of `BertForSequenceClassification`. Dropout is left out: training is
//! deterministic, and every layout must equal one process.
//!
//! One struct serves every layout: a rank's [`Bert`] holds the embeddings on the first pipeline
//! stage, a run of layers (its tensor-parallel share of each), and the head on the last. Tensor
//! parallelism is Megatron's: query/key/value and the intermediate layer are column-parallel,
//! the attention output and the output layer row-parallel, whose biases live beside them
//! (`attention_output_bias`, `output_bias`) to be added once, after the sum over the group.
//! Parameter names follow Hugging Face's structure (`embeddings.word_embeddings`,
//! `layers.N.query`, `pooler`, `classifier`); `hf.rs` maps them.

use crate::data::Batch;
use crate::model::{
    Alone, PipelineModel, Segment, Tape, TpSum, bias3, linear_ids, materialize, param, shard,
    stage_share,
};
use burn::module::{Module, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::{gelu, softmax, tanh};
use gantry_core::{Coords, JobSpec, Mesh, Task};

/// The shape of a bert, from the spec (Hugging Face's `config.json` fields).
#[derive(Debug, Clone, Copy)]
pub struct BertShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub positions: usize,
    pub types: usize,
    pub eps: f64,
    pub tied: bool,
    /// The classifier's labels; None for masked-LM.
    pub labels: Option<usize>,
}

impl BertShape {
    pub fn of(spec: &JobSpec) -> Self {
        let m = &spec.model;
        Self {
            hidden: m.d_model as usize,
            layers: m.layers as usize,
            heads: m.heads as usize,
            intermediate: m.intermediate_size() as usize,
            vocab: spec.vocab_size(),
            positions: m.max_position_embeddings.unwrap_or(spec.data.seq_len) as usize,
            types: m.type_vocab_size() as usize,
            eps: m.layer_norm_eps(),
            tied: m.tie_word_embeddings,
            labels: (spec.task() == Task::Classification)
                .then(|| m.num_labels.unwrap_or(2) as usize),
        }
    }
}

/// Hugging Face's initialisation: N(0, 0.02) weights (`initializer_range`).
fn initializer() -> Initializer {
    Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    }
}

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_initializer(initializer())
        .init(device)
}

fn norm(s: &BertShape, device: &Device) -> LayerNorm {
    LayerNormConfig::new(s.hidden)
        .with_epsilon(s.eps)
        .init(device)
}

/// A linear layer without its bias, and the bias: a row-parallel layer's bias is added after
/// the sum over the tensor-parallel group.
fn row_parallel(l: Linear) -> (Linear, Param<Tensor<1>>) {
    let bias = l.bias.expect("bert's linear layers have biases");
    (
        Linear {
            weight: l.weight,
            bias: None,
        },
        bias,
    )
}

#[derive(Module, Debug)]
pub struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn new(s: &BertShape, device: &Device) -> Self {
        let table = |n: usize| {
            EmbeddingConfig::new(n, s.hidden)
                .with_initializer(initializer())
                .init(device)
        };
        Self {
            word_embeddings: table(s.vocab),
            position_embeddings: table(s.positions),
            token_type_embeddings: table(s.types),
            layer_norm: norm(s, device),
        }
    }

    /// `[n, t, hidden]` of `[n, t]` token ids, at positions `0..t`, all of token type 0.
    fn forward(&self, inputs: &[i64], n: usize, t: usize, device: &Device) -> Tensor<3> {
        let ids = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [n, t]), device);
        let positions: Vec<i64> = (0..n).flat_map(|_| 0..t as i64).collect();
        let x = self.word_embeddings.forward(ids(inputs.to_vec()))
            + self.position_embeddings.forward(ids(positions))
            + self.token_type_embeddings.forward(ids(vec![0; n * t]));
        self.layer_norm.forward(x)
    }
}

/// One encoder layer, or one tensor-parallel rank's share of it (`heads` is then this rank's).
#[derive(Module, Debug)]
pub struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_output_bias: Param<Tensor<1>>,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_bias: Param<Tensor<1>>,
    output_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl BertLayer {
    fn new(s: &BertShape, device: &Device) -> Self {
        let h = s.hidden;
        let (attention_output, attention_output_bias) = row_parallel(linear(h, h, device));
        let (output, output_bias) = row_parallel(linear(s.intermediate, h, device));
        Self {
            query: linear(h, h, device),
            key: linear(h, h, device),
            value: linear(h, h, device),
            attention_output,
            attention_output_bias,
            attention_norm: norm(s, device),
            intermediate: linear(h, s.intermediate, device),
            output,
            output_bias,
            output_norm: norm(s, device),
            heads: s.heads,
            head_dim: h / s.heads,
        }
    }

    /// Rank `rank` of `tp`'s share (the split table in `layout.rs` says how each weight is cut).
    fn shard(self, rank: usize, tp: usize) -> Self {
        let cut = |l: &Linear, name: &str| Linear {
            weight: param(shard(l.weight.val(), &format!("{name}.weight"), rank, tp)),
            bias: l
                .bias
                .as_ref()
                .map(|b| param(shard(b.val(), &format!("{name}.bias"), rank, tp))),
        };
        Self {
            query: cut(&self.query, "query"),
            key: cut(&self.key, "key"),
            value: cut(&self.value, "value"),
            attention_output: cut(&self.attention_output, "attention_output"),
            intermediate: cut(&self.intermediate, "intermediate"),
            output: cut(&self.output, "output"),
            heads: self.heads / tp,
            head_dim: self.head_dim,
            attention_output_bias: self.attention_output_bias,
            attention_norm: self.attention_norm,
            output_bias: self.output_bias,
            output_norm: self.output_norm,
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        mask: Option<&Tensor<4>>,
        tape: &mut Tape<'_>,
    ) -> anyhow::Result<Tensor<3>> {
        // Post-LN: the column-parallel layers read the residual stream itself.
        let (x, input) = tape.cut(x.clone(), x);
        let attended = self.attention(input, mask);
        let partial = self.attention_output.forward(attended);
        let x = self
            .attention_norm
            .forward(x + tape.sum(partial)? + bias3(&self.attention_output_bias));
        let (x, input) = tape.cut(x.clone(), x);
        let partial = self.output.forward(gelu(self.intermediate.forward(input)));
        Ok(self
            .output_norm
            .forward(x + tape.sum(partial)? + bias3(&self.output_bias)))
    }

    /// Bidirectional self-attention of `x` `[batch, time, hidden]`; `mask` (added to the scores)
    /// hides padding. Returns `[batch, time, heads · head_dim]`.
    fn attention(&self, x: Tensor<3>, mask: Option<&Tensor<4>>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (heads, dh) = (self.heads, self.head_dim);
        let split = |y: Tensor<3>| y.reshape([b, t, heads, dh]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt());
        let scores = match mask {
            Some(mask) => scores + mask.clone().cast(v.dtype()),
            None => scores,
        };
        softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, heads * dh])
    }
}

/// `BertForMaskedLM`'s head: dense → GELU → LayerNorm → decoder (its own, or the word
/// embeddings' transpose when tied) + bias.
#[derive(Module, Debug)]
pub struct MlmHead {
    transform: Linear,
    layer_norm: LayerNorm,
    decoder: Option<Linear>,
    bias: Param<Tensor<1>>,
}

/// A rank's part of a bert: embeddings on the first pipeline stage, its layers, and the task's
/// head on the last (the masked-LM head, or the pooler and classifier).
#[derive(Module, Debug)]
pub struct Bert {
    embeddings: Option<BertEmbeddings>,
    layers: Vec<BertLayer>,
    mlm: Option<MlmHead>,
    pooler: Option<Linear>,
    classifier: Option<Linear>,
}

impl Bert {
    /// The whole model (pp = tp = 1), initialised from the device's seeded generator.
    pub fn whole(spec: &JobSpec, device: &Device) -> Self {
        let s = BertShape::of(spec);
        let (mlm, pooler, classifier) = match s.labels {
            None => {
                let mlm = MlmHead {
                    transform: linear(s.hidden, s.hidden, device),
                    layer_norm: norm(&s, device),
                    // Hugging Face's decoder has no bias of its own: `bias` is added after it.
                    decoder: (!s.tied).then(|| row_parallel(linear(s.hidden, s.vocab, device)).0),
                    bias: Param::from_tensor(Tensor::zeros([s.vocab], device)),
                };
                (Some(mlm), None, None)
            }
            Some(labels) => (
                None,
                Some(linear(s.hidden, s.hidden, device)),
                Some(linear(s.hidden, labels, device)),
            ),
        };
        Self {
            embeddings: Some(BertEmbeddings::new(&s, device)),
            layers: (0..s.layers).map(|_| BertLayer::new(&s, device)).collect(),
            mlm,
            pooler,
            classifier,
        }
    }

    /// The last hidden states `[n, t, hidden]` of `[n, t]` token ids (pp = tp = 1), the tokens
    /// of sample i past `lengths[i]` padding.
    pub fn hidden_states(
        &self,
        inputs: &[i64],
        lengths: Option<&[usize]>,
        n: usize,
        t: usize,
        device: &Device,
    ) -> Tensor<3> {
        let embeddings = self.embeddings.as_ref().expect("the whole model");
        let mut x = embeddings.forward(inputs, n, t, device);
        let mask = lengths.map(|l| padding_mask(l, t, device));
        let mut alone = Alone;
        let mut tape = Tape::new(&mut alone, Vec::new());
        for layer in &self.layers {
            x = layer
                .forward(x, mask.as_ref(), &mut tape)
                .expect("no communication without tensor parallelism");
        }
        x
    }

    /// The head's output from the last hidden states: masked-LM logits of the masked positions
    /// `[n, k, vocab]` or the classifier's logits `[n, 1, labels]`.
    pub fn head(&self, x: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<3> {
        let [n, t, h] = x.dims();
        if let (Some(pooler), Some(classifier)) = (&self.pooler, &self.classifier) {
            let first = x.narrow(1, 0, 1).reshape([n, h]);
            let pooled = tanh(pooler.forward(first));
            let logits = classifier.forward(pooled);
            let labels = logits.dims()[1];
            return logits.reshape([n, 1, labels]);
        }
        let mlm = self.mlm.as_ref().expect("a last stage has a head");
        let Batch::Masked { positions, .. } = batch else {
            panic!("masked-LM trains on masked batches");
        };
        let k = positions.len() / n;
        let at = Tensor::<1, Int>::from_data(TensorData::new(positions.clone(), [n * k]), device);
        let picked = x.reshape([n * t, h]).select(0, at);
        let hidden = mlm.layer_norm.forward(gelu(mlm.transform.forward(picked)));
        let logits = match (&mlm.decoder, &self.embeddings) {
            (Some(decoder), _) => decoder.forward(hidden),
            (None, Some(e)) => hidden.matmul(e.word_embeddings.weight.val().transpose()),
            (None, None) => unreachable!("a tied head has the embeddings (pp = 1)"),
        };
        let vocab = logits.dims()[1];
        (logits + mlm.bias.val().reshape([1, vocab])).reshape([n, k, vocab])
    }

    /// Parameters the head holds (the classifier and pooler, or the masked-LM head).
    pub fn is_head(name: &str) -> bool {
        ["pooler.", "classifier.", "mlm."]
            .iter()
            .any(|p| name.starts_with(p))
    }
}

/// The additive attention mask `[n, 1, 1, t]` hiding each sample's padding (past its length).
fn padding_mask(lengths: &[usize], t: usize, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = lengths
        .iter()
        .flat_map(|&len| (0..t).map(move |p| if p < len { 0.0 } else { -1e9 }))
        .collect();
    Tensor::<4>::from_data(TensorData::new(values, [lengths.len(), 1, 1, t]), device)
}

/// A bert batch's token ids, sizes and padding.
fn tokens(batch: &Batch) -> (&[i64], usize, usize, Option<&[usize]>) {
    match batch {
        Batch::Masked {
            inputs, n, seq_len, ..
        } => (inputs, *n, *seq_len, None),
        Batch::Labelled {
            inputs,
            lengths,
            n,
            seq_len,
            ..
        } => (inputs, *n, *seq_len, Some(lengths)),
        _ => panic!("the bert trains on masked or labelled batches"),
    }
}

/// The loss of a bert head's output (see [`Bert::head`]) on its batch, in f32.
pub fn head_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
    let [n, k, v] = output.dims();
    let targets = match batch {
        Batch::Masked { targets, .. } => targets.clone(),
        Batch::Labelled { labels, .. } => labels.clone(),
        _ => panic!("the bert trains on masked or labelled batches"),
    };
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n * k]), device);
    CrossEntropyLossConfig::new()
        .init(device)
        .forward(output.cast(FloatDType::F32).reshape([n * k, v]), targets)
}

impl PipelineModel for Bert {
    fn new_stage(spec: &JobSpec, mesh: Mesh, at: Coords, device: &Device) -> Self {
        let full = Bert::whole(spec, device);
        materialize(&full);
        let (first, last) = (at.pp == 0, at.pp + 1 == mesh.pp);
        Self {
            embeddings: full.embeddings.filter(|_| first),
            layers: stage_share(full.layers, at, mesh)
                .map(|l| l.shard(at.tp as usize, mesh.tp as usize))
                .collect(),
            mlm: full.mlm.filter(|_| last),
            pooler: full.pooler.filter(|_| last),
            classifier: full.classifier.filter(|_| last),
        }
    }

    fn forward_stage(
        &self,
        input: Option<Tensor<3>>,
        batch: &Batch,
        tp: &mut dyn TpSum,
        device: &Device,
    ) -> anyhow::Result<Vec<Segment>> {
        let (inputs, n, t, lengths) = tokens(batch);
        let mut tape = Tape::new(tp, input.clone().map(|x| (x, false)).into_iter().collect());
        let mut x = match (input, &self.embeddings) {
            (Some(x), _) => x,
            (None, Some(e)) => e.forward(inputs, n, t, device),
            (None, None) => panic!("only the first stage starts from tokens"),
        };
        let mask = lengths.map(|l| padding_mask(l, t, device));
        for layer in &self.layers {
            x = layer.forward(x, mask.as_ref(), &mut tape)?;
        }
        let last = self.mlm.is_some() || self.classifier.is_some();
        let output = if last { self.head(x, batch, device) } else { x };
        Ok(tape.finish(output))
    }

    fn tp_sharded(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attention_output,
                    &l.intermediate,
                    &l.output,
                ]
                .map(linear_ids)
            })
            .flatten()
            .collect()
    }

    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
        head_loss(output, batch, device)
    }

    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
        let (_, n, t, _) = tokens(batch);
        [n, t, spec.model.d_model as usize]
    }
}
