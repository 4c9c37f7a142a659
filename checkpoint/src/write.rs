//! Writing a checkpoint: each writer's shard, then rank 0's commit (the manifest by a
//! conditional put, fenced by attempt), then the `latest` pointer.

use crate::manifest::RankState;
use crate::pointer::{self, Change, Pointer};
use crate::{CheckpointError, CheckpointStore, FileEntry, Manifest, Shard, checksum};
use gantry_core::{Attempt, Rank};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

/// Files above this size are uploaded in parts of this size.
const MULTIPART_BYTES: usize = 16 << 20;

impl CheckpointStore {
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
        rank: Rank,
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
                %rank,
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
            loss_scale: shard.loss_scale,
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

    /// The job's pointer (`fence` and `latest`), through [`pointer::update`].
    async fn update_pointer(
        &self,
        decide: impl FnMut(Pointer) -> Change<CheckpointError>,
    ) -> Result<pointer::Outcome, CheckpointError> {
        let local_root = self.local.then(|| std::path::Path::new("/"));
        pointer::update(self.store.as_ref(), local_root, &self.root, decide).await
    }

    /// Records that `attempt` has started: from now on, older attempts may not commit. Called
    /// by rank 0 of every attempt before it trains; the fence only moves forwards. Returns
    /// whether this call moved it.
    pub async fn fence(&self, attempt: Attempt) -> Result<bool, CheckpointError> {
        let outcome = self
            .update_pointer(|p| {
                if p.fence >= attempt {
                    Change::Keep
                } else {
                    Change::Write(Pointer {
                        fence: attempt,
                        ..p
                    })
                }
            })
            .await?;
        Ok(matches!(outcome, pointer::Outcome::Written(_)))
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
        let (step, attempt) = (manifest_base.step, manifest_base.attempt);
        // A cheap early refusal; the swap of `latest` below is what decides.
        let (now, _) = pointer::read(self.store.as_ref(), &self.root).await?;
        if now.fence > attempt {
            return Err(CheckpointError::Stale {
                attempt,
                fence: now.fence,
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
        self.advance_latest(step, attempt).await?;
        let deleted = self.retain(keep_last).await?;
        Ok((total_bytes, deleted))
    }

    /// The step `latest` points at.
    pub async fn latest(&self) -> Result<Option<u64>, CheckpointError> {
        Ok(pointer::read(self.store.as_ref(), &self.root)
            .await?
            .0
            .latest)
    }

    /// Moves `latest` forward to `step`, unless an attempt newer than `attempt` has started:
    /// one swap, conditional on the pointer in which the fence was read ([`pointer`]), so a
    /// stale attempt's commit cannot land after a newer attempt's fence.
    pub(crate) async fn advance_latest(
        &self,
        step: u64,
        attempt: Attempt,
    ) -> Result<(), CheckpointError> {
        self.update_pointer(|p| {
            if p.fence > attempt {
                Change::Refuse(CheckpointError::Stale {
                    attempt,
                    fence: p.fence,
                    step,
                })
            } else if p.latest.is_some_and(|l| l >= step) {
                Change::Keep
            } else {
                Change::Write(Pointer {
                    latest: Some(step),
                    ..p
                })
            }
        })
        .await
        .map(drop)
    }
}
