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
use crate::model::{
    Alone, PipelineModel, Segment, Tape, TpSum, TrainModel, causal_mask, materialize, param, shard,
    stage_share, token_activation_shape, token_logits, token_loss, token_stage_loss,
};
use burn::module::{Module, ParamId};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use gantry_core::{Coords, JobSpec, Mesh};
use rand::SeedableRng;

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
    /// The key/value heads this rank attends with.
    kv_heads: usize,
    /// The key/value heads its projections compute: `kv_heads`, or all of them when they are
    /// replicated over tp (fewer than the ranks), of which this rank reads `kv_heads` from
    /// `kv_first` on.
    kv_projected: usize,
    kv_first: usize,
    kv_replicated: bool,
    head_dim: usize,
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
            kv_projected: s.kv_heads,
            kv_first: 0,
            kv_replicated: false,
            head_dim: dh,
        }
    }

    /// Rank `rank` of `tp`'s share (the split table in `layout.rs` says how each weight is cut).
    /// With fewer key/value heads than ranks, the key/value projections stay whole on every
    /// rank ([`crate::layout::kv_replicated`]) and the rank reads the head its query heads
    /// share: rank r's queries are heads r·h/tp.., which read key/value head r / (tp / kv).
    fn shard(self, rank: usize, tp: usize) -> Self {
        let cut = |l: &Linear, name: &str| Linear {
            weight: param(shard(l.weight.val(), &format!("{name}.weight"), rank, tp)),
            bias: None,
        };
        let replicated = self.kv_heads < tp;
        let (k_proj, v_proj) = if replicated {
            (self.k_proj, self.v_proj)
        } else {
            (cut(&self.k_proj, "k_proj"), cut(&self.v_proj, "v_proj"))
        };
        Self {
            q_proj: cut(&self.q_proj, "q_proj"),
            k_proj,
            v_proj,
            o_proj: cut(&self.o_proj, "o_proj"),
            gate_proj: cut(&self.gate_proj, "gate_proj"),
            up_proj: cut(&self.up_proj, "up_proj"),
            down_proj: cut(&self.down_proj, "down_proj"),
            heads: self.heads / tp,
            kv_heads: if replicated { 1 } else { self.kv_heads / tp },
            kv_projected: if replicated {
                self.kv_heads
            } else {
                self.kv_heads / tp
            },
            kv_first: if replicated {
                rank / (tp / self.kv_heads)
            } else {
                0
            },
            kv_replicated: replicated,
            head_dim: self.head_dim,
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
        Ok(x + tape.sum(self.swiglu(normed))?)
    }

    /// The SwiGLU MLP of normed `x` (this rank's partial sum under tp).
    fn swiglu(&self, x: Tensor<3>) -> Tensor<3> {
        let gated = silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x);
        self.down_proj.forward(gated)
    }

    /// Queries, keys and values of `x` `[batch, time, hidden]` at positions `from..`, each
    /// `[batch, heads, time, dh]`, the queries and keys rotated.
    fn project(&self, x: Tensor<3>, rope: &Rope, from: usize) -> [Tensor<4>; 3] {
        let [b, t, _] = x.dims();
        let split = |y: Tensor<3>, n: usize| y.reshape([b, t, n, self.head_dim]).swap_dims(1, 2);
        // This rank's key/value heads of those its projections compute.
        let kv = |y: Tensor<3>| split(y, self.kv_projected).narrow(1, self.kv_first, self.kv_heads);
        let q = rope.apply(split(self.q_proj.forward(x.clone()), self.heads), from);
        let k = rope.apply(kv(self.k_proj.forward(x.clone())), from);
        [q, k, kv(self.v_proj.forward(x))]
    }

    /// Grouped-query attention of queries `q` over keys and values `k`, `v` (`[batch, kv_heads,
    /// time, dh]`): each key/value head serves `heads / kv_heads` query heads (consecutive
    /// ones, as Hugging Face's `repeat_kv`). `mask` is added to the scores when given. Returns
    /// `[batch, time of q, heads · dh]`.
    fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Option<&Tensor<4>>,
    ) -> Tensor<3> {
        let [b, heads, tq, dh] = q.dims();
        let [_, kv, tk, _] = k.dims();
        let repeat = |y: Tensor<4>| {
            y.unsqueeze_dim::<5>(2)
                .expand([b, kv, heads / kv, tk, dh])
                .reshape([b, heads, tk, dh])
        };
        let scores = q
            .matmul(repeat(k).swap_dims(2, 3))
            .div_scalar((dh as f32).sqrt());
        let scores = match mask {
            Some(mask) => scores + mask.clone(),
            None => scores,
        };
        softmax(scores, 3)
            .matmul(repeat(v))
            .swap_dims(1, 2)
            .reshape([b, tq, heads * dh])
    }

    /// Causal self-attention of normed `x`. Returns `[batch, time, heads · dh]`.
    fn attention(&self, x: Tensor<3>, rope: &Rope, mask: &Tensor<4>) -> Tensor<3> {
        let [q, k, v] = self.project(x, rope, 0);
        self.attend(q, k, v, Some(mask))
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

    /// `x` is `[batch, heads, time, dh]`, at positions `from..from + time`.
    fn apply(&self, x: Tensor<4>, from: usize) -> Tensor<4> {
        let t = x.dims()[2];
        let at = |table: &Tensor<4>| table.clone().narrow(2, from, t);
        rotate(x, at(&self.cos), at(&self.sin))
    }
}

/// `x · cos + rotate_half(x) · sin`, the tables broadcast over batch and heads.
fn rotate(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
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
    x * cos.cast(dtype) + rotated * sin.cast(dtype)
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
        let rope = Rope::new(seq_len, self.layers[0].head_dim, self.rope_theta, device);
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
    rope_theta: f64,
    head_dim: usize,
}

impl PipelineModel for LlamaStage {
    fn new_stage(spec: &JobSpec, mesh: Mesh, at: Coords, device: &Device) -> Self {
        let full = Llama::init(spec, device);
        materialize(&full);
        let s = LlamaShape::of(spec);
        let (first, last) = (at.pp == 0, at.pp + 1 == mesh.pp);
        Self {
            // Tied embeddings keep pp = 1: the one stage has the embeddings for its head too.
            embed_tokens: first.then_some(full.embed_tokens),
            layers: stage_share(full.layers, at, mesh)
                .map(|l| l.shard(at.tp as usize, mesh.tp as usize))
                .collect(),
            norm: last.then_some(full.norm),
            lm_head: full.lm_head.filter(|_| last),
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
            Some(norm) => head(
                norm.forward(x),
                self.lm_head.as_ref(),
                self.embed_tokens.as_ref(),
            ),
            None => x,
        };
        Ok(tape.finish(output))
    }

    fn tp_sharded(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .flat_map(|l| {
                let kv = (!l.kv_replicated).then_some([&l.k_proj, &l.v_proj]);
                [&l.q_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
                    .into_iter()
                    .chain(kv.into_iter().flatten())
                    .map(|linear| linear.weight.id)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn tp_partial(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .filter(|l| l.kv_replicated)
            .flat_map(|l| [l.k_proj.weight.id, l.v_proj.weight.id])
            .collect()
    }

    fn stage_loss(output: Tensor<3>, batch: &Batch, device: &Device) -> Tensor<1> {
        token_stage_loss(output, batch, device)
    }

    fn activation_shape(spec: &JobSpec, batch: &Batch) -> [usize; 3] {
        token_activation_shape(spec, batch)
    }
}

/// How `Llama::generate` picks each next token.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 is greedy (the most likely token); above 0, logits are divided by it and sampled.
    pub temperature: f64,
    /// Sample among the `top_k` most likely tokens only (0: all).
    pub top_k: usize,
    pub seed: u64,
}

/// One layer's keys and values so far (after the rotary embedding), `[1, kv_heads, t, dh]`.
struct LayerCache {
    k: Tensor<4>,
    v: Tensor<4>,
}

impl LlamaLayer {
    /// The layer on one new position `pos`, `x` `[1, 1, hidden]`, attending to the cached keys
    /// and values (to which it adds its own).
    fn decode(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        pos: usize,
        cache: &mut Option<LayerCache>,
    ) -> Tensor<3> {
        let normed = self.input_layernorm.forward(x.clone());
        let [q, k, v] = self.project(normed, rope, pos);
        let (k, v) = match cache.take() {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        *cache = Some(LayerCache {
            k: k.clone(),
            v: v.clone(),
        });
        // The one new query sees every cached position: nothing to mask.
        let x = x + self.o_proj.forward(self.attend(q, k, v, None));
        let normed = self.post_attention_layernorm.forward(x.clone());
        x + self.swiglu(normed)
    }
}

impl Llama {
    /// `new` tokens after `prompt`. With `cache`, each step runs the model on the new token
    /// only, reading earlier positions' keys and values from a cache; without, it runs the whole
    /// sequence again (what the cache must equal).
    /// With the logits each new token was picked from.
    pub fn generate(
        &self,
        prompt: &[i64],
        new: usize,
        sampling: Sampling,
        cache: bool,
        device: &Device,
    ) -> (Vec<i64>, Vec<Vec<f32>>) {
        assert!(!prompt.is_empty(), "a prompt of at least one token");
        let total = prompt.len() + new;
        let rope = Rope::new(total, self.layers[0].head_dim, self.rope_theta, device);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
        let mut tokens = prompt.to_vec();
        let mut caches: Vec<Option<LayerCache>> = (0..self.layers.len()).map(|_| None).collect();
        let mut fed = 0;
        let mut seen = Vec::with_capacity(new);
        while tokens.len() < total {
            let last = if cache {
                let mut out = None;
                for (pos, &token) in tokens.iter().enumerate().skip(fed) {
                    let mut x = self.embed_tokens.forward(tokens_of(&[token], 1, 1, device));
                    for (layer, c) in self.layers.iter().zip(&mut caches) {
                        x = layer.decode(x, &rope, pos, c);
                    }
                    out = Some(x);
                }
                fed = tokens.len();
                let x = self.norm.forward(out.expect("a token fed"));
                head(x, self.lm_head.as_ref(), Some(&self.embed_tokens))
            } else {
                let t = tokens.len();
                self.logits(&tokens, 1, t, device).narrow(1, t - 1, 1)
            };
            let logits: Vec<f32> = last
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("f32 logits");
            tokens.push(pick(&logits, sampling, &mut rng));
            seen.push(logits);
        }
        (tokens.split_off(prompt.len()), seen)
    }
}

/// `new` tokens after `prompt` from a llama of `spec` holding `whole` (a checkpoint's
/// whole-model parameters), on the CPU with the key/value cache.
pub fn continue_on_cpu(
    spec: &JobSpec,
    whole: std::collections::BTreeMap<String, crate::reshard::Tensor32>,
    prompt: &[i64],
    new: usize,
    sampling: Sampling,
) -> anyhow::Result<Vec<i64>> {
    let device = Device::flex();
    let one = Mesh::new(1, 1, 1);
    let model = crate::pretrained::Pretrained::from_whole(whole).apply(
        Llama::init(spec, &device),
        spec,
        one,
        one.coords(0),
    )?;
    Ok(model.generate(prompt, new, sampling, true, &device).0)
}

/// The next token from one position's logits.
fn pick(logits: &[f32], s: Sampling, rng: &mut impl rand::Rng) -> i64 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Most likely first; ties to the lower id, as argmax.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.temperature <= 0.0 {
        return order[0] as i64;
    }
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let top = f64::from(logits[order[0]]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i]) - top) / s.temperature).exp())
        .collect();
    let mut at = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in order.iter().zip(&weights) {
        if at < *w {
            return *i as i64;
        }
        at -= w;
    }
    *order.last().expect("a vocabulary") as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"t","model":{{"kind":"llama","layers":2,"d_model":32,"heads":4,
            "num_key_value_heads":2{extra}}},"train":{{"steps":1,"global_batch":2,"lr":0.1}}}}"#
        ))
        .unwrap()
    }

    /// Decoding with the key/value cache writes what decoding without it (the whole sequence
    /// again each step) writes: greedily, and sampled from the same seed.
    #[test]
    fn decoding_with_the_cache_equals_decoding_without_it() {
        let _rng = crate::rng_lock();
        let device = Device::flex();
        for extra in ["", r#","num_key_value_heads":1,"tie_word_embeddings":true"#] {
            device.seed(3);
            let model = Llama::init(&spec(extra), &device);
            let prompt = [1, 5, 9, 2];
            for sampling in [
                Sampling {
                    temperature: 0.0,
                    top_k: 0,
                    seed: 0,
                },
                Sampling {
                    temperature: 1000.0,
                    top_k: 5,
                    seed: 7,
                },
            ] {
                let (cached, _) = model.generate(&prompt, 12, sampling, true, &device);
                let (full, _) = model.generate(&prompt, 12, sampling, false, &device);
                assert_eq!(cached.len(), 12);
                assert_eq!(cached, full, "{extra} {sampling:?}");
            }
            // Greedily, step by step, the cached logits are the recomputed ones within 1e-4,
            // and they change from step to step (each position is its own).
            let greedy = Sampling {
                temperature: 0.0,
                top_k: 0,
                seed: 0,
            };
            let (_, cached) = model.generate(&prompt, 12, greedy, true, &device);
            let (_, full) = model.generate(&prompt, 12, greedy, false, &device);
            let differ = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max)
            };
            for (step, (c, f)) in cached.iter().zip(&full).enumerate() {
                assert!(differ(c, f) < 1e-4, "{extra} step {step}: {}", differ(c, f));
            }
            assert!(differ(&cached[0], &cached[11]) > 1e-3, "{extra}");
            // Sampling hot does not always write what greedy does.
            let hot = Sampling {
                temperature: 1000.0,
                top_k: 0,
                seed: 1,
            };
            let greedy = Sampling {
                temperature: 0.0,
                top_k: 0,
                seed: 0,
            };
            assert_ne!(
                model.generate(&prompt, 12, hot, true, &device).0,
                model.generate(&prompt, 12, greedy, true, &device).0
            );
        }
    }
}
