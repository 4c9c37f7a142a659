//! `model.init_from`: a Hugging Face llama folder loads into every layout's ranks (each rank's
//! tensor-parallel slice and pipeline stage cut from it), and a folder that does not fit the
//! model is refused naming the tensor or field with both values.

use burn::prelude::*;
use gantry_core::{JobSpec, Mesh};
use gantry_trainer::export::{Tensor32, named_parameters, write_safetensors};
use gantry_trainer::llama::{Llama, LlamaStage};
use gantry_trainer::model::{PipelineModel, TrainModel};
use gantry_trainer::pretrained;
use std::collections::BTreeMap;
use std::path::Path;

/// The tests seed burn's one generator: one at a time.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spec() -> JobSpec {
    JobSpec::from_json(
        r#"{"name":"t","model":{"kind":"llama","layers":2,"d_model":16,"heads":4,
        "num_key_value_heads":2,"intermediate_size":32},
        "train":{"steps":1,"global_batch":2,"lr":0.1}}"#,
    )
    .unwrap()
}

/// A Hugging Face folder of `tensors` with `config`.
fn folder(dir: &Path, tensors: &BTreeMap<String, Tensor32>, config: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(tensors, Default::default(), &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn load(spec: &JobSpec, dir: &Path) -> anyhow::Result<pretrained::Pretrained> {
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    io.block_on(pretrained::load(
        spec,
        dir.to_str().unwrap(),
        &Default::default(),
        13,
    ))
}

#[test]
fn a_hugging_face_folder_loads_into_every_layout() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = spec();
    let device = Device::flex();
    device.seed(5);
    let source = Llama::init(&spec, &device);
    let whole = named_parameters(&source).into_iter().collect();
    let (hf, config) = gantry_trainer::hf::export(&spec, &whole, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), &hf, &config);
    let loaded = load(&spec, dir.path()).unwrap();
    assert_eq!(loaded.tensors(), hf.len());

    // One process: a model initialised from another seed becomes the source model.
    device.seed(99);
    let model = loaded
        .apply(
            Llama::init(&spec, &device),
            &spec,
            Mesh::new(1, 1, 1),
            Mesh::new(1, 1, 1).coords(0),
        )
        .unwrap();
    assert_eq!(named_parameters(&model), named_parameters(&source));
    // Every rank of tp = 2 × pp = 2 holds what the source model's own stages would.
    let mesh = Mesh::new(1, 2, 2);
    for rank in 0..mesh.world_size() {
        let at = mesh.coords(rank);
        device.seed(5);
        let want = LlamaStage::new_stage(&spec, mesh, at, &device);
        device.seed(99);
        let got = loaded
            .apply(
                LlamaStage::new_stage(&spec, mesh, at, &device),
                &spec,
                mesh,
                at,
            )
            .unwrap();
        assert_eq!(
            named_parameters(&got),
            named_parameters(&want),
            "rank {rank}"
        );
    }
}

#[test]
fn a_folder_that_does_not_fit_the_model_is_refused_by_name() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = spec();
    let device = Device::flex();
    device.seed(5);
    let whole = named_parameters(&Llama::init(&spec, &device))
        .into_iter()
        .collect();
    let (hf, config) = gantry_trainer::hf::export(&spec, &whole, &[]).unwrap();
    let root = tempfile::tempdir().unwrap();
    let refused = |name: &str, tensors: &BTreeMap<String, Tensor32>, config: &serde_json::Value| {
        let dir = root.path().join(name);
        folder(&dir, tensors, config);
        load(&spec, &dir).err().expect("refused").to_string()
    };

    let mut missing = hf.clone();
    missing.remove("model.layers.1.mlp.up_proj.weight");
    let err = refused("missing", &missing, &config);
    assert!(
        err.contains("tensor model.layers.1.mlp.up_proj.weight is missing (shape [32, 16])"),
        "{err}"
    );

    let mut extra = hf.clone();
    extra.insert(
        "model.layers.2.self_attn.q_proj.weight".into(),
        hf["model.layers.1.self_attn.q_proj.weight"].clone(),
    );
    let err = refused("extra", &extra, &config);
    assert!(
        err.contains("tensor model.layers.2.self_attn.q_proj.weight is not a parameter"),
        "{err}"
    );

    let mut misshaped = hf.clone();
    misshaped.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor32 {
            shape: vec![16, 16],
            values: vec![0.0; 256],
        },
    );
    let err = refused("misshaped", &misshaped, &config);
    assert!(
        err.contains("tensor model.layers.0.self_attn.k_proj.weight has shape [16, 16]; the model's is [8, 16]"),
        "{err}"
    );

    let mut wider = config.clone();
    wider["hidden_size"] = 32.into();
    let err = refused("config", &hf, &wider);
    assert!(
        err.contains("hidden_size is 32, but model.d_model is 16"),
        "{err}"
    );
    let mut mha = config.clone();
    mha["num_key_value_heads"] = 4.into();
    let err = refused("kv", &hf, &mha);
    assert!(
        err.contains("num_key_value_heads is 4, but model.num_key_value_heads is 2"),
        "{err}"
    );
    let mut theta = config.clone();
    theta["rope_theta"] = 500000.0.into();
    let err = refused("theta", &hf, &theta);
    assert!(
        err.contains("rope_theta is 500000, but model.rope_theta is 10000"),
        "{err}"
    );

    let err = load(&spec, &root.path().join("nowhere"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.init_from") && err.contains("config.json"),
        "{err}"
    );
}
