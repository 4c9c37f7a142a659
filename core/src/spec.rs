//! The job spec: what a user writes (TOML or JSON, plus `--set key=value` overrides), checked
//! field by field. Every error names the field it is about, so the CLI and the coordinator's
//! INVALID_ARGUMENT say exactly what to fix.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// An invalid spec. `field` is the dotted path (`train.lr`, `parallel.dp`), or `spec` for the
/// document as a whole.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The object stores a checkpoint URL may name.
pub const CHECKPOINT_SCHEMES: &[&str] = &["file", "s3", "az", "abfs", "abfss", "azure", "gs"];
/// What an unsupported checkpoint URL's error suggests instead.
pub const CHECKPOINT_SCHEMES_HINT: &str =
    "use file://, s3://, az:// (or abfs[s]:// or azure://) or gs://";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub model: ModelSpec,
    #[serde(default)]
    pub data: DataSpec,
    pub train: TrainSpec,
    #[serde(default)]
    pub parallel: ParallelSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub resources: ResourcesSpec,
    #[serde(default)]
    pub fault_tolerance: FaultToleranceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A multi-layer perceptron on a synthetic regression task.
    Mlp,
    /// A small decoder-only transformer language model (GPT-2's block: pre-LayerNorm, learned
    /// positions, GELU).
    Gpt,
    /// A Llama-family decoder (Hugging Face's `LlamaForCausalLM`): RMSNorm, rotary positions,
    /// SwiGLU, grouped-query attention, optionally tied embeddings.
    Llama,
    /// A BERT encoder (Hugging Face's `BertModel`): word, position and token-type embeddings,
    /// post-LayerNorm blocks with GELU; a masked-LM head for pre-training
    /// (`train.task = "language_model"`) or a pooler and classifier for fine-tuning
    /// (`train.task = "classification"`).
    Bert,
}

impl ModelKind {
    /// Whether the model is a transformer over tokens (and so trains on token data).
    pub fn is_language_model(self) -> bool {
        matches!(self, ModelKind::Gpt | ModelKind::Llama | ModelKind::Bert)
    }
}

/// What a job trains its model for (`train.task`; by default the model's own pre-training
/// objective, see [`JobSpec::task`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Next-token prediction: the decoders' (`gpt`, `llama`; the `mlp` regresses).
    Lm,
    /// Masked-LM: the `bert`'s pre-training.
    Mlm,
    /// Sequence classification (`bert`): one label per document of a labelled dataset
    /// (`gantry data prepare --label-field`), reported with accuracy, precision, recall and F1.
    Classification,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub kind: ModelKind,
    /// Transformer blocks (`gpt`, `llama`) or hidden layers (`mlp`). Also read as Hugging
    /// Face's `num_hidden_layers`.
    #[serde(default = "default_layers", alias = "num_hidden_layers")]
    pub layers: u32,
    /// Width of the residual stream (`gpt`, `llama`) or of the hidden layers (`mlp`). Also read
    /// as `hidden_size`.
    #[serde(default = "default_d_model", alias = "hidden_size")]
    pub d_model: u32,
    /// Attention heads (`gpt`, `llama`). Also read as `num_attention_heads`.
    #[serde(default = "default_heads", alias = "num_attention_heads")]
    pub heads: u32,
    /// `llama`: key/value heads of grouped-query attention (1 is multi-query); by default
    /// `heads` (multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<u32>,
    /// The MLP's width: `llama`'s SwiGLU (by default 8/3 · d_model rounded up to a multiple of
    /// 32), `bert`'s GELU MLP (by default 4 · d_model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<u32>,
    /// `llama`: the rotary embeddings' base, 10000 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `llama`: RMSNorm's epsilon, 1e-6 by default (Hugging Face's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// `llama`, `bert`'s masked-LM head: the output head is the embedding matrix (pp = 1 only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tie_word_embeddings: bool,
    /// The longest sequence the model is for; `data.seq_len` may not exceed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<u32>,
    /// `llama`: a Hugging Face model folder (`config.json`, `model.safetensors` or sharded
    /// safetensors with their index), an absolute path or a store URL, whose weights a fresh
    /// job starts from. Its config must agree with the model's fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// `bert`: token types (segments) of the token-type embeddings, 2 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_vocab_size: Option<u32>,
    /// `bert`: LayerNorm's epsilon, 1e-12 by default (Hugging Face's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_eps: Option<f64>,
    /// `bert` with `train.task = "classification"`: how many labels the classifier tells
    /// apart; by default the dataset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<u32>,
    /// The `gpt`'s vocabulary: 13 on `builtin:arithmetic`; on a dataset, its tokenizer's (taken
    /// from the dataset when not given, refused when different).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<u32>,
}

impl ModelSpec {
    /// Key/value heads (`llama`): `num_key_value_heads`, or `heads`.
    pub fn kv_heads(&self) -> u32 {
        self.num_key_value_heads.unwrap_or(self.heads)
    }

    /// The MLP's width: `intermediate_size`, or for the `llama` 8/3 · d_model rounded up to 32,
    /// for the `bert` 4 · d_model.
    pub fn intermediate_size(&self) -> u32 {
        self.intermediate_size.unwrap_or_else(|| match self.kind {
            ModelKind::Bert => 4 * self.d_model,
            _ => (8 * self.d_model).div_ceil(3).div_ceil(32) * 32,
        })
    }

    pub fn type_vocab_size(&self) -> u32 {
        self.type_vocab_size.unwrap_or(2)
    }

    pub fn layer_norm_eps(&self) -> f64 {
        self.layer_norm_eps.unwrap_or(1e-12)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.unwrap_or(10_000.0)
    }

    pub fn rms_norm_eps(&self) -> f64 {
        self.rms_norm_eps.unwrap_or(1e-6)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `builtin:arithmetic` (for `gpt`), `builtin:regression` (for `mlp`), or
    /// `dataset:<path or URL>` (for `gpt`), a dataset `gantry data prepare` wrote.
    #[serde(default = "default_source")]
    pub source: String,
    /// Options of the dataset store's client (object_store keys, as `checkpoint.options`),
    /// over the workers' own. Never a credential: the coordinator stores the spec.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::store_options::scalars_as_strings"
    )]
    pub options: BTreeMap<String, String>,
    #[serde(default = "default_seq_len")]
    pub seq_len: u32,
    /// Train / validation / test fractions.
    #[serde(default = "default_split")]
    pub split: [f64; 3],
    /// Examples the built-in generator makes before splitting.
    #[serde(default = "default_examples")]
    pub examples: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub steps: u64,
    pub global_batch: u32,
    /// Gradient-accumulation micro-batches per step (pipeline micro-batches when pp > 1).
    #[serde(default = "one")]
    pub micro_batches: u32,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Maximum global gradient norm; 0 disables clipping.
    #[serde(default)]
    pub grad_clip: f64,
    /// Evaluate on the validation split every this many steps; 0 only at the end.
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Compute precision: "f32"; "bf16" (bf16 compute, f32 master weights and Adam state); or
    /// "fp16" (the same in fp16, with dynamic loss scaling: steps whose gradients overflow are
    /// skipped and counted).
    #[serde(default)]
    pub precision: Precision,
    /// fp16's dynamic loss scaling (ignored by the other precisions).
    #[serde(default)]
    pub loss_scaling: LossScaling,
    /// Recompute activations in the backward pass instead of keeping them: less memory, more compute.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// What the model is trained for: "lm" (the decoders' default), "mlm" (the bert's
    /// default) or "classification" (`bert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// Fine-tuning: the embeddings keep their (pretrained) values.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_embeddings: bool,
    /// Fine-tuning: the first this many layers keep their values.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub freeze_layers: u32,
    /// Fine-tuning: the learning rate of the task head (the classifier and pooler), on the
    /// same warm-up and cosine schedule as `lr`; by default `lr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_lr: Option<f64>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// fp16's dynamic loss scaling, as PyTorch's `GradScaler`: the loss is multiplied by `initial`
/// before the first backward pass; the factor halves and the step is skipped whenever a gradient
/// overflows, and doubles after `growth_interval` clean steps in a row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossScaling {
    #[serde(default = "default_initial_scale")]
    pub initial: f64,
    #[serde(default = "default_growth_interval")]
    pub growth_interval: u32,
}

fn default_initial_scale() -> f64 {
    65536.0
}

fn default_growth_interval() -> u32 {
    2000
}

impl Default for LossScaling {
    fn default() -> Self {
        Self {
            initial: default_initial_scale(),
            growth_interval: default_growth_interval(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    Fp16,
}

impl Precision {
    /// The name a spec gives it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

/// What a rank trains on: the CPU, or one CUDA GPU per rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    #[serde(default = "one")]
    pub dp: u32,
    #[serde(default = "one")]
    pub tp: u32,
    #[serde(default = "one")]
    pub pp: u32,
    /// Gradients are all-reduced in buckets of about this many MiB (like DDP's bucket_cap_mb).
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// How pipeline stages order micro-batches (pp > 1).
    #[serde(default)]
    pub schedule: PipelineSchedule,
}

/// The order in which a pipeline stage runs its micro-batches' forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PipelineSchedule {
    /// One forward, one backward after a warm-up: at most `pp` micro-batches of activations live.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Every forward, then every backward: simple, holds all micro-batches' activations.
    #[serde(rename = "gpipe")]
    GPipe,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Object-store URL; empty means `file://{coordinator state dir}/checkpoints`.
    #[serde(default)]
    pub url: String,
    /// Save every this many steps (and always at the last step); 0 saves only at the end.
    #[serde(default = "default_every_steps")]
    pub every_steps: u64,
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// Upload periodic checkpoints in the background while training goes on (the last step's,
    /// and a drain's, are always written before the rank ends).
    #[serde(default = "yes")]
    pub async_upload: bool,
    /// Options for the store's client by object_store's configuration key (`aws_endpoint`,
    /// `aws_region`, `azure_storage_account_name`, `timeout`…), over the workers' own. Never
    /// a credential: the coordinator stores the spec.
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        deserialize_with = "crate::store_options::scalars_as_strings"
    )]
    pub options: std::collections::BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    /// "cpu", or "cuda" for one GPU per rank.
    #[serde(default)]
    pub device: DeviceKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultToleranceSpec {
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Seconds a collective may wait for a peer before the attempt is declared failed.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_secs: u64,
    /// A running attempt that reports no step for this long is declared hung and restarted;
    /// 0 turns the check off.
    #[serde(default = "default_hang_timeout")]
    pub hang_timeout_secs: u64,
    /// The wait before the first automatic restart; it doubles with each further restart, up
    /// to 60 s.
    #[serde(default = "default_restart_backoff")]
    pub restart_backoff_secs: f64,
}

fn default_hang_timeout() -> u64 {
    900
}

fn default_restart_backoff() -> f64 {
    1.0
}

fn one() -> u32 {
    1
}
fn default_layers() -> u32 {
    2
}
fn default_d_model() -> u32 {
    64
}
fn default_heads() -> u32 {
    4
}
fn default_source() -> String {
    String::new()
}
fn default_seq_len() -> u32 {
    32
}
fn default_split() -> [f64; 3] {
    [0.8, 0.1, 0.1]
}
fn default_examples() -> u32 {
    4096
}
fn default_seed() -> u64 {
    42
}
fn default_every_steps() -> u64 {
    50
}
fn default_keep_last() -> u32 {
    3
}
fn default_max_restarts() -> u32 {
    3
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn default_collective_timeout() -> u64 {
    60
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            source: default_source(),
            options: BTreeMap::new(),
            seq_len: default_seq_len(),
            split: default_split(),
            examples: default_examples(),
        }
    }
}
impl Default for ParallelSpec {
    fn default() -> Self {
        Self {
            dp: 1,
            tp: 1,
            pp: 1,
            bucket_mb: default_bucket_mb(),
            schedule: PipelineSchedule::default(),
        }
    }
}
impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            every_steps: default_every_steps(),
            keep_last: default_keep_last(),
            async_upload: true,
            options: Default::default(),
        }
    }
}
impl Default for ResourcesSpec {
    fn default() -> Self {
        Self {
            device: DeviceKind::Cpu,
        }
    }
}
impl Default for FaultToleranceSpec {
    fn default() -> Self {
        Self {
            max_restarts: default_max_restarts(),
            collective_timeout_secs: default_collective_timeout(),
            hang_timeout_secs: default_hang_timeout(),
            restart_backoff_secs: default_restart_backoff(),
        }
    }
}

impl ParallelSpec {
    pub fn world_size(&self) -> u32 {
        self.dp * self.tp * self.pp
    }
}

impl JobSpec {
    /// Parses a JSON document (the wire form) and validates it.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| SpecError::new("spec", e.to_string()))?;
        Self::from_value(value)
    }

    /// Reads a TOML or JSON file (by extension; TOML otherwise), applies `key=value` overrides
    /// (values are TOML literals, bare words are strings) and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError::new("spec", format!("cannot read {}: {e}", path.display())))?;
        let json = path.extension().and_then(|e| e.to_str()) == Some("json");
        Self::from_text(&text, json, &path.display().to_string(), overrides)
    }

    /// Parses a spec's text, JSON or TOML (`name` says where it came from, for messages),
    /// applies `key=value` overrides and validates the result.
    pub fn from_text(
        text: &str,
        json: bool,
        name: &str,
        overrides: &[String],
    ) -> Result<Self, SpecError> {
        let mut value: serde_json::Value = if json {
            serde_json::from_str(text)
                .map_err(|e| SpecError::new("spec", format!("{name}: invalid JSON: {e}")))?
        } else {
            toml::from_str(text)
                .map_err(|e| SpecError::new("spec", format!("{name}: invalid TOML: {e}")))?
        };
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        Self::from_value(value)
    }

    /// This spec with `key=value` overrides applied, for resuming: only keys that do not change
    /// what the checkpoint means may differ. The layout may (ranks reshard the checkpoint), and
    /// so may how a step is computed (micro-batches, pipeline schedule, activation
    /// checkpointing); the model, data, seed and learning-rate schedule must stay.
    pub fn for_resume(&self, overrides: &[String]) -> Result<Self, SpecError> {
        let mut value = serde_json::to_value(self).expect("a JobSpec always serialises");
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        let next = Self::from_value(value)?;
        let frozen = |s: &JobSpec| {
            let mut s = s.clone();
            s.parallel = ParallelSpec {
                dp: 1,
                tp: 1,
                pp: 1,
                bucket_mb: 1.0,
                schedule: PipelineSchedule::default(),
            };
            s.train.micro_batches = 1;
            s.train.activation_checkpointing = false;
            s.train.steps = 1;
            s.checkpoint.every_steps = 0;
            s.checkpoint.keep_last = 1;
            s.checkpoint.async_upload = true;
            s.fault_tolerance = FaultToleranceSpec::default();
            s
        };
        if frozen(&next) != frozen(self) {
            return Err(SpecError::new(
                "set",
                "only parallel.* (the layout), train.steps, train.micro_batches, \
                 train.activation_checkpointing, checkpoint.every_steps, checkpoint.keep_last, \
                 checkpoint.async_upload and fault_tolerance.* can change when resuming",
            ));
        }
        Ok(next)
    }

    fn from_value(value: serde_json::Value) -> Result<Self, SpecError> {
        let spec: JobSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "spec".to_string()
            } else {
                path
            };
            SpecError::new(field, e.into_inner().to_string())
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a JobSpec always serialises")
    }

    /// The rank that reports the job's progress: the first data-parallel replica of the last
    /// pipeline stage, where the (data-parallel averaged) loss is known.
    pub fn progress_rank(&self) -> u32 {
        let p = self.parallel;
        let mesh = crate::Mesh::new(p.dp, p.tp, p.pp);
        mesh.rank(crate::Coords {
            pp: p.pp - 1,
            dp: 0,
            tp: 0,
        })
    }

    /// About how many bytes of memory one rank needs: parameters with their gradient, Adam
    /// moments and the flat gradient buffer (20 bytes each), activations of the micro-batches in
    /// flight (Megatron's per-layer estimate, or only block inputs with activation
    /// checkpointing), and a fixed allowance for the runtime.
    pub fn memory_per_rank(&self) -> u64 {
        let m = &self.model;
        let p = self.parallel;
        let (d, layers) = (u64::from(m.d_model), u64::from(m.layers));
        let seq = u64::from(self.data.seq_len);
        let micro = u64::from(self.train.micro_batches);
        let micro_batch = u64::from(self.train.global_batch) / (u64::from(p.dp) * micro).max(1);
        // Micro-batches whose activations a stage holds at once.
        let in_flight = match (p.pp, p.schedule) {
            (1, _) => 1,
            (_, PipelineSchedule::GPipe) => micro,
            (pp, PipelineSchedule::OneFOneB) => micro.min(u64::from(pp)),
        };
        let stage_layers = layers.div_ceil(u64::from(p.pp));
        let (params, activations_per_layer) = match m.kind {
            ModelKind::Mlp => {
                let params = 16 * d + layers * (d * d + d) + d * 4 + 4;
                (params, micro_batch * d * 4 * 3)
            }
            ModelKind::Gpt | ModelKind::Llama | ModelKind::Bert => {
                let vocab = self.vocab_size() as u64;
                let (params, mlp) = if m.kind == ModelKind::Gpt {
                    let params = (vocab + seq) * d + layers * (12 * d * d + 13 * d) + 2 * d;
                    (params + d * vocab, 16 * d)
                } else if m.kind == ModelKind::Bert {
                    // Word, position and token-type embeddings and their norm; per layer q, k,
                    // v, o of d × d with biases, the GELU MLP's two d × intermediate, two norms;
                    // the masked-LM head (transform, norm, bias, and its own decoder unless
                    // tied) or the pooler and classifier.
                    let inter = u64::from(m.intermediate_size());
                    let positions =
                        u64::from(m.max_position_embeddings.unwrap_or(self.data.seq_len));
                    let embeddings =
                        (vocab + positions + u64::from(m.type_vocab_size())) * d + 2 * d;
                    let per_layer = 4 * d * d + 4 * d + 2 * d * inter + inter + d + 4 * d;
                    let head = match self.task() {
                        Task::Classification => {
                            d * d + d + d * u64::from(m.num_labels.unwrap_or(2))
                        }
                        Task::Mlm | Task::Lm if m.tie_word_embeddings => d * d + 3 * d + vocab,
                        Task::Mlm | Task::Lm => d * d + 3 * d + vocab + d * vocab,
                    };
                    // The MLP's activations: its input, the intermediate before and after GELU.
                    (embeddings + layers * per_layer + head, 4 * inter)
                } else {
                    // q and o of d × d; k and v of d × (kv heads · head_dim); SwiGLU's three
                    // d × intermediate; two norms a layer, one at the end.
                    let kv = d / u64::from(m.heads) * u64::from(m.kv_heads());
                    let inter = u64::from(m.intermediate_size());
                    let per_layer = 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d;
                    let head = if m.tie_word_embeddings { 0 } else { d * vocab };
                    // The MLP's activations: gate, up, their product and SwiGLU's input.
                    (vocab * d + layers * per_layer + d + head, 6 * inter)
                };
                let per_layer = if self.train.activation_checkpointing {
                    micro_batch * seq * d * 4
                } else {
                    // s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes at 16 bits (Megatron, tensor
                    // parallel without sequence parallelism; of its 24·h/t, 16·h/t are a GELU
                    // MLP of 4·h, replaced here by the model's own), doubled for f32.
                    let tp = u64::from(p.tp);
                    let mlp_part = (8 * d + mlp) / tp;
                    2 * micro_batch * seq * (10 * d + mlp_part + 5 * u64::from(m.heads) * seq / tp)
                };
                (params, per_layer)
            }
        };
        let params_per_rank = params / u64::from(p.pp * p.tp).max(1);
        params_per_rank * 20 + activations_per_layer * stage_layers * in_flight + (256 << 20)
    }

    /// What the job trains for: `train.task`, by default the model's pre-training objective
    /// (masked-LM for the bert, next-token prediction for the others).
    pub fn task(&self) -> Task {
        match (self.train.task, self.model.kind) {
            (Some(task), _) => task,
            (None, ModelKind::Bert) => Task::Mlm,
            (None, _) => Task::Lm,
        }
    }

    /// The dataset's path or URL, for a `dataset:` source.
    pub fn dataset(&self) -> Option<&str> {
        self.data.source.strip_prefix("dataset:")
    }

    /// The gpt's vocabulary (see `model.vocab_size`); for a dataset whose size the spec does not
    /// give, GPT-2's, as an upper estimate for memory admission.
    pub fn vocab_size(&self) -> usize {
        match (self.model.vocab_size, self.dataset()) {
            (Some(v), _) => v as usize,
            (None, Some(_)) => 50_257,
            (None, None) => 13,
        }
    }

    /// The data source, with the model's built-in default filled in.
    pub fn data_source(&self) -> &str {
        match (self.data.source.as_str(), self.model.kind) {
            ("", ModelKind::Gpt | ModelKind::Llama) => "builtin:arithmetic",
            ("", ModelKind::Mlp) => "builtin:regression",
            // The bert has no built-in corpus: it needs a dataset.
            (source, _) => source,
        }
    }

    /// The `llama`'s own fields, by name.
    fn validate_llama(&self) -> Result<(), SpecError> {
        let (m, p) = (&self.model, self.parallel);
        let err = |field: &str, message: String| Err(SpecError::new(field, message));
        let kv = m.kv_heads();
        positive("model.num_key_value_heads", kv)?;
        if !m.heads.is_multiple_of(kv) {
            return err(
                "model.num_key_value_heads",
                format!(
                    "{} query heads (model.heads) do not group evenly into {kv}",
                    m.heads
                ),
            );
        }
        if m.d_model.is_multiple_of(m.heads) && !(m.d_model / m.heads).is_multiple_of(2) {
            return err(
                "model.heads",
                format!(
                    "a head of d_model / heads = {} features; rotary embeddings need an even \
                     number",
                    m.d_model / m.heads
                ),
            );
        }
        // Fewer key/value heads than tp ranks are replicated, Megatron-style: each rank keeps
        // the one its query heads read, so tp must be a multiple of them.
        if (kv >= p.tp && !kv.is_multiple_of(p.tp)) || (kv < p.tp && !p.tp.is_multiple_of(kv)) {
            return err(
                "parallel.tp",
                format!(
                    "{kv} key/value heads (model.num_key_value_heads) neither split evenly over \
                     tp = {} nor replicate evenly over it (tp a multiple of them)",
                    p.tp
                ),
            );
        }
        self.validate_intermediate()?;
        let theta = m.rope_theta();
        if !theta.is_finite() || theta <= 1.0 {
            return err(
                "model.rope_theta",
                format!("{theta} must be a number above 1"),
            );
        }
        let eps = m.rms_norm_eps();
        if !eps.is_finite() || eps <= 0.0 {
            return err(
                "model.rms_norm_eps",
                format!("{eps} must be a positive number"),
            );
        }
        self.validate_init_and_tying()
    }

    /// What the `llama` and `bert` share: `init_from` is absolute, and tied embeddings keep
    /// the embeddings and the head on one stage.
    fn validate_init_and_tying(&self) -> Result<(), SpecError> {
        let (m, p) = (&self.model, self.parallel);
        if let Some(from) = &m.init_from
            && !from.contains("://")
            && !from.starts_with('/')
        {
            return Err(SpecError::new(
                "model.init_from",
                format!(
                    "path {from:?} is relative; give an absolute path or a URL (ranks run in \
                     their workers' directories)"
                ),
            ));
        }
        let tied_head = m.kind == ModelKind::Llama || self.task() == Task::Mlm;
        if m.tie_word_embeddings && tied_head && p.pp > 1 {
            return Err(SpecError::new(
                "model.tie_word_embeddings",
                format!(
                    "tied embeddings need the embeddings and the head on one stage; pp = {} \
                     puts them on the first and last",
                    p.pp
                ),
            ));
        }
        Ok(())
    }

    /// The MLP's width (`llama`, `bert`): positive, and split evenly over tp.
    fn validate_intermediate(&self) -> Result<(), SpecError> {
        let (m, p) = (&self.model, self.parallel);
        positive("model.intermediate_size", m.intermediate_size())?;
        if !m.intermediate_size().is_multiple_of(p.tp) {
            return Err(SpecError::new(
                "parallel.tp",
                format!(
                    "model.intermediate_size {} does not split evenly over tp = {}",
                    m.intermediate_size(),
                    p.tp
                ),
            ));
        }
        Ok(())
    }

    /// The `bert`'s own fields, by name.
    fn validate_bert(&self) -> Result<(), SpecError> {
        let m = &self.model;
        let err = |field: &str, message: String| Err(SpecError::new(field, message));
        positive("model.type_vocab_size", m.type_vocab_size())?;
        self.validate_intermediate()?;
        let eps = m.layer_norm_eps();
        if !eps.is_finite() || eps <= 0.0 {
            return err(
                "model.layer_norm_eps",
                format!("{eps} must be a positive number"),
            );
        }
        if let Some(labels) = m.num_labels
            && labels < 2
        {
            return err(
                "model.num_labels",
                format!("{labels}: a classifier tells at least 2 labels apart"),
            );
        }
        if self.train.precision != Precision::F32 {
            return err(
                "train.precision",
                format!(
                    "{}: the bert trains in f32 so far (mixed precision runs on the gpt, llama \
                     and mlp)",
                    self.train.precision.name()
                ),
            );
        }
        if self.dataset().is_none() {
            return err(
                "data.source",
                "the bert trains on a dataset: data.source = \"dataset:<path or URL>\" (one \
                 that gantry data prepare wrote)"
                    .into(),
            );
        }
        self.validate_init_and_tying()
    }

    /// `train.task` and the fine-tuning fields.
    fn validate_task(&self) -> Result<(), SpecError> {
        let (m, t) = (&self.model, &self.train);
        let err = |field: &str, message: String| Err(SpecError::new(field, message));
        let task = self.task();
        match (task, m.kind) {
            (Task::Classification | Task::Mlm, ModelKind::Bert) => {}
            (Task::Lm, ModelKind::Gpt | ModelKind::Llama | ModelKind::Mlp) => {}
            (Task::Lm, ModelKind::Bert) => {
                return err(
                    "train.task",
                    "\"lm\": the bert is an encoder; it trains \"mlm\" or \"classification\""
                        .into(),
                );
            }
            (task, kind) => {
                return err(
                    "train.task",
                    format!(
                        "{task:?} trains the bert family, not the {kind:?} (which trains \"lm\")"
                    ),
                );
            }
        }
        if m.num_labels.is_some() && task != Task::Classification {
            return err(
                "model.num_labels",
                "only a classifier has labels (train.task = \"classification\")".into(),
            );
        }
        if t.freeze_layers > m.layers {
            return err(
                "train.freeze_layers",
                format!(
                    "{} is more than the model's {} layers (model.layers)",
                    t.freeze_layers, m.layers
                ),
            );
        }
        if (t.freeze_embeddings || t.freeze_layers > 0) && m.kind != ModelKind::Bert {
            return err(
                "train.freeze_embeddings",
                format!("freezing is for fine-tuning the bert, not the {:?}", m.kind),
            );
        }
        if let Some(lr) = t.head_lr {
            if task != Task::Classification {
                return err(
                    "train.head_lr",
                    "only a classification head has a learning rate of its own".into(),
                );
            }
            if !lr.is_finite() || lr <= 0.0 {
                return err("train.head_lr", format!("{lr} must be a positive number"));
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked without a cluster.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field: &str, message: String| Err(SpecError::new(field, message));
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return err(
                "name",
                format!(
                    "{:?} must be 1-63 characters of letters, digits, '-', '_' or '.'",
                    self.name
                ),
            );
        }
        let m = &self.model;
        positive("model.layers", m.layers)?;
        positive("model.d_model", m.d_model)?;
        positive("model.heads", m.heads)?;
        if m.kind.is_language_model() && !m.d_model.is_multiple_of(m.heads) {
            return err(
                "model.heads",
                format!(
                    "d_model {} is not divisible by {} heads",
                    m.d_model, m.heads
                ),
            );
        }
        match m.kind {
            ModelKind::Llama => self.validate_llama()?,
            ModelKind::Bert => self.validate_bert()?,
            _ if m.init_from.is_some() => {
                return err(
                    "model.init_from",
                    format!("loads the llama and bert families, not the {:?}", m.kind),
                );
            }
            _ => {}
        }
        self.validate_task()?;
        let expected_source = match m.kind {
            ModelKind::Gpt | ModelKind::Llama => "builtin:arithmetic",
            ModelKind::Mlp => "builtin:regression",
            ModelKind::Bert => "dataset:<path or URL> (gantry data prepare)",
        };
        if let Some(dataset) = self.dataset() {
            if !m.kind.is_language_model() {
                return err(
                    "data.source",
                    format!(
                        "a dataset trains a transformer (gpt, llama, bert), not the {:?}",
                        m.kind
                    ),
                );
            }
            if dataset.is_empty() {
                return err("data.source", "dataset: give a path or URL after it".into());
            }
            if !dataset.contains("://") && !dataset.starts_with('/') {
                return err(
                    "data.source",
                    format!(
                        "dataset path {dataset:?} is relative; give an absolute path or a URL \
                         (ranks run in their workers' directories)"
                    ),
                );
            }
            let scheme = crate::store_options::scheme_of(dataset);
            for key in self.data.options.keys() {
                crate::store_options::canonical(Some(&scheme), key)
                    .map_err(|e| SpecError::new(format!("data.options.{key}"), e))?;
            }
        } else if self.data_source() != expected_source {
            return err(
                "data.source",
                format!(
                    "{:?} is not available for model {:?}; use {expected_source:?}",
                    self.data.source, m.kind
                ),
            );
        }
        if self.data.seq_len < 2 {
            return err("data.seq_len", "must be at least 2".into());
        }
        if let Some(max) = m.max_position_embeddings
            && self.data.seq_len > max
        {
            return err(
                "data.seq_len",
                format!(
                    "{} is longer than the model's {max} positions (model.max_position_embeddings)",
                    self.data.seq_len
                ),
            );
        }
        if self.data.examples < 16 {
            return err("data.examples", "must be at least 16".into());
        }
        let split = self.data.split;
        if split.iter().any(|f| !f.is_finite() || *f <= 0.0)
            || (split.iter().sum::<f64>() - 1.0).abs() > 1e-6
        {
            return err(
                "data.split",
                format!("{split:?} must be three positive fractions summing to 1"),
            );
        }
        let t = &self.train;
        if t.steps == 0 {
            return err("train.steps", "must be at least 1".into());
        }
        positive("train.global_batch", t.global_batch)?;
        positive("train.micro_batches", t.micro_batches)?;
        if !t.lr.is_finite() || t.lr <= 0.0 {
            return err("train.lr", format!("{} must be a positive number", t.lr));
        }
        if t.warmup_steps > t.steps {
            return err(
                "train.warmup_steps",
                format!("{} is more than train.steps ({})", t.warmup_steps, t.steps),
            );
        }
        if !t.grad_clip.is_finite() || t.grad_clip < 0.0 {
            return err(
                "train.grad_clip",
                format!("{} must be 0 (off) or positive", t.grad_clip),
            );
        }
        let p = &self.parallel;
        positive("parallel.dp", p.dp)?;
        positive("parallel.tp", p.tp)?;
        positive("parallel.pp", p.pp)?;
        if !p.bucket_mb.is_finite() || p.bucket_mb <= 0.0 {
            return err(
                "parallel.bucket_mb",
                format!("{} must be a positive number", p.bucket_mb),
            );
        }
        if p.tp > 1 && m.kind == ModelKind::Mlp {
            return err(
                "parallel.tp",
                "the mlp has no tensor-parallel split (its layers are too narrow to shard); \
                 use tp = 1, or pp to split it"
                    .into(),
            );
        }
        if m.kind.is_language_model() && !m.heads.is_multiple_of(p.tp) {
            return err(
                "parallel.tp",
                format!(
                    "{} attention heads (model.heads) do not split evenly over tp = {}",
                    m.heads, p.tp
                ),
            );
        }
        if m.kind.is_language_model() && p.pp > m.layers {
            return err(
                "parallel.pp",
                format!(
                    "{} stages for {} transformer blocks (model.layers)",
                    p.pp, m.layers
                ),
            );
        }
        if m.kind == ModelKind::Mlp && p.pp > m.layers + 1 {
            return err(
                "parallel.pp",
                format!(
                    "{} stages for {} blocks (model.layers = {} hidden layers + the output layer)",
                    p.pp,
                    m.layers + 1,
                    m.layers
                ),
            );
        }
        if !t.global_batch.is_multiple_of(p.dp * t.micro_batches) {
            return err(
                "train.global_batch",
                format!(
                    "{} is not divisible by parallel.dp × train.micro_batches = {}",
                    t.global_batch,
                    p.dp * t.micro_batches
                ),
            );
        }
        let c = &self.checkpoint;
        positive("checkpoint.keep_last", c.keep_last)?;
        if !c.url.is_empty() {
            let url = url::Url::parse(&c.url)
                .map_err(|e| SpecError::new("checkpoint.url", format!("{:?}: {e}", c.url)))?;
            if !CHECKPOINT_SCHEMES.contains(&url.scheme()) {
                return err(
                    "checkpoint.url",
                    format!(
                        "scheme {:?} is not supported; {CHECKPOINT_SCHEMES_HINT}",
                        url.scheme()
                    ),
                );
            }
        }
        let scheme = crate::store_options::scheme_of(&c.url);
        for key in c.options.keys() {
            crate::store_options::canonical(Some(&scheme), key)
                .map_err(|e| SpecError::new(format!("checkpoint.options.{key}"), e))?;
        }
        if t.precision != Precision::F32 && (self.parallel.tp > 1 || self.parallel.pp > 1) {
            return err(
                "train.precision",
                format!(
                    "{} runs on whole-model ranks (parallel.tp = parallel.pp = 1) so far; use \
                     \"f32\" with tensor or pipeline parallelism",
                    t.precision.name()
                ),
            );
        }
        let ls = t.loss_scaling;
        if !(ls.initial.is_finite() && ls.initial >= 1.0) {
            return err(
                "train.loss_scaling.initial",
                format!("{} is not a finite number ≥ 1", ls.initial),
            );
        }
        if ls.growth_interval == 0 {
            return err(
                "train.loss_scaling.growth_interval",
                "must be at least 1".into(),
            );
        }
        let f = &self.fault_tolerance;
        if f.collective_timeout_secs == 0 {
            return err(
                "fault_tolerance.collective_timeout_secs",
                "must be at least 1".into(),
            );
        }
        if !f.restart_backoff_secs.is_finite() || f.restart_backoff_secs < 0.0 {
            return err(
                "fault_tolerance.restart_backoff_secs",
                format!("{} must be 0 or more seconds", f.restart_backoff_secs),
            );
        }
        Ok(())
    }
}

fn positive(field: &str, value: u32) -> Result<(), SpecError> {
    if value == 0 {
        Err(SpecError::new(field, "must be at least 1"))
    } else {
        Ok(())
    }
}

/// Applies one `a.b.c=value` override. The value is read as a TOML literal (`2`, `3e-4`,
/// `true`, `[0.8, 0.1, 0.1]`, `"text"`); anything else is taken as a plain string.
pub fn apply_override(doc: &mut serde_json::Value, assignment: &str) -> Result<(), SpecError> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        SpecError::new(
            "--set",
            format!("{assignment:?} is not of the form key=value"),
        )
    })?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(SpecError::new(
            "--set",
            format!("{key:?} is not a valid key"),
        ));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .map(|v| serde_json::to_value(v).expect("TOML values are JSON values"))
        .unwrap_or_else(|| serde_json::Value::String(raw.to_string()));
    let mut node = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let object = node.as_object_mut().ok_or_else(|| {
            SpecError::new(
                parts[..i].join("."),
                "is not a table, cannot set a key in it",
            )
        })?;
        if i + 1 == parts.len() {
            object.insert(part.to_string(), value);
            return Ok(());
        }
        node = object
            .entry(part.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    unreachable!("a key has at least one part")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "name": "t",
            "model": {"kind": "mlp"},
            "train": {"steps": 10, "global_batch": 8, "lr": 0.01},
            "parallel": {"dp": 2}
        })
    }

    fn check(mutate: impl FnOnce(&mut serde_json::Value)) -> Result<JobSpec, SpecError> {
        let mut doc = base();
        mutate(&mut doc);
        JobSpec::from_json(&doc.to_string())
    }

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let spec = check(|_| {}).unwrap();
        assert_eq!(spec.parallel.world_size(), 2);
        assert_eq!(spec.data_source(), "builtin:regression");
        assert_eq!(spec.checkpoint.keep_last, 3);
    }

    /// The bert's fields and the fine-tuning fields: each bad value refused by its field.
    #[test]
    fn bert_and_fine_tuning_fields_are_checked_by_name() {
        let bert = |model: serde_json::Value, train: serde_json::Value| {
            check(|doc| {
                doc["model"] = serde_json::json!({"kind": "bert", "layers": 2, "d_model": 32,
                    "heads": 4, "vocab_size": 100});
                for (k, v) in model.as_object().unwrap() {
                    doc["model"][k] = v.clone();
                }
                doc["data"] = serde_json::json!({"source": "dataset:/data/spam"});
                doc["parallel"] = serde_json::json!({"dp": 1});
                for (k, v) in train.as_object().unwrap() {
                    doc["train"][k] = v.clone();
                }
            })
        };
        let none = serde_json::json!({});
        let classify = serde_json::json!({"task": "classification"});
        let spec = bert(none.clone(), classify.clone()).unwrap();
        assert_eq!(
            spec.model.intermediate_size(),
            128,
            "4 · d_model by default"
        );
        assert_eq!(spec.model.layer_norm_eps(), 1e-12);
        let refused = |model: serde_json::Value, train: serde_json::Value| {
            bert(model, train).unwrap_err().field
        };
        assert_eq!(
            refused(serde_json::json!({"num_labels": 1}), classify.clone()),
            "model.num_labels"
        );
        assert_eq!(
            refused(serde_json::json!({"num_labels": 3}), none.clone()),
            "model.num_labels"
        );
        assert_eq!(
            refused(serde_json::json!({"layer_norm_eps": 0.0}), none.clone()),
            "model.layer_norm_eps"
        );
        assert_eq!(
            refused(none.clone(), serde_json::json!({"freeze_layers": 3})),
            "train.freeze_layers"
        );
        assert_eq!(
            refused(none.clone(), serde_json::json!({"head_lr": 1e-3})),
            "train.head_lr"
        );
        assert_eq!(
            refused(
                none.clone(),
                serde_json::json!({"task": "classification", "head_lr": -1.0})
            ),
            "train.head_lr"
        );
        assert_eq!(
            refused(serde_json::json!({"init_from": "minilm"}), none.clone()),
            "model.init_from"
        );
        // A tied masked-LM head needs the embeddings on its stage; a classifier does not.
        let tied = |train: serde_json::Value| {
            check(|doc| {
                doc["model"] = serde_json::json!({"kind": "bert", "layers": 2, "d_model": 32,
                    "heads": 4, "vocab_size": 100, "tie_word_embeddings": true});
                doc["data"] = serde_json::json!({"source": "dataset:/data/spam"});
                doc["parallel"] = serde_json::json!({"dp": 1, "pp": 2});
                for (k, v) in train.as_object().unwrap() {
                    doc["train"][k] = v.clone();
                }
            })
        };
        assert_eq!(
            tied(none.clone()).unwrap_err().field,
            "model.tie_word_embeddings"
        );
        assert!(tied(classify.clone()).is_ok());
        // The bert needs a dataset; classification needs the bert.
        let no_data = check(|doc| {
            doc["model"] = serde_json::json!({"kind": "bert", "layers": 2, "d_model": 32,
                "heads": 4});
        });
        assert_eq!(no_data.unwrap_err().field, "data.source");
        let gpt = check(|doc| {
            doc["model"]["kind"] = "gpt".into();
            doc["train"]["task"] = "classification".into();
        });
        assert_eq!(gpt.unwrap_err().field, "train.task");
        // The bert pre-trains masked-LM by default; "lm" is the decoders', "mlm" the bert's.
        assert_eq!(bert(none.clone(), none.clone()).unwrap().task(), Task::Mlm);
        assert_eq!(
            refused(none.clone(), serde_json::json!({"task": "lm"})),
            "train.task"
        );
        let llama_mlm = check(|doc| {
            doc["model"]["kind"] = "llama".into();
            doc["train"]["task"] = "mlm".into();
        });
        assert_eq!(llama_mlm.unwrap_err().field, "train.task");
    }

    #[test]
    fn every_example_spec_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                JobSpec::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 6, "{seen} examples");
    }

    #[test]
    fn a_dataset_source_is_absolute_or_a_url_and_trains_the_gpt() {
        let gpt = |source: &str| {
            check(|doc| {
                doc["model"]["kind"] = "gpt".into();
                doc["data"] = serde_json::json!({ "source": source });
            })
        };
        assert!(gpt("dataset:/data/kjv").is_ok());
        assert!(gpt("dataset:s3://bucket/kjv").is_ok());
        for source in ["dataset:data/kjv", "dataset:", "builtin:nope"] {
            assert_eq!(gpt(source).unwrap_err().field, "data.source", "{source}");
        }
        let mlp = check(|doc| doc["data"] = serde_json::json!({ "source": "dataset:/data/kjv" }));
        assert_eq!(mlp.unwrap_err().field, "data.source");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("model.colour", "model.colour=\"red\""),
            ("bogus", "bogus=1"),
            ("parallel.dp", "parallel.dp=0"),
            ("train.lr", "train.lr=-1.0"),
            ("train.steps", "train.steps=-5"),
            ("train.global_batch", "train.global_batch=7"),
            ("parallel.tp", "parallel.tp=2"),
            ("parallel.pp", "parallel.pp=4"),
            ("train.precision", "train.precision=\"fp8\""),
            (
                "train.loss_scaling.initial",
                "train.loss_scaling.initial=0.5",
            ),
            ("resources.device", "resources.device=\"tpu\""),
            ("checkpoint.url", "checkpoint.url=\"ftp://host/x\""),
            ("parallel.schedule", "parallel.schedule=\"zigzag\""),
            ("name", "name=\"a b\""),
            ("data.split", "data.split=[0.5, 0.5, 0.5]"),
        ];
        for (field, assignment) in cases {
            let err = check(|doc| apply_override(doc, assignment).unwrap()).unwrap_err();
            assert_eq!(err.field, field, "{assignment}: {err}");
        }
    }

    #[test]
    fn every_object_store_is_a_checkpoint_url() {
        for url in [
            "file:///c",
            "s3://b/p",
            "az://c/p",
            "abfss://c/p",
            "gs://b/p",
        ] {
            let set = format!("checkpoint.url=\"{url}\"");
            check(|doc| apply_override(doc, &set).unwrap()).unwrap();
        }
    }

    #[test]
    fn store_options_fit_the_store_and_hold_no_secret() {
        let with = |url: &str, option: &str| {
            check(|doc| {
                apply_override(doc, &format!("checkpoint.url=\"{url}\"")).unwrap();
                apply_override(doc, option).unwrap();
            })
        };
        let spec = with("s3://b/p", "checkpoint.options.aws_region=\"eu-west-1\"").unwrap();
        assert_eq!(spec.checkpoint.options["aws_region"], "eu-west-1");
        let spec = with("s3://b/p", "checkpoint.options.aws_allow_http=true").unwrap();
        assert_eq!(spec.checkpoint.options["aws_allow_http"], "true");
        let refused = [
            (
                "s3://b/p",
                "checkpoint.options.aws_regoin=\"x\"",
                "not an option",
            ),
            ("gs://b/p", "checkpoint.options.aws_region=\"x\"", "gs://"),
            (
                "file:///c",
                "checkpoint.options.timeout=\"5s\"",
                "no options",
            ),
            (
                "s3://b/p",
                "checkpoint.options.aws_secret_access_key=\"x\"",
                "credential",
            ),
        ];
        for (url, option, message) in refused {
            let err = with(url, option).unwrap_err();
            let key = option.split('=').next().unwrap();
            assert_eq!(err.field, key, "{err}");
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    #[test]
    fn tensor_parallelism_needs_heads_that_split_evenly() {
        let gpt = |tp: &str| {
            check(|doc| {
                for a in ["model.kind=\"gpt\"", "model.heads=4", "parallel.dp=1", tp] {
                    apply_override(doc, a).unwrap();
                }
            })
        };
        assert!(gpt("parallel.tp=2").is_ok());
        assert!(gpt("parallel.tp=4").is_ok());
        let err = gpt("parallel.tp=3").unwrap_err();
        assert_eq!(err.field, "parallel.tp");
        assert!(err.to_string().contains("4 attention heads"), "{err}");
    }

    #[test]
    fn tensor_and_pipeline_parallelism_lower_the_memory_per_rank() {
        let gpt = |layout: &[&str]| {
            check(|doc| {
                for a in ["model.kind=\"gpt\"", "model.layers=4", "model.d_model=256"] {
                    apply_override(doc, a).unwrap();
                }
                for a in layout {
                    apply_override(doc, a).unwrap();
                }
            })
            .unwrap()
            .memory_per_rank()
        };
        let one = gpt(&["parallel.dp=1"]);
        let tp = gpt(&["parallel.dp=1", "parallel.tp=2"]);
        let pp = gpt(&["parallel.dp=1", "parallel.pp=2"]);
        let both = gpt(&["parallel.dp=1", "parallel.tp=2", "parallel.pp=2"]);
        assert!(tp < one && pp < one, "{one} {tp} {pp}");
        assert!(both < tp && both < pp, "{tp} {pp} {both}");
    }

    #[test]
    fn a_resume_may_change_the_layout_but_not_the_model() {
        let gpt = check(|doc| {
            doc["model"] = serde_json::json!({"kind": "gpt", "heads": 4, "layers": 2});
        })
        .unwrap();
        let set =
            |keys: &[&str]| gpt.for_resume(&keys.iter().map(|k| k.to_string()).collect::<Vec<_>>());
        let moved = set(&[
            "parallel.dp=1",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.schedule=\"gpipe\"",
            "train.micro_batches=4",
            "train.activation_checkpointing=true",
        ])
        .unwrap();
        assert_eq!((moved.parallel.tp, moved.parallel.pp), (2, 2));
        assert_eq!(moved.model, gpt.model);
        for (assignment, field) in [
            ("model.d_model=8", "set"),
            ("train.lr=0.5", "set"),
            ("train.seed=7", "set"),
            // Still validated as a spec: 4 heads do not split over tp = 3.
            ("parallel.tp=3", "parallel.tp"),
        ] {
            let err = set(&[assignment]).unwrap_err();
            assert_eq!(err.field, field, "{assignment}: {err}");
        }
    }

    #[test]
    fn overrides_keep_their_types() {
        let mut doc = base();
        apply_override(&mut doc, "train.lr=3e-4").unwrap();
        apply_override(&mut doc, "parallel.dp=1").unwrap();
        apply_override(&mut doc, "name=other").unwrap();
        apply_override(&mut doc, "data.split=[0.5, 0.25, 0.25]").unwrap();
        apply_override(&mut doc, "checkpoint.url=\"s3://bucket/prefix\"").unwrap();
        let spec = JobSpec::from_value(doc).unwrap();
        assert_eq!(spec.train.lr, 3e-4);
        assert_eq!(spec.parallel.dp, 1);
        assert_eq!(spec.name, "other");
        assert_eq!(spec.data.split, [0.5, 0.25, 0.25]);
        assert!(apply_override(&mut base(), "novalue").is_err());
    }
}
