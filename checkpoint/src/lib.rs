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

//!
//! Files: `manifest.rs` (the format), `open.rs` (stores from URLs), `write.rs` (shards and the
//! fenced commit), `pointer.rs` (`fence` and `latest`, moved only forward by compare-and-swap),
//! `read.rs` (verified reads, resume candidates, listings), `retain.rs`, `error.rs`.

mod error;
mod manifest;
mod open;
pub mod pointer;
mod read;
mod retain;
mod write;

pub use error::CheckpointError;
pub use manifest::{FORMAT, FileEntry, LossScale, Manifest, RankState, StepListing, writes_shard};
pub use open::open_url;

use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;

/// One rank's restorable state. The records are shared buffers, so handing them to the store
/// copies nothing.
#[derive(Clone)]
pub struct Shard {
    pub model: bytes::Bytes,
    pub optimizer: bytes::Bytes,
    pub data_cursor: u64,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    /// fp16 training's loss scale, for the resumed run.
    pub loss_scale: Option<LossScale>,
}

#[derive(Clone)]
pub struct CheckpointStore {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// `{url path}/{job}`
    pub(crate) root: Path,
    pub(crate) url: String,
    pub(crate) job_id: String,
    pub(crate) options: Options,
    /// A `file://` store.
    pub(crate) local: bool,
}

/// Options for a store's client, by object_store's configuration key.
pub type Options = std::collections::BTreeMap<String, String>;

pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

impl CheckpointStore {
    pub(crate) fn step_dir(&self, step: u64) -> Path {
        self.root.clone().join(format!("step-{step:08}"))
    }

    /// The URL of a step's directory, for people.
    pub fn step_url(&self, step: u64) -> String {
        let job = self.root.filename().unwrap_or_default();
        format!("{}/{job}/step-{step:08}", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::{Attempt, Rank};

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
            attempt: Attempt(1),
            world_size: 2,
            dp: 1,
            tp: 2,
            pp: 1,
            files: vec![],
            total_bytes: 0,
            dataset_sha256: None,
        }
    }

    fn shard(rank: u32, step: u64) -> Shard {
        Shard {
            model: vec![rank as u8; 10].into(),
            optimizer: vec![7; 5].into(),
            data_cursor: step,
            loss: Some(0.5),
            eval_loss: None,
            loss_scale: None,
        }
    }

    /// Every writer's shard of `manifest`'s step, then the commit.
    async fn save_as(store: &CheckpointStore, manifest: Manifest) -> Result<(), CheckpointError> {
        for rank in manifest.writers() {
            store
                .write_shard(manifest.step, Rank(rank), shard(rank, manifest.step))
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
        assert_eq!([0, 1, 2, 3].map(|r| dp2.holder(at(r)).get()), [0, 3, 0, 3]);
        save_as(&store, dp2.clone()).await.unwrap();
        let committed = store.verify(40).await.unwrap();
        assert_eq!(
            names(&committed),
            [0, 3]
                .map(|r| ["model.bpk", "optim.bpk", "state.json"].map(|f| format!("rank-{r}.{f}")))
                .concat()
        );
        assert!(store.read_verified_shard(&committed, Rank(3)).await.is_ok());

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
        assert!(store.read_verified_shard(&committed, Rank(3)).await.is_ok());

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
            .read_verified_shard(&store.verify(30).await.unwrap(), Rank(1))
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
        assert!(store.read_verified_shard(&manifest, Rank(0)).await.is_ok());
        let damaged = store
            .read_verified_shard(&manifest, Rank(1))
            .await
            .err()
            .unwrap();
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
        let unreadable = store
            .read_verified_shard(&manifest, Rank(0))
            .await
            .err()
            .unwrap();
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
        let missing = store
            .read_verified_shard(&manifest, Rank(0))
            .await
            .err()
            .unwrap();
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
                Rank(0),
                Shard {
                    model: vec![1].into(),
                    optimizer: vec![2].into(),
                    data_cursor: 40,
                    loss: None,
                    eval_loss: None,
                    loss_scale: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(newest_whole(&store).await, 20);

        // `latest` never moves backwards.
        store.advance_latest(5, Attempt(1)).await.unwrap();
        assert_eq!(store.latest().await.unwrap(), Some(30));

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
        store.fence(Attempt(1)).await.unwrap();
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
                loss_scale: None,
            };
            store.write_shard(30, Rank(rank), shard).await.unwrap();
        }
        store.fence(Attempt(2)).await.unwrap();
        store.fence(Attempt(1)).await.unwrap(); // a late fence from attempt 1 does not lower it
        let refused = store.commit(manifest(30), 2).await.unwrap_err();
        assert!(
            matches!(
                refused,
                CheckpointError::Stale {
                    attempt: Attempt(1),
                    fence: Attempt(2),
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
        m.attempt = Attempt(2);
        store.commit(m, 5).await.unwrap();
        assert_eq!(store.latest().await.unwrap(), Some(30));
        for rank in 0..2 {
            let shard = Shard {
                model: vec![1; 4].into(),
                optimizer: vec![1; 4].into(),
                data_cursor: 25,
                loss: None,
                eval_loss: None,
                loss_scale: None,
            };
            store.write_shard(25, Rank(rank), shard).await.unwrap();
        }
        let mut m = manifest(25);
        m.attempt = Attempt(2);
        store.commit(m, 5).await.unwrap();
        assert_eq!(store.latest().await.unwrap(), Some(30));
        assert_eq!(newest_whole(&store).await, 30);

        // A later attempt passing step 30 again (resumed from 25) leaves its files alone, and
        // its commit keeps the first manifest.
        let before = store
            .read_verified_shard(&store.verify(30).await.unwrap(), Rank(0))
            .await
            .unwrap();
        store.fence(Attempt(3)).await.unwrap();
        for rank in 0..2 {
            let shard = Shard {
                model: vec![3; 4].into(),
                optimizer: vec![3; 4].into(),
                data_cursor: 30,
                loss: None,
                eval_loss: None,
                loss_scale: None,
            };
            store.write_shard(30, Rank(rank), shard).await.unwrap();
        }
        let mut m = manifest(30);
        m.attempt = Attempt(3);
        store.commit(m, 5).await.unwrap();
        let after = store.verify(30).await.unwrap();
        assert_eq!(after.attempt, Attempt(2));
        assert_eq!(
            store
                .read_verified_shard(&after, Rank(0))
                .await
                .unwrap()
                .model,
            before.model
        );
    }
}
