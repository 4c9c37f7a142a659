//! Retention: what a commit deletes.

use crate::{CheckpointError, CheckpointStore};
use object_store::ObjectStoreExt;

impl CheckpointStore {
    /// Deletes committed checkpoints beyond the newest `keep_last`, and partial ones older
    /// than the newest committed one.
    pub(crate) async fn retain(&self, keep_last: u32) -> Result<Vec<u64>, CheckpointError> {
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
