//! The checkpoint format: the manifest written last, what each rank writes beside its shard,
//! the format versions this build reads, and which rank of a layout writes each shard.

use gantry_core::{Attempt, JobId, Rank};
use serde::{Deserialize, Serialize};

/// What a step directory holds, as `gantry checkpoints` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepListing {
    pub step: u64,
    pub bytes: u64,
    /// "committed" (manifest and every checksum verify), "partial" (no manifest: torn or still
    /// being written) or "corrupt" (a file is missing or fails its checksum).
    pub state: &'static str,
    pub attempt: Option<Attempt>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// CRC-32C of the contents (hardware-accelerated; the checksum S3 itself offers).
    pub crc32c: u32,
}

/// Written by each rank next to its shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankState {
    pub rank: Rank,
    pub step: u64,
    /// The next training step to run; the data order is a pure function of it and the seed.
    pub data_cursor: u64,
    /// The training and validation loss last reported before this checkpoint, so a resumed run
    /// reports where it stands even when it has no step left to run.
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    /// fp16 training's loss scale at this step (absent otherwise, and in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
    pub files: Vec<FileEntry>,
}

/// The state of fp16 training's dynamic loss scaling, so a resumed run goes on with the scale
/// it had rather than starting the search again (PyTorch saves its `GradScaler` state alike).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u32,
    /// Steps skipped so far because a gradient overflowed.
    pub skipped_steps: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub job_id: JobId,
    pub step: u64,
    pub attempt: Attempt,
    pub world_size: u32,
    pub dp: u32,
    pub tp: u32,
    pub pp: u32,
    pub files: Vec<FileEntry>,
    pub total_bytes: u64,
    /// SHA-256 of the manifest of the dataset the job trains on (a `dataset:` source): a job
    /// does not resume on a dataset that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_sha256: Option<String>,
}

/// The format of the checkpoints this build writes. 3: one data-parallel replica writes each
/// position's shard ([`writes_shard`]); 2 (still read): every rank did.
pub const FORMAT: u32 = 3;

/// Whether the rank at `at` of layout `mesh` writes its shard of a checkpoint. Data-parallel
/// replicas hold the same state bit for bit, so each position of the model (a pipeline stage's
/// tensor-parallel slice) is written once, not once per replica: a checkpoint at dp = N is not
/// N copies of the model (DDP jobs save on rank 0; PyTorch DCP keeps one copy of a replicated
/// tensor). The positions take turns over the replicas, so the uploads of a 3-D job spread
/// over the replicas' workers instead of all landing on the first's.
pub fn writes_shard(mesh: gantry_core::Mesh, at: gantry_core::Coords) -> bool {
    at.dp == writing_replica(mesh, at)
}

/// The data-parallel replica that writes the shard of position `at`.
fn writing_replica(mesh: gantry_core::Mesh, at: gantry_core::Coords) -> u32 {
    (at.pp * mesh.tp + at.tp) % mesh.dp
}

impl Manifest {
    /// A manifest from its stored bytes: well-formed JSON of the right shape, and free of the
    /// flaws [`Manifest::flaw`] looks for. The error says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("manifest.json: {e}"))?;
        match manifest.flaw() {
            Some(flaw) => Err(flaw),
            None => Ok(manifest),
        }
    }

    /// The ranks whose shards the checkpoint holds: one per position ([`writes_shard`]), or,
    /// in format 2, every rank.
    pub fn writers(&self) -> Vec<u32> {
        let mesh = self.mesh();
        (0..self.world_size)
            .filter(|&r| self.format < 3 || writes_shard(mesh, mesh.coords(r)))
            .collect()
    }

    /// The rank whose shard holds the state of position `at` of the checkpoint's layout (its
    /// data-parallel coordinate aside): the writer's (in format 2, that rank wrote one too).
    pub fn holder(&self, at: gantry_core::Coords) -> Rank {
        let mesh = self.mesh();
        let dp = writing_replica(mesh, at);
        Rank(mesh.rank(gantry_core::Coords { dp, ..at }))
    }

    /// The layout the checkpoint was written at (a manifest that passed
    /// [`CheckpointStore::committed`] has a valid one).
    pub fn mesh(&self) -> gantry_core::Mesh {
        gantry_core::Mesh::new(self.dp, self.tp, self.pp)
    }

    /// What is wrong with the manifest's own fields, if anything.
    pub(crate) fn flaw(&self) -> Option<String> {
        let (dp, tp, pp) = (self.dp, self.tp, self.pp);
        if !(2..=FORMAT).contains(&self.format) {
            return Some(format!(
                "manifest format {} is not one this build reads (2 to {FORMAT})",
                self.format
            ));
        }
        let world = u64::from(dp) * u64::from(tp) * u64::from(pp);
        (dp == 0 || tp == 0 || pp == 0 || world != u64::from(self.world_size)).then(|| {
            format!(
                "manifest layout dp={dp} tp={tp} pp={pp} does not make its world of {}",
                self.world_size
            )
        })
    }
}
