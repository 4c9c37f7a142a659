//! Reading checkpoints back: which step to resume, manifests checked against the files they
//! name, every byte checked as it is read, and listings for people.

use crate::manifest::RankState;
use crate::{CheckpointError, CheckpointStore, Manifest, Shard, StepListing, checksum};
use gantry_core::Rank;
use object_store::ObjectStoreExt;

impl CheckpointStore {
    /// The step a resume tries first: the one `latest` names, since a commit moves it only
    /// after the step's manifest is in place. `None` when there is no usable pointer (none
    /// written yet, or damaged on a local store): a resume then lists the steps instead.
    pub async fn resume_pointer(&self) -> Result<Option<u64>, CheckpointError> {
        match self.latest().await {
            // A pointer that does not parse is damage, as is one a local store cannot read.
            Err(CheckpointError::Pointer { .. }) => Ok(None),
            Err(CheckpointError::Store(_)) if self.local => Ok(None),
            read => read,
        }
    }

    /// The listed steps older than `step`, newest first.
    pub async fn older_steps(&self, step: u64) -> Result<Vec<u64>, CheckpointError> {
        let mut steps = self.steps().await?;
        steps.retain(|&s| s < step);
        Ok(steps)
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
        let invalid = |message: String| CheckpointError::Corrupt { step, message };
        let dir = self.step_dir(step);
        let manifest: Manifest = match self.store.get(&dir.clone().join("manifest.json")).await {
            Ok(r) => Manifest::parse(&r.bytes().await?).map_err(invalid)?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::Partial { step });
            }
            Err(e) => return Err(e.into()),
        };
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
        let invalid = |message: String| CheckpointError::Corrupt { step, message };
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
                Err(e @ CheckpointError::Partial { .. }) => ("partial", None, Some(e.detail())),
                Err(CheckpointError::Corrupt { message, .. }) => ("corrupt", None, Some(message)),
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
    /// manifest: a damaged shard is [`CheckpointError::Corrupt`].
    pub async fn read_verified_shard(
        &self,
        manifest: &Manifest,
        rank: Rank,
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
            loss_scale: state.loss_scale,
        })
    }
}
