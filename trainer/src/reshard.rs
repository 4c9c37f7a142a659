//! Resuming at another tensor- or pipeline-parallel layout.
//!
//! A checkpoint holds, for each position of the model (a pipeline stage's tensor-parallel
//! slice), two burnpack records: the stage's parameters, named by module path and carrying
//! their parameter ids, and the optimizer's state, as tensors and scalars named
//! `{param_id}.{leaf}` (burn-optim's documented record format). Both can be translated to the
//! whole model's names: a parameter through its stage's path ([`whole_name`]), its optimizer
//! state through its id. Every position's shards, joined that way, are the whole state, which
//! this module then cuts for a rank of the new layout, under the ids of that rank's freshly
//! built stage. A rank joins only the part its stage needs: the shards of the saved stages
//! that share a block with it ([`sources`]). Nothing is computed: every value is copied bit
//! for bit, so the model and optimizer state after a resume at another layout are the state
//! that was saved.
//!
//! Optimizer state shaped like its parameter (Adam's moments) is split like the parameter;
//! anything else (a step count) must be replicated, and a parameter split over tensor-parallel
//! ranks with state of another shape is refused rather than guessed at.

use crate::layout::{Split, join_slices, pipeline_blocks, slice_of, stage_blocks, whole_name};
use burn_pack::{DType, Reader, Scalar, Writer};
use gantry_checkpoint::{Shard, writes_shard};
use gantry_core::{JobSpec, Mesh};
use std::collections::BTreeMap;

/// One tensor of the whole state.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A record's tensors and what it says besides them.
struct Unpacked {
    tensors: Vec<(String, Option<u64>, Entry)>,
    scalars: BTreeMap<String, Scalar>,
    metadata: BTreeMap<String, String>,
}

fn unpack(what: &str, bytes: bytes::Bytes) -> anyhow::Result<Unpacked> {
    let reader = Reader::from_bytes(crate::records::record(bytes))
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let tensors = reader
        .into_tensors()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?
        .into_iter()
        .map(|t| {
            let (name, dtype, shape, id, bytes) =
                t.into_parts().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            let shape = shape.iter().copied().collect();
            Ok((
                name,
                id,
                Entry {
                    dtype,
                    shape,
                    bytes: bytes.to_vec(),
                },
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Unpacked {
        tensors,
        scalars,
        metadata,
    })
}

/// `{param_id}.{leaf}` as (id, leaf).
fn id_and_leaf(name: &str) -> Option<(u64, &str)> {
    let (id, leaf) = name.split_once('.')?;
    Some((id.parse().ok()?, leaf))
}

/// The whole model's state, by the whole model's parameter names.
#[derive(Debug, Default, PartialEq)]
struct Whole {
    params: BTreeMap<String, Entry>,
    /// (parameter, leaf): optimizer state tensors, and whether each is shaped like its
    /// parameter (and so split like it).
    state: BTreeMap<(String, String), (bool, Entry)>,
    scalars: BTreeMap<(String, String), Scalar>,
    /// Whether the optimizer's records name their parameters' paths.
    paths: bool,
}

impl Whole {
    /// Joins shards (by rank) of a checkpoint written at `saved`: one of each position, or
    /// those of the stages a rank needs; the optimizer's state too when `with_state`.
    fn join(
        spec: &JobSpec,
        saved: Mesh,
        shards: &BTreeMap<u32, Shard>,
        with_state: bool,
    ) -> anyhow::Result<Self> {
        // Pieces by tensor-parallel rank, joined once all are in.
        type Pieces<K> = BTreeMap<K, (Split, Vec<(u32, Entry)>)>;
        let mut params: Pieces<String> = BTreeMap::new();
        let mut state: Pieces<(String, String)> = BTreeMap::new();
        let mut like_params = BTreeMap::new();
        let mut whole = Whole::default();
        for (&rank, shard) in shards {
            let at = saved.coords(rank);
            let model = unpack(&format!("model record of rank {rank}"), shard.model.clone())?;
            // Each parameter id of this rank: its whole name, split, and shard's shape.
            let mut ids = BTreeMap::new();
            for (local, id, entry) in model.tensors {
                let (name, split) = whole_name(spec, saved, at, &local);
                let id = id.ok_or_else(|| {
                    anyhow::anyhow!("model record of rank {rank}: {local} has no parameter id")
                })?;
                ids.insert(id, (name.clone(), split, entry.shape.clone()));
                let pieces = params.entry(name).or_insert((split, Vec::new()));
                pieces.1.push((at.tp, entry));
            }
            if !with_state {
                continue;
            }
            let what = format!("optimizer record of rank {rank}");
            let optimizer = unpack(&what, shard.optimizer.clone())?;
            let param = |name: &str| {
                id_and_leaf(name)
                    .and_then(|(id, leaf)| Some((ids.get(&id)?, leaf.to_string())))
                    .ok_or_else(|| anyhow::anyhow!("{what}: {name} names no parameter"))
            };
            for (name, value) in &optimizer.scalars {
                let ((whole_name, ..), leaf) = param(name)?;
                whole.scalars.insert((whole_name.clone(), leaf), *value);
            }
            whole.paths |= !optimizer.metadata.is_empty();
            for (name, _, entry) in optimizer.tensors {
                let ((param_name, split, shape), leaf) = param(&name)?;
                let like_param = entry.shape == *shape;
                let split = match split {
                    _ if like_param => *split,
                    Split::Replicated => Split::Replicated,
                    Split::Along { .. } => anyhow::bail!(
                        "{what}: state {leaf} of {param_name} is shaped {:?}, its parameter's \
                         tensor-parallel slice {shape:?}; it cannot be resharded",
                        entry.shape
                    ),
                };
                let key = (param_name.clone(), leaf);
                like_params.insert(key.clone(), like_param);
                let pieces = state.entry(key).or_insert((split, Vec::new()));
                pieces.1.push((at.tp, entry));
            }
        }
        let joined = |(split, mut pieces): (Split, Vec<(u32, Entry)>)| {
            pieces.sort_by_key(|(tp, _)| *tp);
            let first = &pieces[0].1;
            match split {
                // Replicated over tp: every rank holds the same values; take tp rank 0's.
                Split::Replicated => first.clone(),
                Split::Along { dim, parts } => {
                    let unit = first.dtype.size();
                    let slices: Vec<&[u8]> = pieces.iter().map(|(_, e)| &e.bytes[..]).collect();
                    let mut shape = first.shape.clone();
                    let bytes = join_slices(&slices, &shape, dim, parts, unit);
                    shape[dim] *= pieces.len();
                    Entry {
                        dtype: first.dtype,
                        shape,
                        bytes,
                    }
                }
            }
        };
        for (name, pieces) in params {
            whole.params.insert(name, joined(pieces));
        }
        for (key, pieces) in state {
            let like_param = like_params[&key];
            whole.state.insert(key, (like_param, joined(pieces)));
        }
        Ok(whole)
    }

    /// This rank's piece of the whole state at layout `mesh`, as the model and optimizer
    /// records of its stage, whose freshly built record `fresh` gives the parameters' paths,
    /// ids and shapes.
    fn cut(
        &self,
        spec: &JobSpec,
        mesh: Mesh,
        rank: u32,
        fresh: bytes::Bytes,
    ) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let at = mesh.coords(rank);
        let piece = |split: Split, entry: &Entry| -> Entry {
            match split {
                Split::Replicated => entry.clone(),
                Split::Along { dim, parts } => {
                    let (index, count) = (at.tp as usize, mesh.tp as usize);
                    let unit = entry.dtype.size();
                    let bytes =
                        slice_of(&entry.bytes, &entry.shape, dim, parts, index, count, unit);
                    let mut shape = entry.shape.clone();
                    shape[dim] /= count;
                    Entry {
                        dtype: entry.dtype,
                        shape,
                        bytes,
                    }
                }
            }
        };
        let packed = |name: String, id: u64, e: Entry| {
            let bytes = burn::tensor::Bytes::from_bytes_vec(e.bytes);
            burn_pack::Tensor::new(name, e.dtype, e.shape, Some(id), bytes)
        };
        let mut model = Vec::new();
        let mut state = Vec::new();
        let mut scalars = Vec::new();
        let mut paths = Vec::new();
        for (local, id, fresh) in unpack("this rank's model", fresh)?.tensors {
            let id = id.expect("a built stage's parameters have ids");
            let (name, split) = whole_name(spec, mesh, at, &local);
            let whole = self.params.get(&name).ok_or_else(|| {
                anyhow::anyhow!("the checkpoint has no parameter {name} for {local}")
            })?;
            let mine = piece(split, whole);
            anyhow::ensure!(
                mine.shape == fresh.shape && mine.dtype == fresh.dtype,
                "parameter {name} is {:?} {:?} whole, which gives this rank {:?} {:?}, but its \
                 stage holds {:?} {:?}",
                whole.dtype,
                whole.shape,
                mine.dtype,
                mine.shape,
                fresh.dtype,
                fresh.shape
            );
            let key = |leaf: &str| (name.clone(), leaf.to_string());
            let leaves = self
                .state
                .range(key("")..)
                .take_while(|((p, _), _)| *p == name);
            for ((_, leaf), (like_param, entry)) in leaves {
                let split = if *like_param {
                    split
                } else {
                    Split::Replicated
                };
                state.push(packed(format!("{id}.{leaf}"), id, piece(split, entry)));
            }
            let leaves = self
                .scalars
                .range(key("")..)
                .take_while(|((p, _), _)| *p == name);
            scalars.extend(leaves.map(|((_, leaf), v)| (format!("{id}.{leaf}"), *v)));
            if self.paths {
                paths.push((id.to_string(), local.clone()));
            }
            model.push(packed(local, id, mine));
        }
        let model = Writer::new(model).into_bytes()?;
        let mut optimizer = Writer::new(state);
        for (name, value) in scalars {
            optimizer = optimizer.with_scalar(&name, value);
        }
        for (id, path) in paths {
            optimizer = optimizer.with_metadata(&id, &path);
        }
        Ok((model.to_vec(), optimizer.into_bytes()?.to_vec()))
    }
}

/// One parameter of the whole model, as f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor32 {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The whole model's parameters, by their whole-model names, from the shards (by rank) of a
/// checkpoint written at `saved` that hold every position: joined as a resume joins them.
pub fn whole_parameters(
    spec: &JobSpec,
    saved: Mesh,
    shards: &BTreeMap<u32, Shard>,
) -> anyhow::Result<BTreeMap<String, Tensor32>> {
    Whole::join(spec, saved, shards, false)?
        .params
        .into_iter()
        .map(|(name, e)| {
            anyhow::ensure!(
                e.dtype == DType::F32,
                "parameter {name} is {:?}, not f32",
                e.dtype
            );
            let values = e
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((
                name,
                Tensor32 {
                    shape: e.shape,
                    values,
                },
            ))
        })
        .collect()
}

/// The ranks of a checkpoint written at layout `saved` whose shards rank `rank` of layout
/// `mesh` reads to reshard: the shards (one replica's each, [`writes_shard`]) of every
/// tensor-parallel slice of each pipeline stage that shares a block with the rank's own stage. (Every stage holds a
/// block at least, and the gpt's first- and last-stage parameters come with the first and
/// last blocks.) A rank reads its stage's part of the state, not the whole model's.
pub fn sources(spec: &JobSpec, saved: Mesh, mesh: Mesh, rank: u32) -> Vec<u32> {
    let blocks = pipeline_blocks(spec);
    let mine = stage_blocks(blocks, mesh.coords(rank).pp as usize, mesh.pp as usize);
    (0..saved.world_size())
        .filter(|&r| {
            let at = saved.coords(r);
            let theirs = stage_blocks(blocks, at.pp as usize, saved.pp as usize);
            writes_shard(saved, at) && theirs.start < mine.end && mine.start < theirs.end
        })
        .collect()
}

/// Rank `rank`'s shard at layout `mesh`, from the shards (by rank) that [`sources`] names of
/// a checkpoint written at layout `saved`. `fresh` is the record of the rank's freshly built
/// stage, which gives its parameters' paths and ids.
pub fn reshard(
    spec: &JobSpec,
    saved: Mesh,
    shards: &BTreeMap<u32, Shard>,
    mesh: Mesh,
    rank: u32,
    fresh: bytes::Bytes,
) -> anyhow::Result<Shard> {
    let whole = Whole::join(spec, saved, shards, true)?;
    let (model, optimizer) = whole.cut(spec, mesh, rank, fresh)?;
    let first = shards.values().next().expect("a shard");
    Ok(Shard {
        model: model.into(),
        optimizer: optimizer.into(),
        data_cursor: first.data_cursor,
        loss: first.loss,
        eval_loss: first.eval_loss,
        loss_scale: first.loss_scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Split as DataSplit};
    use crate::llama::{Llama, LlamaStage};
    use crate::model::{Gpt, GptStage, Mlp, MlpStage, TrainModel};
    use crate::stage::Stage;
    use burn::module::Module;
    use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
    use burn::prelude::*;
    use burn::store::ModuleRecord;
    use gantry_core::Coords;

    fn shard_of<M: Module>(model: M, optimizer: &ModuleOptimizer) -> Shard {
        Shard {
            model: crate::records::shared(model.into_record().into_bytes().unwrap()),
            optimizer: crate::records::shared(optimizer.into_bytes().unwrap()),
            data_cursor: 2,
            loss: Some(1.5),
            eval_loss: None,
            loss_scale: None,
        }
    }

    /// The one-process model after two Adam steps (so the moments hold real values), saved.
    fn trained<M: TrainModel>(spec: &JobSpec) -> Shard {
        let device = Device::flex().autodiff();
        let batch = Dataset::for_spec(spec).batch(DataSplit::Train, &[0, 1, 2, 3]);
        let mut model = M::init(spec, &device);
        let mut optimizer = AdamConfig::new().init();
        for _ in 0..2 {
            let grads = GradientsParams::from_grads(model.loss(&batch, &device).backward(), &model);
            model = optimizer.step(0.01, model, grads);
        }
        shard_of(model, &optimizer)
    }

    /// Every rank's shard at `mesh`, cut from `saved` (at layout `from`) and loaded by burn
    /// into that rank's stage and optimizer, then saved again: what a resumed run would save.
    fn resumed_at<S: Stage>(
        spec: &JobSpec,
        from: Mesh,
        saved: &BTreeMap<u32, Shard>,
        mesh: Mesh,
    ) -> BTreeMap<u32, Shard> {
        let device = Device::flex().autodiff();
        (0..mesh.world_size())
            .map(|rank| {
                let stage = S::init(spec, mesh, rank, &device);
                let fresh =
                    crate::records::shared(stage.clone().into_record().into_bytes().unwrap());
                // Only the shards the rank reads when it resumes.
                let read: BTreeMap<u32, Shard> = sources(spec, from, mesh, rank)
                    .into_iter()
                    .map(|r| (r, saved[&r].clone()))
                    .collect();
                let shard = reshard(spec, from, &read, mesh, rank, fresh).unwrap();
                let record = ModuleRecord::from_bytes(crate::records::record(shard.model)).unwrap();
                let stage = stage.load_record(record);
                let optimizer = AdamConfig::new()
                    .init()
                    .from_bytes(crate::records::record(shard.optimizer))
                    .unwrap();
                (rank, shard_of(stage, &optimizer))
            })
            .collect()
    }

    /// Resharded from one process to `layouts` and back, loaded by burn at every stop.
    fn round_trips<One: TrainModel + Stage, Split: Stage>(spec: &JobSpec, layouts: &[(u32, u32)]) {
        let one = Mesh::new(1, 1, 1);
        let saved = BTreeMap::from([(0, trained::<One>(spec))]);
        let whole = Whole::join(spec, one, &saved, true).unwrap();
        assert!(!whole.state.is_empty() && !whole.scalars.is_empty());
        let tensors = |shard: &Shard| -> BTreeMap<String, Entry> {
            let unpacked = unpack("model", shard.model.clone()).unwrap();
            unpacked
                .tensors
                .into_iter()
                .map(|(n, _, e)| (n, e))
                .collect()
        };
        let mut previous: Option<(Mesh, BTreeMap<u32, Shard>)> = None;
        for &(tp, pp) in layouts {
            let mesh = Mesh::new(1, tp, pp);
            let split = resumed_at::<Split>(spec, one, &saved, mesh);
            let at_layout = Whole::join(spec, mesh, &split, true).unwrap();
            assert!(at_layout == whole, "at tp={tp} pp={pp}");
            // Straight from the layout before, where a stage reads only some stages' shards.
            if let Some((from, shards)) = previous.replace((mesh, split.clone())) {
                let direct = resumed_at::<Split>(spec, from, &shards, mesh);
                assert!(
                    Whole::join(spec, mesh, &direct, true).unwrap() == whole,
                    "from {from:?} to tp={tp} pp={pp}"
                );
            }
            let back = resumed_at::<One>(spec, mesh, &split, one);
            assert!(
                Whole::join(spec, one, &back, true).unwrap() == whole,
                "from tp={tp} pp={pp}"
            );
            // And the model record itself: the tensors first saved, bit for bit.
            assert!(
                tensors(&back[&0]) == tensors(&saved[&0]),
                "from tp={tp} pp={pp}"
            );
            // The same layout saved at dp = 2, where each position's shard is one replica's
            // (the positions take turns): only the writers' shards exist.
            let dp2 = Mesh::new(2, tp, pp);
            let written: BTreeMap<u32, Shard> = (0..dp2.world_size())
                .filter(|&r| writes_shard(dp2, dp2.coords(r)))
                .map(|r| {
                    (
                        r,
                        split[&mesh.rank(Coords {
                            dp: 0,
                            ..dp2.coords(r)
                        })]
                            .clone(),
                    )
                })
                .collect();
            let back = resumed_at::<One>(spec, dp2, &written, one);
            assert!(
                Whole::join(spec, one, &back, true).unwrap() == whole,
                "from dp=2 tp={tp} pp={pp}"
            );
        }
    }

    /// A trained state saved by one process, resharded to tensor- and pipeline-parallel
    /// layouts and back: the whole state (parameters, Adam moments and step counts) is the
    /// same, bit for bit, at every layout and back at one process.
    #[test]
    fn state_resharded_to_any_layout_and_back_is_bit_identical() {
        let _rng = crate::rng_lock();
        let spec = |kind: &str| {
            JobSpec::from_json(&format!(
                r#"{{"name":"t","model":{{"kind":"{kind}","layers":2,"d_model":16,"heads":2}},
                "data":{{"seq_len":8,"examples":64}},
                "train":{{"steps":4,"global_batch":4,"lr":0.01}}}}"#
            ))
            .unwrap()
        };
        round_trips::<Gpt, GptStage>(&spec("gpt"), &[(2, 1), (1, 2), (2, 2)]);
        // A llama with grouped-query attention: two key/value heads, one per tp rank.
        let llama = JobSpec::from_json(
            r#"{"name":"t","model":{"kind":"llama","layers":2,"d_model":16,"heads":4,
            "num_key_value_heads":2},"data":{"seq_len":8,"examples":64},
            "train":{"steps":4,"global_batch":4,"lr":0.01}}"#,
        )
        .unwrap();
        round_trips::<Llama, LlamaStage>(&llama, &[(2, 1), (1, 2), (2, 2)]);
        // The mlp's three blocks (two hidden layers, the output layer) are one per stage at
        // pp 3; at tp 2 × pp 2 the first stage holds one, the second two.
        let mlp = spec("mlp");
        let (pp3, tp2pp2) = (Mesh::new(2, 1, 3), Mesh::new(1, 2, 2));
        // A last stage at pp 3 (rank 5) reads the two tp shards of the saved second stage, a
        // first stage (rank 0) those of the first.
        assert_eq!(sources(&mlp, tp2pp2, pp3, 5), [2, 3]);
        assert_eq!(sources(&mlp, tp2pp2, pp3, 0), [0, 1]);
        // The other way, the second stage reads saved stages 2 and 3, whose shards replicas 1
        // and 0 wrote (the positions take turns).
        assert_eq!(sources(&mlp, pp3, tp2pp2, 2), [3, 4]);
        // One process reads them all.
        assert_eq!(sources(&mlp, tp2pp2, Mesh::new(1, 1, 1), 0), [0, 1, 2, 3]);
        round_trips::<Mlp, MlpStage>(&spec("mlp"), &[(1, 2), (1, 3)]);
    }
}
