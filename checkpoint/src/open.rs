//! Opening a store from a URL: one place for file, S3, Azure and GCS and their options, and
//! what counts as damage on each.

use crate::error::refused;
use crate::{CheckpointError, CheckpointStore, Options};
use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;

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
        let options = gantry_core::store_options::for_url(&spec.url, worker, &spec.options);
        Self::open_with(&spec.url, job_id, &options)
    }

    /// [`open`](Self::open) with options for the store's client, by object_store's
    /// configuration keys, over those from the environment.
    pub fn open_with(url: &str, job_id: &str, options: &Options) -> Result<Self, CheckpointError> {
        let parsed =
            url::Url::parse(url).map_err(|e| CheckpointError::Url(url.into(), e.to_string()))?;
        if parsed.scheme() == "file" {
            // The local store needs its root to exist.
            std::fs::create_dir_all(parsed.path())
                .map_err(|e| CheckpointError::Url(url.into(), e.to_string()))?;
        }
        let (store, prefix) = open_url(url, options)?;
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
            CheckpointError::Partial { .. }
            | CheckpointError::Corrupt { .. }
            | CheckpointError::Json(_) => true,
            CheckpointError::Store(e) => self.local && !refused(e),
            _ => false,
        }
    }
}

/// The object store of `url` and the path `url` names in it: `file://` is the local filesystem
/// (durable puts: each file synced before its put returns); `s3://`, `az://` and `gs://` take
/// their credentials, regions and endpoints from each cloud's usual environment variables, then
/// `options` (object_store's configuration keys) over them. Creates nothing.
pub fn open_url(
    url: &str,
    options: &Options,
) -> Result<(Arc<dyn ObjectStore>, Path), CheckpointError> {
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
            Arc::new(store) as Arc<dyn ObjectStore>
        }};
    }
    let store: Arc<dyn ObjectStore> = match parsed.scheme() {
        "file" if !options.is_empty() => {
            return Err(bad("a file:// store takes no options".into()));
        }
        // Durable like an object store's put: a file is synced before its put returns, and its
        // directory after the rename, so a committed manifest never names shards that a power
        // loss could tear (and retention never deletes the last good checkpoint in favour of
        // one that is not yet on disk).
        "file" => Arc::new(object_store::local::LocalFileSystem::new().with_fsync(true)),
        "s3" => cloud!(object_store::aws::AmazonS3Builder),
        // az://container/prefix (also abfs[s]:// and azure://): AZURE_STORAGE_ACCOUNT_NAME with
        // AZURE_STORAGE_ACCOUNT_KEY, a SAS token or workload identity; Azurite with
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
    Ok((store, prefix))
}
