//! The `llama` family, as Hugging Face's `LlamaForCausalLM` computes it: token embeddings, then
//! decoder layers of RMSNorm → grouped-query self-attention with rotary position embeddings
//! (Hugging Face's half-split rotation) → residual, RMSNorm → SwiGLU MLP → residual, then a final
//! RMSNorm and the output head (or the embedding matrix again, with tied embeddings). No biases.
//!
//! Parameters carry Hugging Face's names where a field can (`embed_tokens`, `layers.N.q_proj`,
//! `input_layernorm`, `gate_proj`, ..., `norm`, `lm_head`), and burn's layout: a linear layer's
//! weight is `[in, out]`, the transpose of PyTorch's.
//!
//! Tensor parallelism is Megatron's: q/k/v and gate/up are column-parallel (a rank holds its
//! query heads, the key/value heads those queries read, and its slice of the MLP), o and down
//! row-parallel (partial outputs summed over the group). The norms and embeddings are
//! replicated.

use crate::data::Batch;
use crate::layout::stage_blocks;
use crate::model::{
    PipelineModel, Segment, Tape, TpSum, TrainModel, causal_mask, materialize, param, shard,
    token_activation_shape, token_logits, token_loss, token_stage_loss,
};
use burn::module::{Module, ParamId};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use gantry_core::{Coords, JobSpec, Mesh};

/// The shape of a llama, from the spec (Hugging Face's `config.json` fields).
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub eps: f64,
    pub tied: bool,
}

impl LlamaShape {
    pub fn of(spec: &JobSpec) -> Self {
        let m = &spec.model;
        Self {
            hidden: m.d_model as usize,
            layers: m.layers as usize,
            heads: m.heads as usize,
            kv_heads: m.kv_heads() as usize,
            intermediate: m.intermediate_size() as usize,
            vocab: spec.vocab_size(),
            rope_theta: m.rope_theta(),
            eps: m.rms_norm_eps(),
            tied: m.tie_word_embeddings,
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Linear layers without a bias, as Llama's.
fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(false).init(device)
}

/// One decoder layer, or one tensor-parallel rank's share of it (`heads` and `kv_heads` are then
/// this rank's).
#[derive(Module, Debug)]
pub struct LlamaLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: usize,
    kv_heads: usize,
}

impl LlamaLayer {
    fn new(s: &LlamaShape, device: &Device) -> Self {
        let (h, dh) = (s.hidden, s.head_dim());
        Self {
            input_layernorm: RmsNormConfig::new(h).with_epsilon(s.eps).init(device),
            q_proj: linear(h, s.heads * dh, device),
            k_proj: linear(h, s.kv_heads * dh, device),
            v_proj: linear(h, s.kv_heads * dh, device),
            o_proj: linear(s.heads * dh, h, device),
            post_attention_layernorm: RmsNormConfig::new(h).with_epsilon(s.eps).init(device),
            gate_proj: linear(h, s.intermediate, device),
            up_proj: linear(h, s.intermediate, device),
            down_proj: linear(s.intermediate, h, device),
            heads: s.heads,
            kv_heads: s.kv_heads,
        }
    }

    /// Rank `rank` of `tp`'s share (the split table in `layout.rs` says how each weight is cut).
    fn shard(self, rank: usize, tp: usize) -> Self {
        let cut = |l: &Linear, name: &str| Linear {
            weight: param(shard(l.weight.val(), &format!("{name}.weight"), rank, tp)),
            bias: None,
        };
        Self {
            q_proj: cut(&self.q_proj, "q_proj"),
            k_proj: cut(&self.k_proj, "k_proj"),
            v_proj: cut(&self.v_proj, "v_proj"),
            o_proj: cut(&self.o_proj, "o_proj"),
            gate_proj: cut(&self.gate_proj, "gate_proj"),
            up_proj: cut(&self.up_proj, "up_proj"),
            down_proj: cut(&self.down_proj, "down_proj"),
            heads: self.heads / tp,
            kv_heads: self.kv_heads / tp,
            input_layernorm: self.input_layernorm,
            post_attention_layernorm: self.post_attention_layernorm,
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: &Tensor<4>,
        tape: &mut Tape<'_>,
    ) -> anyhow::Result<Tensor<3>> {
        let normed = self.input_layernorm.forward(x.clone());
        let (x, normed) = tape.cut(x, normed);
        let attended = self.attention(normed, rope, mask);
        let x = x + tape.sum(self.o_proj.forward(attended))?;
        let normed = self.post_attention_layernorm.forward(x.clone());
        let (x, normed) = tape.cut(x, normed);
        let gated = silu(self.gate_proj.forward(normed.clone())) * self.up_proj.forward(normed);
        Ok(x + tape.sum(self.down_proj.forward(gated))?)
    }

    /// Causal grouped-query attention: each key/value head serves `heads / kv_heads` query heads
    /// (consecutive ones, as Hugging Face's `repeat_kv`). Returns `[batch, time, heads · dh]`.
    fn attention(&self, x: Tensor<3>, rope: &Rope, mask: &Tensor<4>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (heads, kv) = (self.heads, self.kv_heads);
        let dh = self.q_proj.weight.val().dims()[1] / heads;
        let split = |y: Tensor<3>, n: usize| y.reshape([b, t, n, dh]).swap_dims(1, 2);
        let q = rope.apply(split(self.q_proj.forward(x.clone()), heads));
        let k = rope.apply(split(self.k_proj.forward(x.clone()), kv));
        let v = split(self.v_proj.forward(x), kv);
        let repeat = |y: Tensor<4>| {
            y.unsqueeze_dim::<5>(2)
                .expand([b, kv, heads / kv, t, dh])
                .reshape([b, heads, t, dh])
        };
        let (k, v) = (repeat(k), repeat(v));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt()) + mask.clone();
        softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, heads * dh])
    }
}

/// Rotary position embeddings for `t` positions: Hugging Face's, which rotates the first half
/// of each head's features against the second (`rotate_half`), at frequencies
/// `theta^(-2i/dh)`.
pub struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    pub fn new(t: usize, dh: usize, theta: f64, device: &Device) -> Self {
        let half = dh / 2;
        let mut cos = Vec::with_capacity(t * dh);
        let mut sin = Vec::with_capacity(t * dh);
        for pos in 0..t {
            for i in 0..dh {
                let freq = theta.powf(-2.0 * (i % half) as f64 / dh as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [1, 1, t, dh]), device);
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// `x` is `[batch, heads, time, dh]`.
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let [_, _, _, dh] = x.dims();
        let half = dh / 2;
        let rotated = Tensor::cat(
            vec![
                x.clone().narrow(3, half, half).neg(),
                x.clone().narrow(3, 0, half),
            ],
            3,
        );
        x * self.cos.clone().cast(dtype) + rotated * self.sin.clone().cast(dtype)
    }
}

/// A whole llama (pp = tp = 1).
#[derive(Module, Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<LlamaLayer>,
    norm: RmsNorm,
    /// None with tied embeddings: the head is `embed_tokens`' matrix.
    lm_head: Option<Linear>,
    rope_theta: f64,
}

/// Tensor parallelism of 1: nothing to sum.
struct Alone;

impl TpSum for Alone {
    fn size(&self) -> usize {
        1
    }

    fn sum(&mut self, t: Tensor<3>) -> anyhow::Result<Tensor<3>> {
        Ok(t)
    }
}

fn tokens_of(inputs: &[i64], n: usize, seq_len: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<2, Int>::from_data(TensorData::new(inputs.to_vec(), [n, seq_len]), device)
}

/// The output head: its own matrix, or the (tied) embedding matrix, transposed.
fn head(x: Tensor<3>, lm_head: Option<&Linear>, embed: Option<&Embedding>) -> Tensor<3> {
    match (lm_head, embed) {
        (Some(head), _) => head.forward(x),
        (None, Some(embed)) => {
            let [b, t, h] = x.dims();
            let table = embed.weight.val();
            let [v, _] = table.dims();
            x.reshape([b * t, h])
                .matmul(table.transpose())
                .reshape([b, t, v])
        }
        (None, None) => unreachable!("a tied head has the embeddings"),
    }
}

impl Llama {
    /// Next-token logits, `[batch, time, vocab]`.
    pub fn logits(&self, inputs: &[i64], n: usize, seq_len: usize, device: &Device) -> Tensor<3> {
        let mut x = self
            .embed_tokens
            .forward(tokens_of(inputs, n, seq_len, device));
        let dtype = x.dtype();
        let dh = self.layers[0].q_proj.weight.val().dims()[1] / self.layers[0].heads;
        let rope = Rope::new(seq_len, dh, self.rope_theta, device);
        let mask = causal_mask(seq_len, device).cast(dtype);
        let mut alone = Alone;
        let mut tape = Tape::new(&mut alone, Vec::new());
        for layer in &self.layers {
            x = layer
                .forward(x, &rope, &mask, &mut tape)
                .expect("no communication without tensor parallelism");
        }
        head(
            self.norm.forward(x),
            self.lm_head.as_ref(),
            Some(&self.embed_tokens),
        )
    }
}

impl TrainModel for Llama {
    fn init(spec: &JobSpec, device: &Device) -> Self {
        let s = LlamaShape::of(spec);
        Self {
            embed_tokens: EmbeddingConfig::new(s.vocab, s.hidden).init(device),
            layers: (0..s.layers).map(|_| LlamaLayer::new(&s, device)).collect(),
            norm: RmsNormConfig::new(s.hidden)
                .with_epsilon(s.eps)
                .init(device),
            lm_head: (!s.tied).then(|| linear(s.hidden, s.vocab, device)),
            rope_theta: s.rope_theta,
        }
    }

    fn loss(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        token_loss(batch, device, |i, n, t| self.logits(i, n, t, device))
    }

    fn logits_for(&self, batch: &Batch, device: &Device) -> Option<Tensor<3>> {
        token_logits(batch, |i, n, t| self.logits(i, n, t, device))
    }
}

/// The part of a llama one rank holds: for its pipeline stage, the embeddings (first stage), a
/// run of decoder layers (its tensor-parallel share of each), the final norm and the head (last
/// stage). Tied embeddings need the embeddings and the head on one stage (pp = 1).
#[derive(Module, Debug)]
pub struct LlamaStage {
    embed_tokens: Option<Embedding>,
    layers: Vec<LlamaLayer>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    /// Whether this (last) stage's head is the embedding matrix.
    tied: bool,
    rope_theta: f64,
    head_dim: usize,
}

impl PipelineModel for LlamaStage {
    fn new_stage(spec: &JobSpec, mesh: Mesh, at: Coords, device: &Device) -> Self {
        let full = Llama::init(spec, device);
        materialize(&full);
        let s = LlamaShape::of(spec);
        let mine = stage_blocks(full.layers.len(), at.pp as usize, mesh.pp as usize);
        let (first, last) = (at.pp == 0, at.pp + 1 == mesh.pp);
        Self {
            embed_tokens: (first || (last && s.tied)).then_some(full.embed_tokens),
            layers: full
                .layers
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mine.contains(i))
                .map(|(_, l)| l.shard(at.tp as usize, mesh.tp as usize))
                .collect(),
            norm: last.then_some(full.norm),
            lm_head: full.lm_head.filter(|_| last),
            tied: last && s.tied,
            rope_theta: s.rope_theta,
            head_dim: s.head_dim(),
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
            panic!("the llama trains on token batches");
        };
        let mut tape = Tape::new(tp, input.clone().map(|x| (x, false)).into_iter().collect());
        let mut x = match (input, &self.embed_tokens) {
            (Some(x), _) => x,
            (None, Some(embed)) => embed.forward(tokens_of(inputs, *n, *seq_len, device)),
            (None, None) => panic!("only the first stage starts from tokens"),
        };
        let rope = Rope::new(*seq_len, self.head_dim, self.rope_theta, device);
        let mask = causal_mask(*seq_len, device);
        for layer in &self.layers {
            x = layer.forward(x, &rope, &mask, &mut tape)?;
        }
        let output = match &self.norm {
            Some(norm) => {
                let embed = self.embed_tokens.as_ref().filter(|_| self.tied);
                head(norm.forward(x), self.lm_head.as_ref(), embed)
            }
            None => x,
        };
        Ok(tape.finish(output))
    }

    fn tp_sharded(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .map(|linear| linear.weight.id)
            })
            .collect()
    }

    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
        token_stage_loss(output, batch, device)
    }

    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
        token_activation_shape(spec, batch)
    }
}
