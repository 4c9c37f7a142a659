//! Whole-model parameters from a checkpoint: each position's shard loaded into its stage,
//! named as in the unsplit model, tensor-parallel slices joined, and written as one
//! safetensors file that PyTorch, NumPy or any safetensors reader opens.

use crate::runtime::checkpoint::{self, CheckpointStore, Manifest, writes_shard};
use crate::runtime::model::{Gpt, GptStage, Mlp, MlpStage, pipeline_blocks, stage_blocks};
use crate::runtime::stage::Stage;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::ModuleRecord;
use gantry_core::{Coords, JobSpec, Mesh, ModelKind};
use std::collections::BTreeMap;

/// One parameter of the whole model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor32 {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

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

/// How a stage's parameter is split over the tensor-parallel group: not at all, or along `dim`,
/// in `parts` equal parts (3 for the fused QKV projection) of which each rank holds a slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Split {
    Replicated,
    Along { dim: usize, parts: usize },
}

/// The whole model's name of a stage's parameter `local`, and how it is split.
pub(crate) fn whole_name(spec: &JobSpec, mesh: Mesh, at: Coords, local: &str) -> (String, Split) {
    let list = match spec.model.kind {
        ModelKind::Gpt => "blocks.",
        ModelKind::Mlp => "layers.",
    };
    let Some(rest) = local.strip_prefix(list) else {
        return (local.to_string(), Split::Replicated);
    };
    let (index, field) = rest
        .split_once('.')
        .expect("a block's parameter has a field");
    let offset = stage_blocks(pipeline_blocks(spec), at.pp as usize, mesh.pp as usize).start;
    let index = index.parse::<usize>().expect("block index") + offset;
    let field = match field {
        "proj_bias" => "proj.bias",
        "fc_out_bias" => "fc_out.bias",
        f => f,
    };
    let split = match field {
        _ if mesh.tp == 1 => Split::Replicated,
        "qkv.weight" => Split::Along { dim: 1, parts: 3 },
        "qkv.bias" => Split::Along { dim: 0, parts: 3 },
        "fc.weight" => Split::Along { dim: 1, parts: 1 },
        "fc.bias" | "proj.weight" | "fc_out.weight" => Split::Along { dim: 0, parts: 1 },
        _ => Split::Replicated,
    };
    (format!("{list}{index}.{field}"), split)
}

/// Joins the tensor-parallel slices (ordered by tp rank) of one parameter.
fn join(slices: &[Tensor32], dim: usize, parts: usize) -> Tensor32 {
    let values: Vec<&[f32]> = slices.iter().map(|s| &s.values[..]).collect();
    let mut shape = slices[0].shape.clone();
    let values = join_slices(&values, &shape, dim, parts, 1);
    shape[dim] *= slices.len();
    Tensor32 { shape, values }
}

/// A row-major tensor of `shape` (`unit` items per element) as rows along `dim`: how many, and
/// how many items each holds.
fn rows(shape: &[usize], dim: usize, unit: usize) -> (usize, usize) {
    let inner: usize = shape[dim + 1..].iter().product();
    (shape[..dim].iter().product(), shape[dim] * inner * unit)
}

/// Joins the slices (ordered by tp rank, each of shape `shape`) of a tensor split along `dim`
/// into `parts` equal parts, of each of which every rank holds one piece: a row-major tensor
/// of `unit` items per element (1 for values, the element's size for raw bytes).
pub(crate) fn join_slices<T: Copy>(
    slices: &[&[T]],
    shape: &[usize],
    dim: usize,
    parts: usize,
    unit: usize,
) -> Vec<T> {
    let (outer, row) = rows(shape, dim, unit);
    let piece = row / parts;
    let mut joined = Vec::with_capacity(slices.iter().map(|s| s.len()).sum());
    for o in 0..outer {
        for p in 0..parts {
            for s in slices {
                let start = o * row + p * piece;
                joined.extend_from_slice(&s[start..start + piece]);
            }
        }
    }
    joined
}

/// Rank `index` of `count`'s slice of `whole` (of shape `shape`), split along `dim` as
/// [`join_slices`] joins it: the inverse of that join.
pub(crate) fn slice_of<T: Copy>(
    whole: &[T],
    shape: &[usize],
    dim: usize,
    parts: usize,
    index: usize,
    count: usize,
    unit: usize,
) -> Vec<T> {
    let (outer, row) = rows(shape, dim, unit);
    let part = row / parts;
    let piece = part / count;
    let mut slice = Vec::with_capacity(whole.len() / count);
    for o in 0..outer {
        for p in 0..parts {
            let start = o * row + p * part + index * piece;
            slice.extend_from_slice(&whole[start..start + piece]);
        }
    }
    slice
}

/// A rank's parameters, loaded from its checkpoint shard into its stage.
fn load<S: Stage>(
    spec: &JobSpec,
    mesh: Mesh,
    rank: u32,
    model: bytes::Bytes,
) -> anyhow::Result<Vec<(String, Tensor32)>> {
    let device = Device::flex();
    let record = ModuleRecord::from_bytes(checkpoint::record(model))
        .map_err(|e| anyhow::anyhow!("model record of rank {rank}: {e:?}"))?;
    let stage = S::init(spec, mesh, rank, &device).load_record(record);
    Ok(named_parameters(&stage))
}

/// The whole model's parameters in the checkpoint `manifest` of a job run with `spec`: the
/// shard of each position (one replica's each), tensor-parallel slices joined, stages named as
/// in pp = 1.
pub async fn whole_model(
    spec: &JobSpec,
    store: &CheckpointStore,
    manifest: &Manifest,
) -> anyhow::Result<BTreeMap<String, Tensor32>> {
    let mesh = manifest.mesh();
    let split = mesh.pp > 1 || mesh.tp > 1;
    let mut pieces: BTreeMap<String, (Split, Vec<Tensor32>)> = BTreeMap::new();
    for rank in 0..mesh.world_size() {
        let at = mesh.coords(rank);
        if !writes_shard(mesh, at) {
            continue;
        }
        // Each file is checked against the manifest as it is read: read once, never trusted.
        let shard = store.read_verified_shard(manifest, rank).await?;
        let named = match (spec.model.kind, split) {
            (ModelKind::Mlp, false) => load::<Mlp>(spec, mesh, rank, shard.model)?,
            (ModelKind::Mlp, true) => load::<MlpStage>(spec, mesh, rank, shard.model)?,
            (ModelKind::Gpt, false) => load::<Gpt>(spec, mesh, rank, shard.model)?,
            (ModelKind::Gpt, true) => load::<GptStage>(spec, mesh, rank, shard.model)?,
        };
        for (local, tensor) in named {
            let (name, how) = whole_name(spec, mesh, at, &local);
            pieces
                .entry(name)
                .or_insert((how, Vec::new()))
                .1
                .push(tensor);
        }
    }
    Ok(pieces
        .into_iter()
        .map(|(name, (how, slices))| {
            let whole = match how {
                // Replicated over tp: every rank holds the same values; take tp rank 0's.
                Split::Replicated => slices.into_iter().next().expect("a slice"),
                Split::Along { dim, parts } => join(&slices, dim, parts),
            };
            (name, whole)
        })
        .collect())
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
    use crate::runtime::model::{PipelineModel, TrainModel};

    /// Every layout's shards, named and joined, are exactly the unsplit model's parameters.
    #[test]
    fn shards_of_every_layout_join_into_the_whole_model() {
        for kind in ["gpt", "mlp"] {
            let spec = JobSpec::from_json(&format!(
                r#"{{"name":"t","model":{{"kind":"{kind}","layers":2,"d_model":16,"heads":2}},
                "train":{{"steps":1,"global_batch":8,"lr":0.1}}}}"#
            ))
            .unwrap();
            let device = Device::flex();
            device.seed(3);
            let whole: BTreeMap<String, Tensor32> = match spec.model.kind {
                ModelKind::Gpt => named_parameters(&<Gpt as TrainModel>::init(&spec, &device)),
                ModelKind::Mlp => named_parameters(&<Mlp as TrainModel>::init(&spec, &device)),
            }
            .into_iter()
            .collect();
            let tps: &[u32] = if kind == "gpt" { &[1, 2] } else { &[1] };
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
