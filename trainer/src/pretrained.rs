//! `model.init_from`: a Hugging Face model folder (`config.json`, and `model.safetensors` or
//! sharded safetensors with `model.safetensors.index.json`), local or in any store Gantry
//! supports, loaded by Hugging Face's names into a rank's part of the model: its pipeline
//! stage, and of each tensor-parallel layer its slice (cut by the same table as checkpoints).
//! Everything is checked before a weight is used: the config's fields against the spec's, and
//! every tensor's name, dtype and shape against the model's, each refusal naming the field or
//! the tensor with both values.

use crate::hf;
use crate::layout::{Split, slice_of, whole_name};
use crate::reshard::Tensor32;
use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use gantry_core::{Coords, JobSpec, Mesh, ModelKind};
use object_store::ObjectStoreExt;
use std::collections::BTreeMap;

/// The folder's weights under Gantry's whole-model names, in burn's layouts, checked.
pub struct Pretrained {
    whole: BTreeMap<String, Tensor32>,
    /// Tensors of the folder this job's model has no use for: a bert's heads of another task
    /// (a pretrained masked-LM head when fine-tuning a classifier, say).
    pub unused: Vec<String>,
    /// The model's head tensors the folder does not hold, initialised from the seed instead
    /// (a new classifier).
    pub fresh: Vec<String>,
}

/// Reads and checks the folder at `url` for a job of `spec` (whose vocabulary is `vocab`).
pub async fn load(
    spec: &JobSpec,
    url: &str,
    options: &gantry_checkpoint::Options,
    vocab: usize,
) -> anyhow::Result<Pretrained> {
    let kind = spec.model.kind;
    anyhow::ensure!(
        matches!(kind, ModelKind::Llama | ModelKind::Bert),
        "model.init_from: loads the llama and bert families; this job trains the {kind:?}"
    );
    let (store, prefix) = gantry_checkpoint::open_url(&gantry_data::url_of(url)?, options)
        .map_err(|e| anyhow::anyhow!("model.init_from: {url}: {e}"))?;
    let get = |name: String| {
        let (store, path) = (store.clone(), prefix.clone().join(name.as_str()));
        async move {
            let got = store
                .get(&path)
                .await
                .map_err(|e| anyhow::anyhow!("model.init_from: {url}: {name}: {e}"))?;
            anyhow::Ok(got.bytes().await?)
        }
    };
    let config: serde_json::Value = serde_json::from_slice(&get("config.json".into()).await?)
        .map_err(|e| anyhow::anyhow!("model.init_from: {url}: config.json: {e}"))?;
    match kind {
        ModelKind::Bert => check_bert_config(spec, &config, vocab),
        _ => check_config(spec, &config, vocab),
    }
    .map_err(|e| anyhow::anyhow!("model.init_from: {url}: config.json: {e}"))?;

    // One file, or the shards an index names.
    let files: Vec<String> = match get("model.safetensors.index.json".into()).await {
        Ok(index) => {
            let index: serde_json::Value = serde_json::from_slice(&index).map_err(|e| {
                anyhow::anyhow!("model.init_from: {url}: model.safetensors.index.json: {e}")
            })?;
            let map = index["weight_map"].as_object().ok_or_else(|| {
                anyhow::anyhow!(
                    "model.init_from: {url}: model.safetensors.index.json has no weight_map"
                )
            })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect();
            files.sort();
            files.dedup();
            files
        }
        Err(_) => vec!["model.safetensors".into()],
    };
    let want = hf::shapes(spec, vocab);
    let mut whole = BTreeMap::new();
    let mut unused = Vec::new();
    for file in files {
        let bytes = get(file.clone()).await?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("model.init_from: {url}: {file}: {e}"))?;
        for (name, view) in tensors.tensors() {
            // Buffers some exports keep are computed here instead: rotary frequencies, BERT's
            // position ids. The masked-LM decoder's bias is `cls.predictions.bias` again.
            let buffers = [
                "rotary_emb.inv_freq",
                "embeddings.position_ids",
                "cls.predictions.decoder.bias",
            ];
            if buffers.iter().any(|b| name.ends_with(b)) {
                continue;
            }
            let name = hf::canonical(kind, &name);
            if kind == ModelKind::Bert && !want.contains_key(&name) && is_bert_head(&name) {
                unused.push(name);
                continue;
            }
            let Some(shape) = want.get(&name) else {
                anyhow::bail!(
                    "model.init_from: {url}: {file}: tensor {name} is not a parameter of this \
                     model (a {kind:?} of the spec's shape)"
                );
            };
            anyhow::ensure!(
                view.shape() == shape.as_slice(),
                "model.init_from: {url}: {file}: tensor {name} has shape {:?}; the model's is \
                 {shape:?}",
                view.shape()
            );
            let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                anyhow::anyhow!(
                    "model.init_from: {url}: {file}: tensor {name} is {:?} (F32, F16 and BF16 \
                     are read)",
                    view.dtype()
                )
            })?;
            let (gantry, linear) = hf::gantry_name(kind, &name).expect("every expected name maps");
            let t = Tensor32 {
                shape: view.shape().to_vec(),
                values,
            };
            whole.insert(gantry, if linear { hf::transpose(&t) } else { t });
        }
    }
    let mut fresh = Vec::new();
    for name in want.keys() {
        let (gantry, _) = hf::gantry_name(kind, name).expect("every expected name maps");
        if whole.contains_key(&gantry) {
            continue;
        }
        // A bert's task head may be new: it starts from the seed, as Hugging Face's
        // `from_pretrained` initialises a classifier a checkpoint lacks.
        anyhow::ensure!(
            kind == ModelKind::Bert && is_bert_head(name),
            "model.init_from: {url}: tensor {name} is missing (shape {:?})",
            want[name]
        );
        fresh.push(gantry);
    }
    Ok(Pretrained {
        whole,
        unused,
        fresh,
    })
}

/// Whether a Hugging Face bert tensor belongs to a task head (pooler, classifier, masked-LM or
/// next-sentence head) rather than to the encoder.
fn is_bert_head(name: &str) -> bool {
    ["bert.pooler.", "classifier.", "cls."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The config's fields that the spec also sets must agree, each refusal naming both.
fn check_config(spec: &JobSpec, config: &serde_json::Value, vocab: usize) -> anyhow::Result<()> {
    let m = &spec.model;
    if let Some(kind) = config["model_type"].as_str() {
        anyhow::ensure!(
            kind == "llama",
            "model_type is {kind:?}; model.kind llama loads \"llama\" models"
        );
    }
    let ints: [(&str, &str, u64); 6] = [
        ("hidden_size", "model.d_model", u64::from(m.d_model)),
        ("num_hidden_layers", "model.layers", u64::from(m.layers)),
        ("num_attention_heads", "model.heads", u64::from(m.heads)),
        (
            "num_key_value_heads",
            "model.num_key_value_heads",
            u64::from(m.kv_heads()),
        ),
        (
            "intermediate_size",
            "model.intermediate_size",
            u64::from(m.intermediate_size()),
        ),
        ("vocab_size", "model.vocab_size", vocab as u64),
    ];
    for (key, field, ours) in ints {
        let theirs = match key {
            // Absent from older configs: the number of heads.
            "num_key_value_heads" => config[key]
                .as_u64()
                .or_else(|| config["num_attention_heads"].as_u64()),
            _ => config[key].as_u64(),
        };
        anyhow::ensure!(
            theirs == Some(ours),
            "{key} is {}, but {field} is {ours}",
            theirs.map_or("absent".to_string(), |v| v.to_string())
        );
    }
    let floats = [
        ("rope_theta", "model.rope_theta", m.rope_theta(), 10_000.0),
        ("rms_norm_eps", "model.rms_norm_eps", m.rms_norm_eps(), 1e-6),
    ];
    for (key, field, ours, default) in floats {
        let theirs = config[key].as_f64().unwrap_or(default);
        anyhow::ensure!(
            (theirs - ours).abs() <= 1e-12 * theirs.abs(),
            "{key} is {theirs}, but {field} is {ours}"
        );
    }
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false);
    anyhow::ensure!(
        tied == m.tie_word_embeddings,
        "tie_word_embeddings is {tied}, but model.tie_word_embeddings is {}",
        m.tie_word_embeddings
    );
    if let Some(scaling) = config.get("rope_scaling").filter(|s| !s.is_null()) {
        anyhow::bail!("rope_scaling {scaling} is not supported (plain rotary embeddings only)");
    }
    Ok(())
}

/// A bert's config against the spec: the shape's fields, each refusal naming both.
fn check_bert_config(
    spec: &JobSpec,
    config: &serde_json::Value,
    vocab: usize,
) -> anyhow::Result<()> {
    let s = crate::bert::BertShape::of(spec);
    if let Some(kind) = config["model_type"].as_str() {
        anyhow::ensure!(
            kind == "bert",
            "model_type is {kind:?}; model.kind bert loads \"bert\" models"
        );
    }
    let ints: [(&str, &str, usize, Option<u64>); 7] = [
        ("hidden_size", "model.d_model", s.hidden, None),
        ("num_hidden_layers", "model.layers", s.layers, None),
        ("num_attention_heads", "model.heads", s.heads, None),
        (
            "intermediate_size",
            "model.intermediate_size",
            s.intermediate,
            None,
        ),
        ("vocab_size", "model.vocab_size", vocab, None),
        (
            "max_position_embeddings",
            "model.max_position_embeddings",
            s.positions,
            None,
        ),
        ("type_vocab_size", "model.type_vocab_size", s.types, Some(2)),
    ];
    for (key, field, ours, default) in ints {
        let theirs = config[key].as_u64().or(default);
        anyhow::ensure!(
            theirs == Some(ours as u64),
            "{key} is {}, but {field} is {ours}",
            theirs.map_or("absent".to_string(), |v| v.to_string())
        );
    }
    let eps = config["layer_norm_eps"].as_f64().unwrap_or(1e-12);
    anyhow::ensure!(
        (eps - s.eps).abs() <= 1e-12 * eps.abs(),
        "layer_norm_eps is {eps}, but model.layer_norm_eps is {}",
        s.eps
    );
    let act = config["hidden_act"].as_str().unwrap_or("gelu");
    anyhow::ensure!(
        act == "gelu",
        "hidden_act is {act:?}; the bert computes the exact GELU (\"gelu\")"
    );
    let position = config["position_embedding_type"]
        .as_str()
        .unwrap_or("absolute");
    anyhow::ensure!(
        position == "absolute",
        "position_embedding_type is {position:?}; the bert has absolute position embeddings"
    );
    Ok(())
}

fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let pairs = || {
        data.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    Some(match dtype {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::BF16 => pairs()
            .map(|h| f32::from_bits(u32::from(h) << 16))
            .collect(),
        safetensors::Dtype::F16 => pairs().map(|h| half::f16::from_bits(h).to_f32()).collect(),
        _ => return None,
    })
}

impl Pretrained {
    /// Whole-model parameters under Gantry's names (a checkpoint's, say).
    pub fn from_whole(whole: BTreeMap<String, Tensor32>) -> Self {
        Self {
            whole,
            unused: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// Tensors the folder held.
    pub fn tensors(&self) -> usize {
        self.whole.len()
    }

    /// `model` (rank `at` of layout `mesh`'s part) with the pretrained weights: each parameter's
    /// whole-model tensor, cut to the rank's tensor-parallel slice where it is split.
    pub fn apply<M: Module>(
        &self,
        model: M,
        spec: &JobSpec,
        mesh: Mesh,
        at: Coords,
    ) -> anyhow::Result<M> {
        struct Load<'a> {
            pretrained: &'a Pretrained,
            spec: &'a JobSpec,
            mesh: Mesh,
            at: Coords,
            path: Vec<String>,
            failed: Option<anyhow::Error>,
        }
        impl ModuleMapper for Load<'_> {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let local = self.path.join(".");
                let (name, split) = whole_name(self.spec, self.mesh, self.at, &local);
                let Some(whole) = self.pretrained.whole.get(&name) else {
                    if self.pretrained.fresh.contains(&name) {
                        return param;
                    }
                    self.failed.get_or_insert_with(|| {
                        anyhow::anyhow!("model.init_from: nothing for parameter {name}")
                    });
                    return param;
                };
                let (values, shape) = match split {
                    Split::Replicated => (whole.values.clone(), whole.shape.clone()),
                    Split::Along { dim, parts } => {
                        let (rank, tp) = (self.at.tp as usize, self.mesh.tp as usize);
                        let mut shape = whole.shape.clone();
                        shape[dim] /= tp;
                        let values = slice_of(&whole.values, &whole.shape, dim, parts, rank, tp, 1);
                        (values, shape)
                    }
                };
                param.map(|old| {
                    let fresh =
                        Tensor::<D>::from_data(TensorData::new(values, shape), &old.device())
                            .cast(old.dtype());
                    if old.is_require_grad() {
                        fresh.require_grad()
                    } else {
                        fresh
                    }
                })
            }
        }
        let mut load = Load {
            pretrained: self,
            spec,
            mesh,
            at,
            path: Vec::new(),
            failed: None,
        };
        let model = model.map(&mut load);
        match load.failed {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }
}
