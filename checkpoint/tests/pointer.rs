//! Writers racing for a job's checkpoint pointer (`fence` and `latest`): exactly one wins, the
//! pointer never moves back, and a stale attempt's commit cannot land after a newer attempt's
//! fence; on the local filesystem and on S3 (a real S3-protocol server, moto, on loopback;
//! `scripts/test` installs it).

use gantry_checkpoint::pointer::{self, Change, Outcome, Pointer, Swap};
use gantry_checkpoint::{CheckpointError, CheckpointStore, Options};
use gantry_core::Attempt;
use gantry_testkit::Moto;
use object_store::path::Path;
use std::sync::{Arc, Barrier};

/// Concurrent writers, each on a thread with its own runtime and its own client, as the rank 0
/// processes of different attempts would be.
const WRITERS: u64 = 8;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every writer fences at once, writer `w` with `attempt(w)`; returns who moved the fence.
fn race(url: &str, options: &Options, attempt: impl Fn(u64) -> u64 + Sync) -> Vec<bool> {
    let start = Barrier::new(WRITERS as usize);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (start, attempt) = (&start, &attempt);
                scope.spawn(move || {
                    let store = CheckpointStore::open_with(url, "job", options).unwrap();
                    start.wait();
                    runtime()
                        .block_on(store.fence(Attempt(attempt(w))))
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn fence_of(url: &str, options: &Options) -> u64 {
    let store = CheckpointStore::open_with(url, "job", options).unwrap();
    // A commit of step 0 by attempt `fence - 1` is refused; by `fence` it is not: read the
    // fence through the public API as the error reports it.
    match runtime().block_on(store.commit(stale_manifest(0), 1)) {
        Err(CheckpointError::Stale { fence, .. }) => fence.get(),
        other => panic!("attempt 0 should be stale: {other:?}"),
    }
}

fn stale_manifest(attempt: u64) -> gantry_checkpoint::Manifest {
    gantry_checkpoint::Manifest {
        format: gantry_checkpoint::FORMAT,
        job_id: "job".into(),
        step: 1,
        attempt: Attempt(attempt),
        world_size: 1,
        dp: 1,
        tp: 1,
        pp: 1,
        files: vec![],
        total_bytes: 0,
        dataset_sha256: None,
    }
}

/// Exactly one of the writers racing to one attempt moves the fence; of writers racing to
/// different attempts, the fence ends at the newest; an older one afterwards changes nothing.
fn check(url: &str, options: &Options) {
    let same = race(url, options, |_| 10);
    assert_eq!(same.iter().filter(|w| **w).count(), 1, "{same:?}");
    assert_eq!(fence_of(url, options), 10);

    let spread = race(url, options, |w| 20 + (w * 5) % WRITERS);
    assert!(spread.iter().any(|w| *w), "{spread:?}");
    assert_eq!(fence_of(url, options), 20 + WRITERS - 1);

    let back = race(url, options, |_| 3);
    assert!(back.iter().all(|w| !w), "{back:?}");
    assert_eq!(fence_of(url, options), 20 + WRITERS - 1);
}

#[test]
fn racing_writers_on_the_local_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    check(&format!("file://{}", dir.path().display()), &Options::new());
}

/// A raw S3 client of `bucket` on `moto`.
fn client(moto: &Moto, bucket: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(&moto.url)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap()
}

fn options(moto: &Moto) -> Options {
    moto.options().into_iter().collect()
}

#[test]
fn racing_writers_on_s3() {
    let moto = Moto::start("pointers");
    check("s3://pointers/runs", &options(&moto));
}

/// The window the pointer closes: attempt 1 reads the pointer (fence 1) to move `latest`, and
/// attempt 2 fences before attempt 1 writes. Attempt 1's conditional write fails, and on
/// reading again it finds the newer fence: its commit is refused and `latest` does not move.
#[test]
fn a_stale_commit_cannot_land_after_a_newer_fence_on_s3() {
    let moto = Moto::start("window");
    let options = options(&moto);
    let url = "s3://window/runs";
    let io = runtime();
    let first = CheckpointStore::open_with(url, "job", &options).unwrap();
    io.block_on(first.fence(Attempt(1))).unwrap();
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(client(&moto, "window"));
    let root = Path::from("runs/job");
    let mut reads = Vec::new();
    let outcome = io.block_on(pointer::update(store.as_ref(), None, &root, |p| {
        reads.push(p);
        if reads.len() == 1 {
            // Attempt 2 starts right here, from another process.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let second = CheckpointStore::open_with(url, "job", &options).unwrap();
                    assert!(runtime().block_on(second.fence(Attempt(2))).unwrap());
                });
            });
        }
        if p.fence > Attempt(1) {
            return Change::Refuse(CheckpointError::Stale {
                attempt: Attempt(1),
                fence: p.fence,
                step: 30,
            });
        }
        Change::Write(Pointer {
            latest: Some(30),
            ..p
        })
    }));
    assert!(
        matches!(
            outcome,
            Err(CheckpointError::Stale {
                fence: Attempt(2),
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_eq!(reads.len(), 2, "one conflict, then the refusal: {reads:?}");
    let (now, _) = io.block_on(pointer::read(store.as_ref(), &root)).unwrap();
    assert_eq!(
        now,
        Pointer {
            fence: Attempt(2),
            latest: None
        }
    );
    // The same change by the current attempt goes through.
    let done = io
        .block_on(pointer::update(store.as_ref(), None, &root, |p| {
            Change::Write(Pointer {
                latest: Some(30),
                ..p
            })
        }))
        .unwrap();
    assert_eq!(
        done,
        Outcome::Written(Pointer {
            fence: Attempt(2),
            latest: Some(30)
        })
    );
}

/// The compare-and-swap itself: two writers that read the same version both write; exactly
/// one succeeds, for a pointer that does not exist yet and for one that does.
#[test]
fn one_of_two_swaps_from_the_same_version_wins_on_s3() {
    use object_store::{ObjectStoreExt, UpdateVersion};
    let moto = Moto::start("swaps");
    let store = client(&moto, "swaps");
    let path = Path::from("job/pointer.json");
    let io = runtime();
    let value = |fence| Pointer {
        fence: Attempt(fence),
        latest: None,
    };
    io.block_on(async {
        let (one, two) = (value(1), value(2));
        let (a, b) = tokio::join!(
            pointer::swap(&store, &path, None, &one),
            pointer::swap(&store, &path, None, &two),
        );
        let outcomes = [a.unwrap(), b.unwrap()];
        assert_eq!(
            outcomes.iter().filter(|s| **s == Swap::Won).count(),
            1,
            "{outcomes:?}"
        );
        let head = store.head(&path).await.unwrap();
        let version = UpdateVersion {
            e_tag: head.e_tag,
            version: head.version,
        };
        let first = pointer::swap(&store, &path, Some(version.clone()), &value(3))
            .await
            .unwrap();
        let second = pointer::swap(&store, &path, Some(version), &value(4))
            .await
            .unwrap();
        assert_eq!((first, second), (Swap::Won, Swap::Conflict));
    });
}
