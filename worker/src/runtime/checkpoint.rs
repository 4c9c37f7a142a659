//! Sharded checkpoints on any `object_store` URL.
//!
//! Layout under `{url}/{job}/`:
//! - `step-{N:08}/rank-{r}.model.bpk`, `rank-{r}.optim.bpk` (burnpack records, bit-exact),
//!   `rank-{r}.state.json` (step, data cursor, CRC-32C checksums of the rank's other files),
//!   for one rank `r` of each position, since data-parallel replicas hold the same state
//!   ([`writes_shard`]);
//! - `step-{N:08}/manifest.json`, written last by rank 0 with a conditional put (`Create`):
//!   a step directory without a manifest is partial and never resumed from;
//! - `latest`: the newest committed step; it never moves backwards;
//! - `fence`: the newest attempt that started; a commit from an older attempt is refused.

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint url {0:?}: {1}")]
    Url(String, String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("checkpoint at step {step}: {message}")]
    Invalid { step: u64, message: String },
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("attempt {attempt} may not commit step {step}: attempt {fence} has started since")]
    Stale { attempt: u64, fence: u64, step: u64 },
}

/// What a step directory holds, as `gantry checkpoints` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepListing {
    pub step: u64,
    pub bytes: u64,
    /// "committed" (manifest and every checksum verify), "partial" (no manifest: torn or still
    /// being written) or "corrupt" (a file is missing or fails its checksum).
    pub state: &'static str,
    pub attempt: Option<u64>,
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
    pub rank: u32,
    pub step: u64,
    /// The next training step to run; the data order is a pure function of it and the seed.
    pub data_cursor: u64,
    /// The training and validation loss last reported before this checkpoint, so a resumed run
    /// reports where it stands even when it has no step left to run.
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub job_id: String,
    pub step: u64,
    pub attempt: u64,
    pub world_size: u32,
    pub dp: u32,
    pub tp: u32,
    pub pp: u32,
    pub files: Vec<FileEntry>,
    pub total_bytes: u64,
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
    pub fn holder(&self, at: gantry_core::Coords) -> u32 {
        let mesh = self.mesh();
        let dp = writing_replica(mesh, at);
        mesh.rank(gantry_core::Coords { dp, ..at })
    }

    /// The layout the checkpoint was written at (a manifest that passed
    /// [`CheckpointStore::committed`] has a valid one).
    pub fn mesh(&self) -> gantry_core::Mesh {
        gantry_core::Mesh::new(self.dp, self.tp, self.pp)
    }

    /// What is wrong with the manifest's own fields, if anything.
    fn flaw(&self) -> Option<String> {
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

/// Files above this size are uploaded in parts of this size.
const MULTIPART_BYTES: usize = 16 << 20;

/// One rank's restorable state. The records are shared buffers, so handing them to the store
/// copies nothing.
#[derive(Clone)]
pub struct Shard {
    pub model: bytes::Bytes,
    pub optimizer: bytes::Bytes,
    pub data_cursor: u64,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
}

#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    /// `{url path}/{job}`
    root: Path,
    url: String,
    job_id: String,
    options: Options,
    /// A `file://` store.
    local: bool,
}

/// Options for a store's client, by object_store's configuration key.
pub type Options = std::collections::BTreeMap<String, String>;

/// A burn record's buffer as a shard's, without a copy.
pub fn shared(record: burn::tensor::Bytes) -> bytes::Bytes {
    struct Record(burn::tensor::Bytes);
    impl AsRef<[u8]> for Record {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    bytes::Bytes::from_owner(Record(record))
}

/// A shard's buffer as a burn record's (aligned as burnpack's reader wants it).
pub fn record(bytes: bytes::Bytes) -> burn::tensor::Bytes {
    burn::tensor::Bytes::from_bytes_vec(Vec::from(bytes))
}

/// Whether the store refused this reader access: the store said so, or the local filesystem
/// did (an I/O error of kind `PermissionDenied` anywhere in the chain of sources).
fn refused(error: &object_store::Error) -> bool {
    if matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

impl CheckpointStore {
    /// Opens `{url}/{job_id}`. `file://` is the local filesystem; `s3://`, `az://` and `gs://`
    /// take their credentials, regions and endpoints from each cloud's usual environment
    /// variables (never from the spec, so no secret reaches the coordinator's database or the
    /// logs).
    pub fn open(url: &str, job_id: &str) -> Result<Self, CheckpointError> {
        Self::open_with(url, job_id, &Options::new())
    }

    /// The store of a job's checkpoints: `checkpoint.url` with the worker's store `options` that
    /// apply to it, then the spec's own (`checkpoint.options`) over them.
    pub fn for_job(
        spec: &gantry_core::spec::CheckpointSpec,
        job_id: &str,
        worker: &Options,
    ) -> Result<Self, CheckpointError> {
        let scheme = url::Url::parse(&spec.url).map_or(String::new(), |u| u.scheme().into());
        let mut options: Options = worker
            .iter()
            .filter(|(k, _)| gantry_core::store_options::applies(&scheme, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        options.extend(spec.options.clone());
        Self::open_with(&spec.url, job_id, &options)
    }

    /// [`open`](Self::open) with options for the store's client, by object_store's
    /// configuration keys, over those from the environment.
    pub fn open_with(url: &str, job_id: &str, options: &Options) -> Result<Self, CheckpointError> {
        let bad = |e: String| CheckpointError::Url(url.into(), e);
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let prefix = Path::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()))?;
        // A cloud store: its builder from the environment, then `options` over it.
        macro_rules! cloud {
            ($builder:ty) => {{
                let mut builder = <$builder>::from_env().with_url(url);
                for (k, v) in options {
                    let key = k
                        .parse()
                        .map_err(|e| bad(format!("store option {k}: {e}")))?;
                    builder = builder.with_config(key, v);
                }
                let store = builder.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store) as Arc<dyn ObjectStore>, prefix)
            }};
        }
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "file" if !options.is_empty() => {
                return Err(bad("a file:// store takes no options".into()));
            }
            "file" => {
                // The local store needs its root to exist.
                std::fs::create_dir_all(parsed.path()).map_err(|e| bad(e.to_string()))?;
                // Durable like an object store's put: a file is synced before its put returns,
                // and its directory after the rename, so a committed manifest never names
                // shards that a power loss could tear (and retention never deletes the last
                // good checkpoint in favour of one that is not yet on disk).
                let store = object_store::local::LocalFileSystem::new().with_fsync(true);
                (Arc::new(store), prefix)
            }
            "s3" => cloud!(object_store::aws::AmazonS3Builder),
            // az://container/prefix (also abfs[s]:// and azure://): AZURE_STORAGE_ACCOUNT_NAME
            // with AZURE_STORAGE_ACCOUNT_KEY, a SAS token or workload identity; Azurite with
            // AZURE_STORAGE_USE_EMULATOR=true (and AZURITE_BLOB_STORAGE_URL).
            "az" | "abfs" | "abfss" | "azure" => cloud!(object_store::azure::MicrosoftAzureBuilder),
            // gs://bucket/prefix: GOOGLE_SERVICE_ACCOUNT (a key file), or application default
            // credentials (GOOGLE_APPLICATION_CREDENTIALS, or the metadata server on GCE/GKE).
            "gs" => cloud!(object_store::gcp::GoogleCloudStorageBuilder),
            other => {
                return Err(bad(format!(
                    "scheme {other:?} is not supported; {}",
                    gantry_core::CHECKPOINT_SCHEMES_HINT
                )));
            }
        };
        Ok(Self {
            store,
            root: prefix.join(job_id),
            url: url.trim_end_matches('/').to_string(),
            job_id: job_id.to_string(),
            options: options.clone(),
            local: parsed.scheme() == "file",
        })
    }

    /// The same store with a client of its own. An HTTP client's pooled connections belong to
    /// the Tokio runtime that opened them and only move while it runs: a thread with its own
    /// runtime (an upload) must not share a client with another, or a request can wait on a
    /// connection nobody drives (a rank's uploads to Azurite hung like that).
    pub fn reopen(&self) -> Result<Self, CheckpointError> {
        Self::open_with(&self.url, &self.job_id, &self.options)
    }

    /// Whether `error`, met reading a checkpoint of this store, says the checkpoint is damaged:
    /// torn (no manifest, a file missing or short) or corrupt (a checksum, or a manifest that
    /// does not parse), which a resume skips for the checkpoint before. On the local
    /// filesystem, a path that cannot be read as a file (a file where a directory belongs, a
    /// loop, an I/O error) is damage too: no retry will change it. Access refused (file
    /// permissions, credentials) never is: it says who reads, not what was written, and
    /// falling back would silently drop the training since the checkpoint it cannot read. On
    /// a network store, any other error is the store's (unreachable, throttled) and says
    /// nothing about the checkpoint either: a resume must not fall back to an older one over it.
    pub fn is_damage(&self, error: &CheckpointError) -> bool {
        match error {
            CheckpointError::Invalid { .. } | CheckpointError::Json(_) => true,
            CheckpointError::Store(e) => self.local && !refused(e),
            _ => false,
        }
    }

    fn step_dir(&self, step: u64) -> Path {
        self.root.clone().join(format!("step-{step:08}"))
    }

    /// The URL of a step's directory, for people.
    pub fn step_url(&self, step: u64) -> String {
        let job = self.root.filename().unwrap_or_default();
        format!("{}/{job}/step-{step:08}", self.url)
    }

    async fn put_file(
        &self,
        dir: &Path,
        name: String,
        bytes: bytes::Bytes,
    ) -> Result<FileEntry, CheckpointError> {
        let entry = FileEntry {
            crc32c: checksum(&bytes),
            size: bytes.len() as u64,
            path: name.clone(),
        };
        let path = dir.clone().join(name.as_str());
        if bytes.len() > MULTIPART_BYTES && !self.local {
            // Large shards go up in parts (S3 caps single puts at 5 GiB and retries whole
            // puts). The parts are slices of the shard, not copies. A local file gains nothing
            // from parts: the local store writes them one after another into one file.
            let upload = self.store.put_multipart(&path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_BYTES);
            writer.put(bytes);
            writer.finish().await?;
        } else {
            self.store.put(&path, PutPayload::from(bytes)).await?;
        }
        Ok(entry)
    }

    /// Writes this rank's shard of `step`, unless `step` is already committed: a run resumed
    /// from an earlier step (`resume --from-step`) passes committed steps again, and their files
    /// must not change under their manifest (its commit then keeps the first).
    pub async fn write_shard(
        &self,
        step: u64,
        rank: u32,
        shard: Shard,
    ) -> Result<(), CheckpointError> {
        let dir = self.step_dir(step);
        if self
            .store
            .head(&dir.clone().join("manifest.json"))
            .await
            .is_ok()
        {
            tracing::info!(
                step,
                rank,
                "step already committed; its files stay as they are"
            );
            return Ok(());
        }
        let files = vec![
            self.put_file(&dir, format!("rank-{rank}.model.bpk"), shard.model)
                .await?,
            self.put_file(&dir, format!("rank-{rank}.optim.bpk"), shard.optimizer)
                .await?,
        ];
        let state = RankState {
            rank,
            step,
            data_cursor: shard.data_cursor,
            loss: shard.loss,
            eval_loss: shard.eval_loss,
            files,
        };
        self.put_file(
            &dir,
            format!("rank-{rank}.state.json"),
            serde_json::to_vec(&state)?.into(),
        )
        .await?;
        Ok(())
    }

    async fn read_number(&self, name: &str) -> Result<Option<u64>, CheckpointError> {
        match self.store.get(&self.root.clone().join(name)).await {
            Ok(r) => Ok(String::from_utf8_lossy(&r.bytes().await?)
                .trim()
                .parse::<u64>()
                .ok()),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records that `attempt` has started: from now on, older attempts may not commit. Called
    /// by rank 0 of every attempt before it trains; the fence only moves forwards.
    pub async fn fence(&self, attempt: u64) -> Result<(), CheckpointError> {
        if self.read_number("fence").await?.is_none_or(|f| f < attempt) {
            self.store
                .put(
                    &self.root.clone().join("fence"),
                    PutPayload::from(format!("{attempt}\n").into_bytes()),
                )
                .await?;
        }
        Ok(())
    }

    /// Commits `step` once every writer's shard is written (the caller has passed a barrier):
    /// the manifest with every file's checksum, then the `latest` pointer, then retention.
    /// Returns the checkpoint's total size and the steps retention deleted. An attempt older
    /// than the fence is refused ([`CheckpointError::Stale`]).
    pub async fn commit(
        &self,
        manifest_base: Manifest,
        keep_last: u32,
    ) -> Result<(u64, Vec<u64>), CheckpointError> {
        let step = manifest_base.step;
        if let Some(fence) = self.read_number("fence").await?
            && fence > manifest_base.attempt
        {
            return Err(CheckpointError::Stale {
                attempt: manifest_base.attempt,
                fence,
                step,
            });
        }
        let dir = self.step_dir(step);
        let mut files = Vec::new();
        for rank in manifest_base.writers() {
            let name = format!("rank-{rank}.state.json");
            let bytes = self
                .store
                .get(&dir.clone().join(name.as_str()))
                .await?
                .bytes()
                .await?;
            let state: RankState = serde_json::from_slice(&bytes)?;
            files.extend(state.files);
            files.push(FileEntry {
                path: name,
                size: bytes.len() as u64,
                crc32c: checksum(&bytes),
            });
        }
        let total_bytes = files.iter().map(|f| f.size).sum();
        let manifest = Manifest {
            files,
            total_bytes,
            ..manifest_base
        };
        let put = self
            .store
            .put_opts(
                &dir.clone().join("manifest.json"),
                PutPayload::from(serde_json::to_vec_pretty(&manifest)?),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => {}
            // Already committed (e.g. by an attempt that died before reporting): keep the first.
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.verify(step).await?;
            }
            Err(e) => return Err(e.into()),
        }
        self.advance_latest(step).await?;
        let deleted = self.retain(keep_last).await?;
        Ok((total_bytes, deleted))
    }

    /// The step `latest` points at.
    pub async fn latest(&self) -> Result<Option<u64>, CheckpointError> {
        self.read_number("latest").await
    }

    async fn advance_latest(&self, step: u64) -> Result<(), CheckpointError> {
        let latest = self.root.clone().join("latest");
        if self.latest().await?.is_none_or(|c| c < step) {
            self.store
                .put(&latest, PutPayload::from(format!("{step}\n").into_bytes()))
                .await?;
        }
        Ok(())
    }

    /// Steps that hold at least one object, newest first. (Listing objects rather than
    /// "directories": a local store keeps empty directories after retention deletes.)
    pub async fn steps(&self) -> Result<Vec<u64>, CheckpointError> {
        use futures_util::TryStreamExt;
        let objects: Vec<_> = self.store.list(Some(&self.root)).try_collect().await?;
        let mut steps: Vec<u64> = objects
            .iter()
            .filter_map(|meta| {
                let mut parts = meta.location.prefix_match(&self.root)?;
                parts.next()?.as_ref().strip_prefix("step-")?.parse().ok()
            })
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        steps.dedup();
        Ok(steps)
    }

    /// The manifest of committed step `step`, with every file it names present at its recorded
    /// size: a check of metadata only. Whoever reads a file checks its contents
    /// ([`read_verified_shard`](Self::read_verified_shard)), so resuming reads a checkpoint once.
    pub async fn committed(&self, step: u64) -> Result<Manifest, CheckpointError> {
        self.committed_in(step, &self.objects_of(step).await?).await
    }

    /// The objects in step `step`'s directory.
    async fn objects_of(
        &self,
        step: u64,
    ) -> Result<Vec<object_store::ObjectMeta>, CheckpointError> {
        use futures_util::TryStreamExt;
        Ok(self
            .store
            .list(Some(&self.step_dir(step)))
            .try_collect()
            .await?)
    }

    /// [`committed`](Self::committed), given the step directory's `objects`.
    async fn committed_in(
        &self,
        step: u64,
        objects: &[object_store::ObjectMeta],
    ) -> Result<Manifest, CheckpointError> {
        let invalid = |message: String| CheckpointError::Invalid { step, message };
        let dir = self.step_dir(step);
        let manifest: Manifest = match self.store.get(&dir.clone().join("manifest.json")).await {
            Ok(r) => serde_json::from_slice(&r.bytes().await?)?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(invalid("no manifest (partial checkpoint)".into()));
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(flaw) = manifest.flaw() {
            return Err(invalid(flaw));
        }
        for file in &manifest.files {
            let path = dir.clone().join(file.path.as_str());
            match objects.iter().find(|o| o.location == path) {
                None => return Err(invalid(format!("{} is missing", file.path))),
                Some(o) if o.size != file.size => {
                    return Err(invalid(format!(
                        "{} has {} bytes, not {}",
                        file.path, o.size, file.size
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(manifest)
    }

    /// Reads file `name` of `manifest`'s step and checks it against the manifest.
    async fn read_verified(
        &self,
        manifest: &Manifest,
        name: &str,
    ) -> Result<bytes::Bytes, CheckpointError> {
        let step = manifest.step;
        let invalid = |message: String| CheckpointError::Invalid { step, message };
        let entry = manifest
            .files
            .iter()
            .find(|f| f.path == name)
            .ok_or_else(|| invalid(format!("{name} is not in the manifest")))?;
        let bytes = match self.store.get(&self.step_dir(step).join(name)).await {
            Ok(found) => found.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(invalid(format!("{name} is missing")));
            }
            Err(e) => return Err(e.into()),
        };
        if bytes.len() as u64 != entry.size || checksum(&bytes) != entry.crc32c {
            return Err(invalid(format!("{name} does not match its checksum")));
        }
        Ok(bytes)
    }

    /// Verifies every file of step `step` against its checksum: the manifest of a checkpoint
    /// that is whole.
    pub async fn verify(&self, step: u64) -> Result<Manifest, CheckpointError> {
        self.read_every_file(self.committed(step).await?).await
    }

    async fn read_every_file(&self, manifest: Manifest) -> Result<Manifest, CheckpointError> {
        for file in &manifest.files {
            self.read_verified(&manifest, &file.path).await?;
        }
        Ok(manifest)
    }

    /// Every step directory, newest first, with its size and state: from the manifest and the
    /// files' sizes, or with every byte checked against its checksum when `verify`.
    pub async fn list(&self, verify: bool) -> Result<Vec<StepListing>, CheckpointError> {
        let mut out = Vec::new();
        for step in self.steps().await? {
            let objects = self.objects_of(step).await?;
            let bytes = objects.iter().map(|o| o.size).sum();
            let checked = match self.committed_in(step, &objects).await {
                Ok(manifest) if verify => self.read_every_file(manifest).await,
                checked => checked,
            };
            let (state, attempt, detail) = match checked {
                Ok(m) => ("committed", Some(m.attempt), None),
                Err(CheckpointError::Invalid { message, .. })
                    if message.starts_with("no manifest") =>
                {
                    ("partial", None, Some(message))
                }
                Err(CheckpointError::Invalid { message, .. }) => ("corrupt", None, Some(message)),
                Err(e) => return Err(e),
            };
            out.push(StepListing {
                step,
                bytes,
                state,
                attempt,
                detail,
            });
        }
        Ok(out)
    }

    /// Reads one rank's shard of a committed checkpoint, checking every byte of it against the
    /// manifest: a damaged shard is [`CheckpointError::Invalid`].
    pub async fn read_verified_shard(
        &self,
        manifest: &Manifest,
        rank: u32,
    ) -> Result<Shard, CheckpointError> {
        let state = self
            .read_verified(manifest, &format!("rank-{rank}.state.json"))
            .await?;
        let state: RankState = serde_json::from_slice(&state)?;
        Ok(Shard {
            model: self
                .read_verified(manifest, &format!("rank-{rank}.model.bpk"))
                .await?,
            optimizer: self
                .read_verified(manifest, &format!("rank-{rank}.optim.bpk"))
                .await?,
            data_cursor: state.data_cursor,
            loss: state.loss,
            eval_loss: state.eval_loss,
        })
    }

    /// Deletes committed checkpoints beyond the newest `keep_last`, and partial ones older
    /// than the newest committed one.
    async fn retain(&self, keep_last: u32) -> Result<Vec<u64>, CheckpointError> {
        let steps = self.steps().await?;
        let mut deleted = Vec::new();
        let mut committed = 0u32;
        let mut newest_committed: Option<u64> = None;
        for step in steps {
            let has_manifest = self
                .store
                .head(&self.step_dir(step).join("manifest.json"))
                .await
                .is_ok();
            let keep = if has_manifest {
                committed += 1;
                newest_committed.get_or_insert(step);
                committed <= keep_last
            } else {
                newest_committed.is_none_or(|newest| step > newest)
            };
            if !keep {
                let dir = self.step_dir(step);
                let objects: Vec<_> = {
                    use futures_util::TryStreamExt;
                    self.store.list(Some(&dir)).try_collect().await?
                };
                for meta in objects {
                    self.store.delete(&meta.location).await?;
                }
                deleted.push(step);
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_is_configured_from_its_url() {
        // GCS: configured, not reached (no emulator works offline); credentials are looked up
        // on first use, so opening needs none.
        let gcs = CheckpointStore::open("gs://gantry-ckpt/runs", "job-1").unwrap();
        assert_eq!(gcs.step_url(7), "gs://gantry-ckpt/runs/job-1/step-00000007");
        assert_eq!(gcs.root.as_ref(), "runs/job-1");
        let s3 = CheckpointStore::open("s3://bucket/a/b", "j").unwrap();
        assert_eq!(s3.root.as_ref(), "a/b/j");
        assert!(!gcs.local && !s3.local);
        let err = |url: &str| CheckpointStore::open(url, "j").err().unwrap().to_string();
        let ftp = err("ftp://host/path");
        assert!(
            ftp.contains("\"ftp\" is not supported") && ftp.contains("gs://"),
            "{ftp}"
        );
        assert!(err("gs:///no-bucket").contains("gs:///no-bucket"));
        assert!(err("not a url").contains("not a url"));
    }

    /// The newest step whose every file verifies, as a resume over all ranks finds it.
    async fn newest_whole(store: &CheckpointStore) -> u64 {
        for step in store.steps().await.unwrap() {
            if store.verify(step).await.is_ok() {
                return step;
            }
        }
        panic!("no whole checkpoint")
    }

    /// Two ranks at tp = 2, both writers.
    fn manifest(step: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            job_id: "j".into(),
            step,
            attempt: 1,
            world_size: 2,
            dp: 1,
            tp: 2,
            pp: 1,
            files: vec![],
            total_bytes: 0,
        }
    }

    fn shard(rank: u32, step: u64) -> Shard {
        Shard {
            model: vec![rank as u8; 10].into(),
            optimizer: vec![7; 5].into(),
            data_cursor: step,
            loss: Some(0.5),
            eval_loss: None,
        }
    }

    /// Every writer's shard of `manifest`'s step, then the commit.
    async fn save_as(store: &CheckpointStore, manifest: Manifest) -> Result<(), CheckpointError> {
        for rank in manifest.writers() {
            store
                .write_shard(manifest.step, rank, shard(rank, manifest.step))
                .await?;
        }
        store.commit(manifest, 2).await.map(drop)
    }

    async fn save(store: &CheckpointStore, step: u64) {
        save_as(store, manifest(step)).await.unwrap();
    }

    /// One replica writes each position's shard, and the commit asks for no others; a checkpoint every rank wrote (format 2) still commits and reads; a manifest
    /// that cannot be one (a layout that does not make its world, an unknown format) is damage.
    #[tokio::test]
    async fn one_replica_writes_each_shard_and_older_checkpoints_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = CheckpointStore::open(&url, "j").unwrap();
        let names =
            |m: &Manifest| -> Vec<String> { m.files.iter().map(|f| f.path.clone()).collect() };
        let dp2 = Manifest {
            world_size: 4,
            dp: 2,
            ..manifest(40)
        };
        // Two positions (tp slices) at dp = 2: the first replica writes the first slice's
        // shard, the second the second's.
        assert_eq!(dp2.writers(), [0, 3]);
        let at = |r| dp2.mesh().coords(r);
        assert_eq!([0, 1, 2, 3].map(|r| dp2.holder(at(r))), [0, 3, 0, 3]);
        save_as(&store, dp2.clone()).await.unwrap();
        let committed = store.verify(40).await.unwrap();
        assert_eq!(
            names(&committed),
            [0, 3]
                .map(|r| ["model.bpk", "optim.bpk", "state.json"].map(|f| format!("rank-{r}.{f}")))
                .concat()
        );
        assert!(store.read_verified_shard(&committed, 3).await.is_ok());

        let every_rank = Manifest {
            format: 2,
            ..Manifest {
                step: 50,
                ..dp2.clone()
            }
        };
        assert_eq!(every_rank.writers(), [0, 1, 2, 3]);
        save_as(&store, every_rank).await.unwrap();
        let committed = store.verify(50).await.unwrap();
        assert_eq!(committed.files.len(), 12);
        assert!(store.read_verified_shard(&committed, 3).await.is_ok());

        for (step, flawed, why) in [
            (
                60,
                Manifest {
                    dp: 0,
                    ..dp2.clone()
                },
                "does not make its world of 4",
            ),
            (
                70,
                Manifest {
                    tp: 3,
                    ..dp2.clone()
                },
                "does not make its world of 4",
            ),
            (
                80,
                Manifest {
                    format: 9,
                    ..dp2.clone()
                },
                "format 9 is not one this build reads",
            ),
        ] {
            let path = dir.path().join(format!("j/step-{step:08}/manifest.json"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(
                &path,
                serde_json::to_vec(&Manifest { step, ..flawed }).unwrap(),
            )
            .unwrap();
            let err = store.committed(step).await.err().unwrap();
            assert!(
                store.is_damage(&err) && err.to_string().contains(why),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn newest_verified_checkpoint_wins_and_corruption_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = CheckpointStore::open(&url, "j").unwrap();
        for step in [10, 20, 30] {
            save(&store, step).await;
        }
        // keep_last = 2 deleted step 10.
        assert_eq!(store.steps().await.unwrap(), vec![30, 20]);
        assert_eq!(newest_whole(&store).await, 30);
        let shard = store
            .read_verified_shard(&store.verify(30).await.unwrap(), 1)
            .await
            .unwrap();
        assert_eq!(shard.model, vec![1u8; 10]);
        assert_eq!(shard.data_cursor, 30);
        assert_eq!(shard.loss, Some(0.5));

        // A flipped byte keeps the size: the metadata check passes, and only the rank that
        // reads the file finds it damaged. A truncated file fails the metadata check.
        let path = dir.path().join("j/step-00000030/rank-1.optim.bpk");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let manifest = store.committed(30).await.unwrap();
        assert!(store.read_verified_shard(&manifest, 0).await.is_ok());
        let damaged = store.read_verified_shard(&manifest, 1).await.err().unwrap();
        assert!(
            damaged
                .to_string()
                .contains("rank-1.optim.bpk does not match its checksum"),
            "{damaged}"
        );
        assert!(store.is_damage(&damaged));
        // A local file that cannot be opened (a symbolic link to itself in its place) is the
        // checkpoint's damage; the same error from a network store is the store's.
        let model = dir.path().join("j/step-00000030/rank-0.model.bpk");
        let saved = std::fs::read(&model).unwrap();
        std::fs::remove_file(&model).unwrap();
        std::os::unix::fs::symlink(&model, &model).unwrap();
        let unreadable = store.read_verified_shard(&manifest, 0).await.err().unwrap();
        assert!(
            matches!(unreadable, CheckpointError::Store(_)),
            "{unreadable}"
        );
        assert!(store.is_damage(&unreadable));
        // A file this process may not read is not damage, here or anywhere. (Tests run as
        // root, whom no file mode refuses, so the local store's error is built as it makes it:
        // an io::Error as the source of its own.)
        #[derive(Debug, thiserror::Error)]
        #[error("unable to open file")]
        struct Open(#[source] std::io::Error);
        let denied = |source: Box<dyn std::error::Error + Send + Sync>| {
            CheckpointError::Store(object_store::Error::Generic {
                store: "LocalFileSystem",
                source,
            })
        };
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(!store.is_damage(&denied(Box::new(io()))));
        assert!(!store.is_damage(&denied(Box::new(Open(io())))));
        let other = std::io::Error::from(std::io::ErrorKind::InvalidData);
        assert!(store.is_damage(&denied(Box::new(other))));
        let s3 = CheckpointStore::open("s3://bucket/prefix", "j").unwrap();
        assert!(!s3.is_damage(&unreadable));
        assert!(s3.is_damage(&damaged));
        std::fs::remove_file(&model).unwrap();
        let missing = store.read_verified_shard(&manifest, 0).await.err().unwrap();
        assert!(s3.is_damage(&missing), "{missing}");
        std::fs::write(&model, saved).unwrap();
        std::fs::write(&path, &bytes[1..]).unwrap();
        let torn = store.committed(30).await.err().unwrap().to_string();
        assert!(
            torn.contains("rank-1.optim.bpk has 4 bytes, not 5"),
            "{torn}"
        );
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        store.verify(30).await.unwrap();

        // Corrupt a shard of step 30: resume falls back to 20.
        std::fs::write(
            dir.path().join("j/step-00000030/rank-1.model.bpk"),
            b"garbage",
        )
        .unwrap();
        assert_eq!(newest_whole(&store).await, 20);

        // A torn checkpoint (shards, no manifest) is never chosen.
        store
            .write_shard(
                40,
                0,
                Shard {
                    model: vec![1].into(),
                    optimizer: vec![2].into(),
                    data_cursor: 40,
                    loss: None,
                    eval_loss: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(newest_whole(&store).await, 20);

        // `latest` never moves backwards.
        store.advance_latest(5).await.unwrap();
        let latest = std::fs::read_to_string(dir.path().join("j/latest")).unwrap();
        assert_eq!(latest.trim(), "30");

        // The listing tells the three apart. A flipped byte that keeps the size takes reading
        // every byte (`verify`) to see.
        let path = dir.path().join("j/step-00000020/rank-0.model.bpk");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 8;
        std::fs::write(&path, &bytes).unwrap();
        for (verify, step_20) in [(false, "committed"), (true, "corrupt")] {
            let states: Vec<(u64, &str)> = store
                .list(verify)
                .await
                .unwrap()
                .iter()
                .map(|l| (l.step, l.state))
                .collect();
            assert_eq!(
                states,
                [(40, "partial"), (30, "corrupt"), (20, step_20)],
                "verify: {verify}"
            );
        }
    }

    #[tokio::test]
    async fn a_stale_attempt_cannot_commit_and_latest_never_moves_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = CheckpointStore::open(&url, "j").unwrap();
        store.fence(1).await.unwrap();
        save(&store, 20).await;
        // Attempt 1 wrote the shards of step 30, then attempt 2 started (and fenced) before
        // attempt 1 committed: attempt 1's commit is refused, nothing moves.
        for rank in 0..2 {
            let shard = Shard {
                model: vec![9; 4].into(),
                optimizer: vec![9; 4].into(),
                data_cursor: 30,
                loss: None,
                eval_loss: None,
            };
            store.write_shard(30, rank, shard).await.unwrap();
        }
        store.fence(2).await.unwrap();
        store.fence(1).await.unwrap(); // a late fence from attempt 1 does not lower it
        let refused = store.commit(manifest(30), 2).await.unwrap_err();
        assert!(
            matches!(
                refused,
                CheckpointError::Stale {
                    attempt: 1,
                    fence: 2,
                    step: 30
                }
            ),
            "{refused}"
        );
        assert_eq!(store.latest().await.unwrap(), Some(20));
        assert_eq!(newest_whole(&store).await, 20);

        // Attempt 2 commits 30; a commit of an older step later leaves `latest` at 30.
        // (Attempt 2's shards of 30 replace attempt 1's: the step was never committed.)
        let mut m = manifest(30);
        m.attempt = 2;
        store.commit(m, 5).await.unwrap();
        assert_eq!(store.latest().await.unwrap(), Some(30));
        for rank in 0..2 {
            let shard = Shard {
                model: vec![1; 4].into(),
                optimizer: vec![1; 4].into(),
                data_cursor: 25,
                loss: None,
                eval_loss: None,
            };
            store.write_shard(25, rank, shard).await.unwrap();
        }
        let mut m = manifest(25);
        m.attempt = 2;
        store.commit(m, 5).await.unwrap();
        assert_eq!(store.latest().await.unwrap(), Some(30));
        assert_eq!(newest_whole(&store).await, 30);

        // A later attempt passing step 30 again (resumed from 25) leaves its files alone, and
        // its commit keeps the first manifest.
        let before = store
            .read_verified_shard(&store.verify(30).await.unwrap(), 0)
            .await
            .unwrap();
        store.fence(3).await.unwrap();
        for rank in 0..2 {
            let shard = Shard {
                model: vec![3; 4].into(),
                optimizer: vec![3; 4].into(),
                data_cursor: 30,
                loss: None,
                eval_loss: None,
            };
            store.write_shard(30, rank, shard).await.unwrap();
        }
        let mut m = manifest(30);
        m.attempt = 3;
        store.commit(m, 5).await.unwrap();
        let after = store.verify(30).await.unwrap();
        assert_eq!(after.attempt, 2);
        assert_eq!(
            store.read_verified_shard(&after, 0).await.unwrap().model,
            before.model
        );
    }
}
