//! Whole-model parameters from a checkpoint: each position's shard, named as in the unsplit
//! model, tensor-parallel slices joined, and written as one safetensors file that PyTorch,
//! NumPy or any safetensors reader opens.

use crate::reshard;
pub use crate::reshard::Tensor32;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use gantry_checkpoint::{CheckpointStore, Manifest, writes_shard};
use gantry_core::{JobSpec, Rank};
use std::collections::BTreeMap;

/// Every float parameter of `model` by its module path (`blocks.0.qkv.weight`).
pub fn named_parameters<M: Module>(model: &M) -> Vec<(String, Tensor32)> {
    struct Named {
        path: Vec<String>,
        out: Vec<(String, Tensor32)>,
    }
    impl ModuleVisitor for Named {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let shape = value.dims().to_vec();
            let values = value
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 parameters");
            self.out
                .push((self.path.join("."), Tensor32 { shape, values }));
        }
    }
    let mut named = Named {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut named);
    named.out
}

/// The whole model's parameters in the checkpoint `manifest` of a job run with `spec`: the
/// shard of each position (one replica's each), joined at the record level as a resume at
/// another layout joins them ([`reshard::whole_parameters`]), named as in pp = 1.
pub async fn whole_model(
    spec: &JobSpec,
    store: &CheckpointStore,
    manifest: &Manifest,
) -> anyhow::Result<BTreeMap<String, Tensor32>> {
    let mesh = manifest.mesh();
    let mut shards = BTreeMap::new();
    for rank in 0..mesh.world_size() {
        if writes_shard(mesh, mesh.coords(rank)) {
            // Each file is checked against the manifest as it is read: read once, never trusted.
            shards.insert(rank, store.read_verified_shard(manifest, Rank(rank)).await?);
        }
    }
    reshard::whole_parameters(spec, mesh, &shards)
}

/// Writes parameters as a safetensors file (f32, row-major).
pub fn write_safetensors(
    params: &BTreeMap<String, Tensor32>,
    metadata: std::collections::HashMap<String, String>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let bytes: Vec<(&String, Vec<u8>, &[usize])> = params
        .iter()
        .map(|(name, t)| {
            let raw = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, raw, t.shape.as_slice())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), raw)?;
            Ok(((*name).clone(), view))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::Bert;
    use crate::layout::{Split, join_slices, whole_name};
    use crate::llama::{Llama, LlamaStage};
    use crate::model::{Gpt, GptStage, Mlp, MlpStage, PipelineModel, TrainModel};
    use gantry_core::{Mesh, ModelKind};

    /// Joins the tensor-parallel slices (ordered by tp rank) of one parameter.
    fn join(slices: &[Tensor32], dim: usize, parts: usize) -> Tensor32 {
        let values: Vec<&[f32]> = slices.iter().map(|s| &s.values[..]).collect();
        let mut shape = slices[0].shape.clone();
        let values = join_slices(&values, &shape, dim, parts, 1);
        shape[dim] *= slices.len();
        Tensor32 { shape, values }
    }

    /// Every layout's shards, named and joined, are exactly the unsplit model's parameters.
    #[test]
    fn shards_of_every_layout_join_into_the_whole_model() {
        let _rng = crate::rng_lock();
        // A bert (on a dataset: its vocabulary given) with the masked-LM head (its own
        // decoder), and with a classifier.
        let bert = r#""vocab_size":40},"data":{"source":"dataset:/nowhere""#;
        let classifier = r#""vocab_size":40,"num_labels":3},"data":{"source":"dataset:/nowhere""#;
        let cases = [
            ("gpt", r#""num_key_value_heads":2"#, ""),
            ("mlp", r#""num_key_value_heads":2"#, ""),
            ("llama", r#""num_key_value_heads":2"#, ""),
            // One key/value head for two tp ranks: replicated.
            ("llama", r#""num_key_value_heads":1"#, ""),
            ("bert", bert, ""),
            ("bert", classifier, r#","task":"classification""#),
        ];
        for (kind, model, train) in cases {
            let spec = JobSpec::from_json(&format!(
                r#"{{"name":"t","model":{{"kind":"{kind}","layers":2,"d_model":16,"heads":4,
                {model}}},"train":{{"steps":1,"global_batch":8,"lr":0.1{train}}}}}"#
            ))
            .unwrap();
            let device = Device::flex();
            device.seed(3);
            let whole: BTreeMap<String, Tensor32> = match spec.model.kind {
                ModelKind::Gpt => named_parameters(&<Gpt as TrainModel>::init(&spec, &device)),
                ModelKind::Mlp => named_parameters(&<Mlp as TrainModel>::init(&spec, &device)),
                ModelKind::Llama => named_parameters(&<Llama as TrainModel>::init(&spec, &device)),
                ModelKind::Bert => named_parameters(&Bert::whole(&spec, &device)),
            }
            .into_iter()
            .collect();
            let tps: &[u32] = if kind == "mlp" { &[1] } else { &[1, 2] };
            for &tp in tps {
                for pp in [1, 2] {
                    let mesh = Mesh::new(1, tp, pp);
                    let mut pieces: BTreeMap<String, (Split, Vec<Tensor32>)> = BTreeMap::new();
                    for rank in 0..mesh.world_size() {
                        device.seed(3);
                        let at = mesh.coords(rank);
                        let named = match spec.model.kind {
                            ModelKind::Gpt => {
                                named_parameters(&GptStage::new_stage(&spec, mesh, at, &device))
                            }
                            ModelKind::Mlp => {
                                named_parameters(&MlpStage::new_stage(&spec, mesh, at, &device))
                            }
                            ModelKind::Llama => {
                                named_parameters(&LlamaStage::new_stage(&spec, mesh, at, &device))
                            }
                            ModelKind::Bert => {
                                named_parameters(&Bert::new_stage(&spec, mesh, at, &device))
                            }
                        };
                        for (local, t) in named {
                            let (name, how) = whole_name(&spec, mesh, at, &local);
                            pieces.entry(name).or_insert((how, Vec::new())).1.push(t);
                        }
                    }
                    let joined: BTreeMap<String, Tensor32> = pieces
                        .into_iter()
                        .map(|(name, (how, slices))| {
                            let t = match how {
                                Split::Replicated => {
                                    assert!(slices.windows(2).all(|w| w[0] == w[1]), "{name}");
                                    slices[0].clone()
                                }
                                Split::Along { dim, parts } => join(&slices, dim, parts),
                            };
                            (name, t)
                        })
                        .collect();
                    assert!(joined == whole, "{kind} tp={tp} pp={pp}");
                }
            }
        }
    }
}
