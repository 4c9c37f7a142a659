//! Hugging Face's format: a `llama`'s whole-model parameters under the names and layouts of
//! `transformers`' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj.weight`, linear weights
//! `[out, in]`, norms' `weight`), and the `config.json` that describes them, so that
//! `LlamaForCausalLM.from_pretrained(dir)` (or any reader of the format) opens an export.

use crate::reshard::Tensor32;
use gantry_core::{JobSpec, ModelKind};
use std::collections::BTreeMap;

/// The llama's names, Gantry's ↔ Hugging Face's, and whether the tensor is a linear weight
/// (stored `[in, out]` by burn, `[out, in]` by PyTorch): the model's own, then a decoder
/// layer's (under `layers.N.` and `model.layers.N.`).
const MODEL_NAMES: &[(&str, &str, bool)] = &[
    ("embed_tokens.weight", "model.embed_tokens.weight", false),
    ("norm.gamma", "model.norm.weight", false),
    ("lm_head.weight", "lm_head.weight", true),
];
const LAYER_NAMES: &[(&str, &str, bool)] = &[
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
];

/// `name` in the other naming: Hugging Face's for a Gantry name (`to_hf`), else Gantry's; and
/// whether it is a linear weight.
fn rename(name: &str, to_hf: bool) -> Option<(String, bool)> {
    let pick = |&(ours, theirs, linear): &(&'static str, &'static str, bool)| {
        if to_hf {
            (ours, theirs, linear)
        } else {
            (theirs, ours, linear)
        }
    };
    if let Some((_, other, linear)) = MODEL_NAMES.iter().map(pick).find(|(n, ..)| *n == name) {
        return Some((other.to_string(), linear));
    }
    let (from, to) = if to_hf {
        ("layers.", "model.layers.")
    } else {
        ("model.layers.", "layers.")
    };
    let (index, field) = name.strip_prefix(from)?.split_once('.')?;
    index.parse::<usize>().ok()?;
    let (_, other, linear) = LAYER_NAMES.iter().map(pick).find(|(n, ..)| *n == field)?;
    Some((format!("{to}{index}.{other}"), linear))
}

/// Gantry's name of a llama parameter → Hugging Face's, and whether it is a linear weight.
fn llama_name(name: &str) -> Option<(String, bool)> {
    rename(name, true)
}

/// Hugging Face's name of a llama parameter → Gantry's, and whether it is a linear weight.
pub fn gantry_name(hf: &str) -> Option<(String, bool)> {
    rename(hf, false)
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

/// The whole model's parameters (as `export::whole_model` gives them) in Hugging Face's names
/// and layouts, with its `config.json`.
pub fn export(
    spec: &JobSpec,
    params: &BTreeMap<String, Tensor32>,
) -> anyhow::Result<(BTreeMap<String, Tensor32>, serde_json::Value)> {
    anyhow::ensure!(
        spec.model.kind == ModelKind::Llama,
        "--format hf: writes the llama family; this job trains the {:?} (export it as \
         safetensors with Gantry's names instead)",
        spec.model.kind
    );
    let mut out = BTreeMap::new();
    for (name, t) in params {
        let (hf, linear) = llama_name(name)
            .ok_or_else(|| anyhow::anyhow!("--format hf: no Hugging Face name for {name}"))?;
        out.insert(hf, if linear { transpose(t) } else { t.clone() });
    }
    // The vocabulary as trained (a dataset's spec may leave model.vocab_size to the dataset).
    let vocab = params
        .get("embed_tokens.weight")
        .map(|t| t.shape[0])
        .ok_or_else(|| anyhow::anyhow!("--format hf: the model has no embed_tokens.weight"))?;
    Ok((out, llama_config(spec, vocab)))
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
        assert_eq!(
            llama_name("layers.3.k_proj.weight"),
            Some(("model.layers.3.self_attn.k_proj.weight".into(), true))
        );
        assert_eq!(
            llama_name("layers.0.post_attention_layernorm.gamma"),
            Some((
                "model.layers.0.post_attention_layernorm.weight".into(),
                false
            ))
        );
        assert_eq!(llama_name("layers.0.rope"), None);
        for name in ["lm_head.weight", "layers.12.down_proj.weight", "norm.gamma"] {
            let (hf, _) = llama_name(name).unwrap();
            assert_eq!(gantry_name(&hf).unwrap().0, name);
        }
        assert_eq!(gantry_name("model.layers.x.mlp.up_proj.weight"), None);
        let t = Tensor32 {
            shape: vec![2, 3],
            values: vec![1., 2., 3., 4., 5., 6.],
        };
        let tt = transpose(&t);
        assert_eq!(tt.shape, [3, 2]);
        assert_eq!(tt.values, [1., 4., 2., 5., 3., 6.]);
    }
}
