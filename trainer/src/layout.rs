//! Where each parameter of the whole model lives at a layout: which pipeline stage holds a
//! block, how a parameter is split over the tensor-parallel group, and its whole-model name.
//!
//! [`BLOCK_SPLITS`] is the one table of tensor-parallel splits: the model cuts a block's
//! share by it, and export and reshard join and cut checkpoint shards by it, so the three can
//! never disagree. Everything here is plain data and index arithmetic, with no tensors.

use gantry_core::{Coords, JobSpec, Mesh, ModelKind};

/// How a parameter is split over the tensor-parallel group: not at all, or along `dim`, in
/// `parts` equal parts (3 for the fused QKV projection) of which each rank holds a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Replicated,
    Along { dim: usize, parts: usize },
}

/// The tensor-parallel split of a transformer block's parameters, Megatron-style, by the
/// parameter's path inside the block (whole-model names; burn's `Linear` weights are
/// `[in, out]`): column-parallel `qkv` (fused, so split in each of its three parts) and `fc`,
/// row-parallel `proj` and `fc_out`. A row-parallel layer's bias is added once, after the sum
/// of the partial outputs, so it is replicated, as are the layer norms and everything not
/// listed here.
pub const BLOCK_SPLITS: &[(&str, Split)] = &[
    ("qkv.weight", Split::Along { dim: 1, parts: 3 }),
    ("qkv.bias", Split::Along { dim: 0, parts: 3 }),
    ("fc.weight", Split::Along { dim: 1, parts: 1 }),
    ("fc.bias", Split::Along { dim: 0, parts: 1 }),
    ("proj.weight", Split::Along { dim: 0, parts: 1 }),
    ("fc_out.weight", Split::Along { dim: 0, parts: 1 }),
    // The llama's layer: column-parallel q/k/v (by query and key/value heads) and gate/up,
    // row-parallel o and down; no biases.
    ("q_proj.weight", Split::Along { dim: 1, parts: 1 }),
    ("k_proj.weight", Split::Along { dim: 1, parts: 1 }),
    ("v_proj.weight", Split::Along { dim: 1, parts: 1 }),
    ("gate_proj.weight", Split::Along { dim: 1, parts: 1 }),
    ("up_proj.weight", Split::Along { dim: 1, parts: 1 }),
    ("o_proj.weight", Split::Along { dim: 0, parts: 1 }),
    ("down_proj.weight", Split::Along { dim: 0, parts: 1 }),
    // The bert's layer: column-parallel query/key/value (by heads) and intermediate, with their
    // biases; row-parallel attention_output and output, whose biases are kept beside them
    // (`attention_output_bias`, `output_bias`) and so replicated.
    ("query.weight", Split::Along { dim: 1, parts: 1 }),
    ("query.bias", Split::Along { dim: 0, parts: 1 }),
    ("key.weight", Split::Along { dim: 1, parts: 1 }),
    ("key.bias", Split::Along { dim: 0, parts: 1 }),
    ("value.weight", Split::Along { dim: 1, parts: 1 }),
    ("value.bias", Split::Along { dim: 0, parts: 1 }),
    ("intermediate.weight", Split::Along { dim: 1, parts: 1 }),
    ("intermediate.bias", Split::Along { dim: 0, parts: 1 }),
    ("attention_output.weight", Split::Along { dim: 0, parts: 1 }),
    ("output.weight", Split::Along { dim: 0, parts: 1 }),
];

/// How a block's parameter `field` is split over `tp` ranks.
pub fn block_split(field: &str, tp: u32) -> Split {
    if tp == 1 {
        return Split::Replicated;
    }
    BLOCK_SPLITS
        .iter()
        .find(|(name, _)| *name == field)
        .map_or(Split::Replicated, |(_, split)| *split)
}

/// Whether a llama's key/value projections are replicated over the tensor-parallel group rather
/// than split: when it has fewer key/value heads than `tp` ranks, every rank keeps them whole and
/// reads the one head its query heads need (Megatron replicates them too); their gradients,
/// partial on each rank, are summed over the group.
pub fn kv_replicated(spec: &JobSpec, tp: u32) -> bool {
    spec.model.kind == ModelKind::Llama && spec.model.kv_heads() < tp
}

/// How a block's parameter `field` of the spec's model is split over `tp` ranks: as
/// [`BLOCK_SPLITS`] says, except replicated key/value projections ([`kv_replicated`]).
pub fn split_of(spec: &JobSpec, field: &str, tp: u32) -> Split {
    if kv_replicated(spec, tp) && matches!(field, "k_proj.weight" | "v_proj.weight") {
        return Split::Replicated;
    }
    block_split(field, tp)
}

/// How many blocks a model's pipeline stages split among them: the gpt's transformer blocks,
/// the llama's decoder layers, the bert's encoder layers, the mlp's hidden layers and its output layer. (The gpt's embeddings go with the first
/// stage, its final norm and head with the last.)
pub fn pipeline_blocks(spec: &JobSpec) -> usize {
    match spec.model.kind {
        ModelKind::Gpt | ModelKind::Llama | ModelKind::Bert => spec.model.layers as usize,
        ModelKind::Mlp => spec.model.layers as usize + 1,
    }
}

/// Blocks `[start, end)` of `blocks` that stage `stage` of `stages` holds: balanced by count.
pub fn stage_blocks(blocks: usize, stage: usize, stages: usize) -> std::ops::Range<usize> {
    (stage * blocks / stages)..((stage + 1) * blocks / stages)
}

/// The whole model's name of a stage's parameter `local`, and how it is split.
pub fn whole_name(spec: &JobSpec, mesh: Mesh, at: Coords, local: &str) -> (String, Split) {
    let list = match spec.model.kind {
        ModelKind::Gpt => "blocks.",
        ModelKind::Mlp | ModelKind::Llama | ModelKind::Bert => "layers.",
    };
    let Some(rest) = local.strip_prefix(list) else {
        return (local.to_string(), Split::Replicated);
    };
    let (index, field) = rest
        .split_once('.')
        .expect("a block's parameter has a field");
    let offset = stage_blocks(pipeline_blocks(spec), at.pp as usize, mesh.pp as usize).start;
    let index = index.parse::<usize>().expect("block index") + offset;
    // A stage's block keeps its row-parallel biases beside the layers (`ShardedBlock`).
    let field = match field {
        "proj_bias" => "proj.bias",
        "fc_out_bias" => "fc_out.bias",
        f => f,
    };
    (
        format!("{list}{index}.{field}"),
        split_of(spec, field, mesh.tp),
    )
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
pub fn join_slices<T: Copy>(
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
pub fn slice_of<T: Copy>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_then_joining_gives_the_whole_back() {
        // A [2, 12] tensor split along dim 1 in 3 parts over 2 ranks, as a fused qkv weight.
        let whole: Vec<u32> = (0..24).collect();
        let shape = [2, 12];
        let slices: Vec<Vec<u32>> = (0..2)
            .map(|r| slice_of(&whole, &shape, 1, 3, r, 2, 1))
            .collect();
        // Rank 0 holds the first half of each of q, k and v in every row.
        assert_eq!(slices[0], [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21]);
        let views: Vec<&[u32]> = slices.iter().map(|s| &s[..]).collect();
        assert_eq!(join_slices(&views, &[2, 6], 1, 3, 1), whole);
    }

    #[test]
    fn only_listed_block_parameters_split_and_none_at_tp_1() {
        assert_eq!(
            block_split("qkv.weight", 2),
            Split::Along { dim: 1, parts: 3 }
        );
        assert_eq!(block_split("proj.bias", 2), Split::Replicated);
        assert_eq!(block_split("ln1.gamma", 2), Split::Replicated);
        assert_eq!(block_split("qkv.weight", 1), Split::Replicated);
    }
}
