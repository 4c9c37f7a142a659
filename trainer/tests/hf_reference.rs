//! A llama's forward pass against an independent NumPy one (`reference/llama.py`, written from
//! Hugging Face's `LlamaForCausalLM`), over the very file `gantry export --format hf` writes:
//! the logits of a few sequences agree within 1e-4, with grouped-query attention, with
//! multi-query attention and tied embeddings, and the export's names and shapes are Hugging
//! Face's.

use burn::prelude::*;
use gantry_core::JobSpec;
use gantry_trainer::export::{named_parameters, write_safetensors};
use gantry_trainer::llama::Llama;
use gantry_trainer::model::TrainModel;
use std::process::Command;

fn llama(extra: &str) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"name":"t","model":{{"kind":"llama","num_hidden_layers":2,"hidden_size":32,
        "num_attention_heads":4,"intermediate_size":48,"rope_theta":500.0,{extra}}},
        "train":{{"steps":1,"global_batch":2,"lr":0.1}}}}"#
    ))
    .unwrap()
}

fn matches_the_numpy_reference(spec: &JobSpec) {
    let device = Device::flex();
    device.seed(11);
    let model = Llama::init(spec, &device);
    let dir = tempfile::tempdir().unwrap();
    let whole = named_parameters(&model).into_iter().collect();
    let (tensors, config) = gantry_trainer::hf::export(spec, &whole, &[]).unwrap();
    write_safetensors(
        &tensors,
        Default::default(),
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    let sequences: Vec<Vec<i64>> = vec![
        vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
        vec![12, 0, 7, 7, 2, 11, 8, 1, 0, 4],
    ];
    let (n, t) = (sequences.len(), sequences[0].len());
    let inputs: Vec<i64> = sequences.concat();
    let ours = model.logits(&inputs, n, t, &device);
    let vocab = ours.dims()[2];
    let ours = ours
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/llama.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir.path())
        .arg(serde_json::to_string(&sequences).unwrap())
        .output()
        .expect("python3 (scripts/test installs numpy and safetensors)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs: Vec<f64> = theirs["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s.as_array().unwrap().iter())
        .flat_map(|p| p.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    assert_eq!(theirs.len(), n * t * vocab);
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-4,
        "logits differ from the NumPy reference by up to {worst}"
    );
    // And they are not trivially equal: the model's outputs vary.
    let spread = theirs.iter().cloned().fold(f64::MIN, f64::max)
        - theirs.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.1, "{spread}");
}

#[test]
fn grouped_query_attention_matches_numpy() {
    matches_the_numpy_reference(&llama(r#""num_key_value_heads":2"#));
}

#[test]
fn multi_query_attention_with_tied_embeddings_matches_numpy() {
    matches_the_numpy_reference(&llama(
        r#""num_key_value_heads":1,"tie_word_embeddings":true"#,
    ));
}
