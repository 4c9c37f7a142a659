//! Hugging Face's format: a model's whole-model parameters under the names and layouts of
//! `transformers`' classes (linear weights `[out, in]`, norms' `weight` and `bias`), and the
//! `config.json` that describes them, so that `from_pretrained(dir)` (or any reader of the
//! format) opens an export: a `llama` as `LlamaForCausalLM`
//! (`model.layers.N.self_attn.q_proj.weight`), a `bert` as `BertForMaskedLM` or
//! `BertForSequenceClassification` (`bert.encoder.layer.N.attention.self.query.weight`).

use crate::reshard::Tensor32;
use gantry_core::{JobSpec, ModelKind, Task};
use std::collections::BTreeMap;

/// One family's names, Gantry's ↔ Hugging Face's, and whether the tensor is a linear weight
/// (stored `[in, out]` by burn, `[out, in]` by PyTorch): the model's own, then a layer's (under
/// Gantry's `layers.N.` and Hugging Face's `layers`).
struct Names {
    model: &'static [(&'static str, &'static str, bool)],
    layer: &'static [(&'static str, &'static str, bool)],
    layers: &'static str,
}

const LLAMA: Names = Names {
    model: &[
        ("embed_tokens.weight", "model.embed_tokens.weight", false),
        ("norm.gamma", "model.norm.weight", false),
        ("lm_head.weight", "lm_head.weight", true),
    ],
    layer: &[
        ("input_layernorm.gamma", "input_layernorm.weight", false),
        (
            "post_attention_layernorm.gamma",
            "post_attention_layernorm.weight",
            false,
        ),
        ("q_proj.weight", "self_attn.q_proj.weight", true),
        ("k_proj.weight", "self_attn.k_proj.weight", true),
        ("v_proj.weight", "self_attn.v_proj.weight", true),
        ("o_proj.weight", "self_attn.o_proj.weight", true),
        ("gate_proj.weight", "mlp.gate_proj.weight", true),
        ("up_proj.weight", "mlp.up_proj.weight", true),
        ("down_proj.weight", "mlp.down_proj.weight", true),
    ],
    layers: "model.layers.",
};

const BERT: Names = Names {
    model: &[
        (
            "embeddings.word_embeddings.weight",
            "bert.embeddings.word_embeddings.weight",
            false,
        ),
        (
            "embeddings.position_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            false,
        ),
        (
            "embeddings.token_type_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            false,
        ),
        (
            "embeddings.layer_norm.gamma",
            "bert.embeddings.LayerNorm.weight",
            false,
        ),
        (
            "embeddings.layer_norm.beta",
            "bert.embeddings.LayerNorm.bias",
            false,
        ),
        ("pooler.weight", "bert.pooler.dense.weight", true),
        ("pooler.bias", "bert.pooler.dense.bias", false),
        ("classifier.weight", "classifier.weight", true),
        ("classifier.bias", "classifier.bias", false),
        (
            "mlm.transform.weight",
            "cls.predictions.transform.dense.weight",
            true,
        ),
        (
            "mlm.transform.bias",
            "cls.predictions.transform.dense.bias",
            false,
        ),
        (
            "mlm.layer_norm.gamma",
            "cls.predictions.transform.LayerNorm.weight",
            false,
        ),
        (
            "mlm.layer_norm.beta",
            "cls.predictions.transform.LayerNorm.bias",
            false,
        ),
        ("mlm.decoder.weight", "cls.predictions.decoder.weight", true),
        ("mlm.bias", "cls.predictions.bias", false),
    ],
    layer: &[
        ("query.weight", "attention.self.query.weight", true),
        ("query.bias", "attention.self.query.bias", false),
        ("key.weight", "attention.self.key.weight", true),
        ("key.bias", "attention.self.key.bias", false),
        ("value.weight", "attention.self.value.weight", true),
        ("value.bias", "attention.self.value.bias", false),
        (
            "attention_output.weight",
            "attention.output.dense.weight",
            true,
        ),
        (
            "attention_output_bias",
            "attention.output.dense.bias",
            false,
        ),
        (
            "attention_norm.gamma",
            "attention.output.LayerNorm.weight",
            false,
        ),
        (
            "attention_norm.beta",
            "attention.output.LayerNorm.bias",
            false,
        ),
        ("intermediate.weight", "intermediate.dense.weight", true),
        ("intermediate.bias", "intermediate.dense.bias", false),
        ("output.weight", "output.dense.weight", true),
        ("output_bias", "output.dense.bias", false),
        ("output_norm.gamma", "output.LayerNorm.weight", false),
        ("output_norm.beta", "output.LayerNorm.bias", false),
    ],
    layers: "bert.encoder.layer.",
};

fn names(kind: ModelKind) -> Option<&'static Names> {
    match kind {
        ModelKind::Llama => Some(&LLAMA),
        ModelKind::Bert => Some(&BERT),
        ModelKind::Gpt | ModelKind::Mlp => None,
    }
}

/// `name` in the other naming: Hugging Face's for a Gantry name (`to_hf`), else Gantry's; and
/// whether it is a linear weight.
fn rename(names: &Names, name: &str, to_hf: bool) -> Option<(String, bool)> {
    let pick = |&(ours, theirs, linear): &(&'static str, &'static str, bool)| {
        if to_hf {
            (ours, theirs, linear)
        } else {
            (theirs, ours, linear)
        }
    };
    if let Some((_, other, linear)) = names.model.iter().map(pick).find(|(n, ..)| *n == name) {
        return Some((other.to_string(), linear));
    }
    let (from, to) = if to_hf {
        ("layers.", names.layers)
    } else {
        (names.layers, "layers.")
    };
    let (index, field) = name.strip_prefix(from)?.split_once('.')?;
    index.parse::<usize>().ok()?;
    let (_, other, linear) = names.layer.iter().map(pick).find(|(n, ..)| *n == field)?;
    Some((format!("{to}{index}.{other}"), linear))
}

/// Gantry's name of a parameter of a `kind` model → Hugging Face's, and whether it is a
/// linear weight.
pub fn hf_name(kind: ModelKind, name: &str) -> Option<(String, bool)> {
    rename(names(kind)?, name, true)
}

/// Hugging Face's name of a parameter of a `kind` model → Gantry's, and whether it is a linear
/// weight. A bare `BertModel`'s names (without `bert.`) are read as the task models' are.
pub fn gantry_name(kind: ModelKind, hf: &str) -> Option<(String, bool)> {
    rename(names(kind)?, &canonical(kind, hf), false)
}

/// A Hugging Face name as the task models spell it: a bare `BertModel`'s `embeddings.…`,
/// `encoder.…` and `pooler.…` under `bert.`.
pub fn canonical(kind: ModelKind, hf: &str) -> String {
    let bare = ["embeddings.", "encoder.", "pooler."];
    if kind == ModelKind::Bert && bare.iter().any(|p| hf.starts_with(p)) {
        format!("bert.{hf}")
    } else {
        hf.to_string()
    }
}

/// Every tensor of a `LlamaForCausalLM` of the spec's shape and `vocab` tokens, by Hugging
/// Face's name, with its shape in PyTorch's layout.
pub fn llama_shapes(spec: &JobSpec, vocab: usize) -> BTreeMap<String, Vec<usize>> {
    let m = &spec.model;
    let d = m.d_model as usize;
    let dh = d / m.heads as usize;
    let (q, kv) = (m.heads as usize * dh, m.kv_heads() as usize * dh);
    let inter = m.intermediate_size() as usize;
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    shapes.insert("model.embed_tokens.weight".into(), vec![vocab, d]);
    shapes.insert("model.norm.weight".into(), vec![d]);
    if !m.tie_word_embeddings {
        shapes.insert("lm_head.weight".into(), vec![vocab, d]);
    }
    for i in 0..m.layers {
        let layer = |field: &str| format!("model.layers.{i}.{field}");
        for (field, shape) in [
            ("input_layernorm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("self_attn.q_proj.weight", vec![q, d]),
            ("self_attn.k_proj.weight", vec![kv, d]),
            ("self_attn.v_proj.weight", vec![kv, d]),
            ("self_attn.o_proj.weight", vec![d, q]),
            ("mlp.gate_proj.weight", vec![inter, d]),
            ("mlp.up_proj.weight", vec![inter, d]),
            ("mlp.down_proj.weight", vec![d, inter]),
        ] {
            shapes.insert(layer(field), shape);
        }
    }
    shapes
}

/// A matrix's transpose (burn's `[in, out]` ↔ PyTorch's `[out, in]`).
pub fn transpose(t: &Tensor32) -> Tensor32 {
    let [rows, cols] = t.shape[..] else {
        panic!("a linear weight is a matrix");
    };
    let mut values = vec![0.0; t.values.len()];
    for r in 0..rows {
        for c in 0..cols {
            values[c * rows + r] = t.values[r * cols + c];
        }
    }
    Tensor32 {
        shape: vec![cols, rows],
        values,
    }
}

/// Every tensor of a `BertForMaskedLM` or `BertForSequenceClassification` (by the spec's
/// task) of the spec's shape and `vocab` tokens, by Hugging Face's name, with its shape in
/// PyTorch's layout.
pub fn bert_shapes(spec: &JobSpec, vocab: usize) -> BTreeMap<String, Vec<usize>> {
    let s = crate::bert::BertShape::of(spec);
    let (d, inter) = (s.hidden, s.intermediate);
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>| shapes.insert(name, shape);
    put(
        "bert.embeddings.word_embeddings.weight".into(),
        vec![vocab, d],
    );
    put(
        "bert.embeddings.position_embeddings.weight".into(),
        vec![s.positions, d],
    );
    put(
        "bert.embeddings.token_type_embeddings.weight".into(),
        vec![s.types, d],
    );
    for field in ["weight", "bias"] {
        put(format!("bert.embeddings.LayerNorm.{field}"), vec![d]);
    }
    for i in 0..s.layers {
        let layer = |field: &str| format!("bert.encoder.layer.{i}.{field}");
        for (field, shape) in [
            ("attention.self.query.weight", vec![d, d]),
            ("attention.self.query.bias", vec![d]),
            ("attention.self.key.weight", vec![d, d]),
            ("attention.self.key.bias", vec![d]),
            ("attention.self.value.weight", vec![d, d]),
            ("attention.self.value.bias", vec![d]),
            ("attention.output.dense.weight", vec![d, d]),
            ("attention.output.dense.bias", vec![d]),
            ("attention.output.LayerNorm.weight", vec![d]),
            ("attention.output.LayerNorm.bias", vec![d]),
            ("intermediate.dense.weight", vec![inter, d]),
            ("intermediate.dense.bias", vec![inter]),
            ("output.dense.weight", vec![d, inter]),
            ("output.dense.bias", vec![d]),
            ("output.LayerNorm.weight", vec![d]),
            ("output.LayerNorm.bias", vec![d]),
        ] {
            put(layer(field), shape);
        }
    }
    match s.labels {
        Some(labels) => {
            put("bert.pooler.dense.weight".into(), vec![d, d]);
            put("bert.pooler.dense.bias".into(), vec![d]);
            put("classifier.weight".into(), vec![labels, d]);
            put("classifier.bias".into(), vec![labels]);
        }
        None => {
            put("cls.predictions.transform.dense.weight".into(), vec![d, d]);
            put("cls.predictions.transform.dense.bias".into(), vec![d]);
            put("cls.predictions.transform.LayerNorm.weight".into(), vec![d]);
            put("cls.predictions.transform.LayerNorm.bias".into(), vec![d]);
            put("cls.predictions.bias".into(), vec![vocab]);
            if !s.tied {
                put("cls.predictions.decoder.weight".into(), vec![vocab, d]);
            }
        }
    }
    shapes
}

/// Every tensor of the spec's model in Hugging Face's names and layouts, with its shape.
pub fn shapes(spec: &JobSpec, vocab: usize) -> BTreeMap<String, Vec<usize>> {
    match spec.model.kind {
        ModelKind::Bert => bert_shapes(spec, vocab),
        _ => llama_shapes(spec, vocab),
    }
}

/// The whole model's parameters (as `export::whole_model` gives them) in Hugging Face's names
/// and layouts, with its `config.json`; a classifier's `label_names` become its `id2label`.
pub fn export(
    spec: &JobSpec,
    params: &BTreeMap<String, Tensor32>,
    label_names: &[String],
) -> anyhow::Result<(BTreeMap<String, Tensor32>, serde_json::Value)> {
    let kind = spec.model.kind;
    anyhow::ensure!(
        names(kind).is_some(),
        "--format hf: writes the llama and bert families; this job trains the {kind:?} (export \
         it as safetensors with Gantry's names instead)"
    );
    let mut out = BTreeMap::new();
    for (name, t) in params {
        let (hf, linear) = hf_name(kind, name)
            .ok_or_else(|| anyhow::anyhow!("--format hf: no Hugging Face name for {name}"))?;
        out.insert(hf, if linear { transpose(t) } else { t.clone() });
    }
    // The vocabulary as trained (a dataset's spec may leave model.vocab_size to the dataset).
    let embeddings = match kind {
        ModelKind::Bert => "embeddings.word_embeddings.weight",
        _ => "embed_tokens.weight",
    };
    let vocab = params
        .get(embeddings)
        .map(|t| t.shape[0])
        .ok_or_else(|| anyhow::anyhow!("--format hf: the model has no {embeddings}"))?;
    let config = match kind {
        ModelKind::Bert => bert_config(spec, vocab, label_names),
        _ => llama_config(spec, vocab),
    };
    Ok((out, config))
}

/// `config.json` of a `BertForMaskedLM` or `BertForSequenceClassification` of the spec's shape
/// and `vocab` tokens.
pub fn bert_config(spec: &JobSpec, vocab: usize, label_names: &[String]) -> serde_json::Value {
    let s = crate::bert::BertShape::of(spec);
    let mut config = serde_json::json!({
        "architectures": [if spec.task() == Task::Classification {
            "BertForSequenceClassification"
        } else {
            "BertForMaskedLM"
        }],
        "model_type": "bert",
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "intermediate_size": s.intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": s.positions,
        "type_vocab_size": s.types,
        "layer_norm_eps": s.eps,
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": s.tied,
        "torch_dtype": "float32",
    });
    if let Some(labels) = s.labels {
        let name = |i: usize| label_names.get(i).cloned().unwrap_or(format!("LABEL_{i}"));
        let id2label: serde_json::Map<String, serde_json::Value> = (0..labels)
            .map(|i| (i.to_string(), name(i).into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> =
            (0..labels).map(|i| (name(i), i.into())).collect();
        config["num_labels"] = labels.into();
        config["id2label"] = id2label.into();
        config["label2id"] = label2id.into();
    }
    config
}

/// `config.json` of a `LlamaForCausalLM` of the spec's shape and `vocab` tokens.
pub fn llama_config(spec: &JobSpec, vocab: usize) -> serde_json::Value {
    let m = &spec.model;
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.d_model / m.heads,
        "intermediate_size": m.intermediate_size(),
        "vocab_size": vocab,
        "max_position_embeddings": m.max_position_embeddings.unwrap_or(spec.data.seq_len),
        "rms_norm_eps": m.rms_norm_eps(),
        "rope_theta": m.rope_theta(),
        "rope_scaling": null,
        "tie_word_embeddings": m.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_hugging_face_and_linear_weights_are_transposed() {
        let llama = |n: &str| hf_name(ModelKind::Llama, n);
        assert_eq!(
            llama("layers.3.k_proj.weight"),
            Some(("model.layers.3.self_attn.k_proj.weight".into(), true))
        );
        assert_eq!(
            llama("layers.0.post_attention_layernorm.gamma"),
            Some((
                "model.layers.0.post_attention_layernorm.weight".into(),
                false
            ))
        );
        assert_eq!(llama("layers.0.rope"), None);
        for name in ["lm_head.weight", "layers.12.down_proj.weight", "norm.gamma"] {
            let (hf, _) = llama(name).unwrap();
            assert_eq!(gantry_name(ModelKind::Llama, &hf).unwrap().0, name);
        }
        assert_eq!(
            gantry_name(ModelKind::Llama, "model.layers.x.mlp.up_proj.weight"),
            None
        );
        // The bert's, both ways; a bare BertModel's names (MiniLM's) read as the task models'.
        assert_eq!(
            hf_name(ModelKind::Bert, "layers.2.attention_output_bias"),
            Some((
                "bert.encoder.layer.2.attention.output.dense.bias".into(),
                false
            ))
        );
        assert_eq!(
            gantry_name(
                ModelKind::Bert,
                "encoder.layer.5.attention.self.query.weight"
            ),
            Some(("layers.5.query.weight".into(), true))
        );
        assert_eq!(
            gantry_name(ModelKind::Bert, "embeddings.LayerNorm.weight"),
            Some(("embeddings.layer_norm.gamma".into(), false))
        );
        assert_eq!(
            gantry_name(ModelKind::Bert, "classifier.weight"),
            Some(("classifier.weight".into(), true))
        );
        assert_eq!(
            gantry_name(ModelKind::Bert, "cls.seq_relationship.weight"),
            None
        );
        let t = Tensor32 {
            shape: vec![2, 3],
            values: vec![1., 2., 3., 4., 5., 6.],
        };
        let tt = transpose(&t);
        assert_eq!(tt.shape, [3, 2]);
        assert_eq!(tt.values, [1., 4., 2., 5., 3., 6.]);
    }
}
