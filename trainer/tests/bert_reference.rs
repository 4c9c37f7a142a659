//! The bert against an independent NumPy forward pass (`reference/bert.py`, written from
//! Hugging Face's `modeling_bert.py`), over the very files `gantry export --format hf` writes
//! and over the real pretrained MiniLM as `model.init_from` loads it: hidden states and the
//! heads' logits agree within 1e-4, and the export's names and shapes are Hugging Face's.

use burn::prelude::*;
use gantry_core::JobSpec;
use gantry_trainer::bert::Bert;
use gantry_trainer::data::Batch;
use gantry_trainer::export::{named_parameters, write_safetensors};
use std::path::Path;
use std::process::Command;

/// The tests seed burn's one generator: one at a time.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bert(model: &str, train: &str) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"name":"t","model":{{"kind":"bert","num_hidden_layers":2,"hidden_size":32,
        "num_attention_heads":4,"intermediate_size":48,"vocab_size":50,
        "max_position_embeddings":16{model}}},"data":{{"source":"dataset:/nowhere","seq_len":16}},
        "train":{{"steps":1,"global_batch":2,"lr":0.1{train}}}}}"#
    ))
    .unwrap()
}

/// What `reference/bert.py` computes for `sequences` (padded past `lengths`) over `folder`.
fn reference(folder: &Path, sequences: &[Vec<i64>], lengths: &[usize]) -> serde_json::Value {
    let mask: Vec<Vec<u8>> = sequences
        .iter()
        .zip(lengths)
        .map(|(s, &len)| (0..s.len()).map(|p| u8::from(p < len)).collect())
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/bert.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(folder)
        .arg(serde_json::to_string(sequences).unwrap())
        .arg(serde_json::to_string(&mask).unwrap())
        .output()
        .expect("python3 (scripts/test installs numpy and safetensors)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every number of a nested JSON array, in order.
fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(flat).collect(),
        n => vec![n.as_f64().expect("a number")],
    }
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// The largest difference between ours and theirs, which must be as many numbers; and theirs
/// must not be trivially alike (spread over more than 100× the tolerance).
fn worst(ours: &[f32], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len(), "as many values");
    let spread = theirs.iter().cloned().fold(f64::MIN, f64::max)
        - theirs.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 1e-2, "the reference's outputs vary: {spread}");
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max)
}

/// [`worst`] over the hidden states of real tokens only (`[n, t, d]`, sample i `lengths[i]`
/// long): padded positions are computed but mean nothing.
fn worst_unpadded(ours: Tensor<3>, theirs: &serde_json::Value, lengths: &[usize]) -> f64 {
    let [_, t, d] = ours.dims();
    let keep = |i: &usize| (i / d) % t < lengths[i / (d * t)];
    let (ours, theirs) = (values(ours), flat(theirs));
    let ours: Vec<f32> = (0..ours.len()).filter(keep).map(|i| ours[i]).collect();
    let theirs: Vec<f64> = (0..theirs.len()).filter(keep).map(|i| theirs[i]).collect();
    worst(&ours, &theirs)
}

/// Exports `model` as `gantry export --format hf` does, into `dir`.
fn export(spec: &JobSpec, model: &Bert, dir: &Path) {
    let whole = named_parameters(model).into_iter().collect();
    let labels = ["ham".to_string(), "spam".into(), "eggs".into()];
    let (tensors, config) = gantry_trainer::hf::export(spec, &whole, &labels).unwrap();
    write_safetensors(&tensors, Default::default(), &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

const SEQUENCES: [[i64; 10]; 2] = [
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
    [12, 0, 7, 7, 2, 11, 8, 1, 0, 4],
];

/// A masked-LM bert, exported: hidden states and the logits at every position (the head on all
/// of them) match the reference's.
fn masked_lm_matches_numpy(model_fields: &str) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = bert(model_fields, "");
    let device = Device::flex();
    device.seed(11);
    let model = Bert::whole(&spec, &device);
    let dir = tempfile::tempdir().unwrap();
    export(&spec, &model, dir.path());

    let sequences: Vec<Vec<i64>> = SEQUENCES.iter().map(|s| s.to_vec()).collect();
    let (n, t) = (sequences.len(), sequences[0].len());
    let inputs: Vec<i64> = sequences.concat();
    let hidden = model.hidden_states(&inputs, None, n, t, &device);
    let batch = Batch::Masked {
        inputs: inputs.clone(),
        positions: (0..(n * t) as i64).collect(),
        targets: vec![0; n * t],
        n,
        seq_len: t,
    };
    let logits = model.head(hidden.clone(), &batch, &device);

    let theirs = reference(dir.path(), &sequences, &[t, t]);
    let h = worst(&values(hidden), &flat(&theirs["hidden"]));
    assert!(h < 1e-4, "hidden states differ by up to {h}");
    let l = worst(&values(logits), &flat(&theirs["mlm_logits"]));
    assert!(l < 1e-4, "masked-LM logits differ by up to {l}");
}

#[test]
fn an_exported_bert_matches_numpy() {
    masked_lm_matches_numpy("");
}

#[test]
fn an_exported_bert_with_a_tied_head_matches_numpy() {
    masked_lm_matches_numpy(r#","tie_word_embeddings":true"#);
}

/// A classifier, exported, on padded sequences: the padding is masked as Hugging Face masks it,
/// and the pooled classifier logits match.
#[test]
fn an_exported_bert_classifier_matches_numpy_on_padded_sequences() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = bert(r#","num_labels":3"#, r#","task":"classification""#);
    let device = Device::flex();
    device.seed(12);
    let model = Bert::whole(&spec, &device);
    let dir = tempfile::tempdir().unwrap();
    export(&spec, &model, dir.path());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["1"], "spam");

    let sequences: Vec<Vec<i64>> = SEQUENCES.iter().map(|s| s.to_vec()).collect();
    let lengths = [10, 6];
    let (n, t) = (sequences.len(), sequences[0].len());
    let inputs: Vec<i64> = sequences.concat();
    let hidden = model.hidden_states(&inputs, Some(&lengths), n, t, &device);
    let batch = Batch::Labelled {
        inputs: inputs.clone(),
        lengths: lengths.to_vec(),
        labels: vec![0, 1],
        n,
        seq_len: t,
    };
    let logits = model.head(hidden.clone(), &batch, &device);
    let theirs = reference(dir.path(), &sequences, &lengths);
    let h = worst_unpadded(hidden, &theirs["hidden"], &lengths);
    assert!(h < 1e-4, "hidden states differ by up to {h}");
    let c = worst(&values(logits), &flat(&theirs["classifier_logits"]));
    assert!(c < 1e-4, "classifier logits differ by up to {c}");
}

/// The real pretrained MiniLM (from PyPI, fetched by scripts/test-corpora), loaded with
/// `model.init_from` into a classifier (its pooler loaded, a new classifier from the seed):
/// the hidden states of sentences its own tokenizer encodes match the reference's over the
/// very same folder.
#[test]
fn minilm_loaded_with_init_from_matches_numpy() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let corpora = std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    );
    let folder = Path::new(&corpora).join("minilm");
    let spec = JobSpec::from_json(&format!(
        r#"{{"name":"t","model":{{"kind":"bert","num_hidden_layers":6,"hidden_size":384,
        "num_attention_heads":12,"intermediate_size":1536,"max_position_embeddings":512,
        "init_from":"{}"}},"data":{{"source":"dataset:/nowhere","seq_len":16}},
        "train":{{"steps":1,"global_batch":2,"lr":0.1,"task":"classification"}}}}"#,
        folder.display()
    ))
    .unwrap();
    let tokenizer = gantry_data::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
    let texts = [
        "Free money!!! Click here to claim your prize now.",
        "The meeting is moved to Thursday afternoon.",
    ];
    let mut sequences: Vec<Vec<i64>> = texts
        .iter()
        .map(|text| {
            let ids = tokenizer.encode(*text, true).unwrap();
            ids.get_ids()
                .iter()
                .zip(ids.get_attention_mask())
                .filter(|(_, m)| **m == 1)
                .map(|(&id, _)| i64::from(id))
                .collect()
        })
        .collect();
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let t = *lengths.iter().max().unwrap();
    for s in &mut sequences {
        s.resize(t, 0); // [PAD]
    }
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pretrained = io
        .block_on(gantry_trainer::pretrained::load(
            &spec,
            folder.to_str().unwrap(),
            &Default::default(),
            30_522,
        ))
        .unwrap();
    assert_eq!(
        pretrained.fresh,
        ["classifier.bias", "classifier.weight"],
        "MiniLM has a pooler but no classifier"
    );
    let device = Device::flex();
    device.seed(1);
    let one = gantry_core::Mesh::new(1, 1, 1);
    let model = pretrained
        .apply(Bert::whole(&spec, &device), &spec, one, one.coords(0))
        .unwrap();
    let n = sequences.len();
    let hidden = model.hidden_states(&sequences.concat(), Some(&lengths), n, t, &device);
    let theirs = reference(&folder, &sequences, &lengths);
    let h = worst_unpadded(hidden, &theirs["hidden"], &lengths);
    assert!(h < 1e-4, "MiniLM's hidden states differ by up to {h}");
}

/// A folder that does not fit the spec is refused before any weight is used, naming the field
/// or the tensor with both values.
#[test]
fn a_bert_folder_that_does_not_fit_is_refused_by_name() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let spec = bert("", "");
    let device = Device::flex();
    device.seed(13);
    let dir = tempfile::tempdir().unwrap();
    export(&spec, &Bert::whole(&spec, &device), dir.path());
    let load = |spec: &JobSpec| {
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        io.block_on(gantry_trainer::pretrained::load(
            spec,
            dir.path().to_str().unwrap(),
            &Default::default(),
            50,
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    assert!(load(&spec).is_empty(), "{}", load(&spec));
    // A config field that disagrees.
    let wider = bert(r#","intermediate_size":64"#, "");
    let wider = wider.clone();
    let e = load(&wider);
    assert!(
        e.contains("intermediate_size is 48, but model.intermediate_size is 64"),
        "{e}"
    );
    // A tensor of the wrong shape, a missing one and one the model does not have.
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let mut tensors: std::collections::BTreeMap<String, gantry_trainer::export::Tensor32> =
        safetensors::SafeTensors::deserialize(&bytes)
            .unwrap()
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let shape = view.shape().to_vec();
                (name, gantry_trainer::export::Tensor32 { shape, values })
            })
            .collect();
    let query = "bert.encoder.layer.1.attention.self.query.weight".to_string();
    let rewrite = |tensors: &std::collections::BTreeMap<_, _>| {
        write_safetensors(tensors, Default::default(), &path).unwrap();
    };
    let kept = tensors.remove(&query).unwrap();
    rewrite(&tensors);
    let e = load(&spec);
    assert!(
        e.contains(&format!("tensor {query} is missing (shape [32, 32])")),
        "{e}"
    );
    tensors.insert(
        query.clone(),
        gantry_trainer::export::Tensor32 {
            shape: vec![32, 16],
            values: kept.values[..512].to_vec(),
        },
    );
    rewrite(&tensors);
    let e = load(&spec);
    assert!(
        e.contains(&format!(
            "tensor {query} has shape [32, 16]; the model's is [32, 32]"
        )),
        "{e}"
    );
    tensors.insert(query, kept.clone());
    tensors.insert("bert.encoder.layer.9.output.dense.bias".into(), kept);
    rewrite(&tensors);
    let e = load(&spec);
    assert!(
        e.contains("tensor bert.encoder.layer.9.output.dense.bias is not a parameter"),
        "{e}"
    );
}
