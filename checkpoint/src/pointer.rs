//! The job's pointer: one small object, `pointer.json`, holding the `fence` (the newest attempt
//! that started) and `latest` (the newest committed step). Both only move forward.
//!
//! The two live in one object so that one compare-and-swap covers both: a commit moves
//! `latest` only by a swap conditional on the version of the pointer in which it read a fence
//! no newer than its own attempt. A new attempt's fence changes that version, so a stale
//! attempt's swap fails, and on re-reading it finds the newer fence and is refused: its commit
//! cannot land after the new attempt has started, whatever the interleaving.
//!
//! Every change is a read, a decision on what was read, and a conditional write: create-if-
//! absent when there is no pointer yet, else update-if-the-version-still-matches, retried from
//! the read on conflict. Of two writers that race, exactly one wins each round. S3, Azure and
//! GCS offer both conditional puts (`PutMode::Create`, `PutMode::Update`). object_store's local
//! filesystem implements `Create` but not `Update`: there the read and the write are made under
//! an exclusive `flock` on a lock file beside the pointer, which every Gantry process on that
//! filesystem takes the same way, and the new value is written to a staging file, synced and
//! renamed over the old one, so a reader sees the old pointer or the new, never a torn one.
//!
//! Checkpoints written before the pointer existed keep `fence` and `latest` as two objects
//! holding one number each; they are read as the pointer's first value.

use crate::CheckpointError;
use gantry_core::Attempt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use std::io::Write;

/// How many conflicting rounds a writer retries before it gives up: each round some other
/// writer won, so this bounds only a pathological storm of writers.
const MAX_ROUNDS: usize = 64;

/// The pointer's object name under a job's root; the two older objects it replaces.
pub const NAME: &str = "pointer.json";
const LEGACY_FENCE: &str = "fence";
const LEGACY_LATEST: &str = "latest";

/// What the pointer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pointer {
    /// The newest attempt that started: an older one may not commit.
    pub fence: Attempt,
    /// The newest committed step.
    pub latest: Option<u64>,
}

/// What a change decides, given the pointer as read.
#[derive(Debug)]
pub enum Change<E> {
    /// Write this value (if the pointer is still as read).
    Write(Pointer),
    /// Nothing to write: the pointer already says enough.
    Keep,
    /// Refuse, with this error; nothing is written.
    Refuse(E),
}

/// What [`update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This call wrote the pointer.
    Written(Pointer),
    /// The pointer was left as it was.
    Kept(Pointer),
}

fn payload(p: &Pointer) -> PutPayload {
    PutPayload::from(serde_json::to_vec(p).expect("a pointer serialises"))
}

/// A number in one of the older single-number objects (`None` when absent or unreadable).
async fn legacy_number(store: &dyn ObjectStore, root: &Path, name: &str) -> Option<u64> {
    let found = store.get(&root.clone().join(name)).await.ok()?;
    parse_number(&found.bytes().await.ok()?)
}

/// The number an older single-number object holds.
fn parse_number(bytes: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(bytes).trim().parse().ok()
}

/// The pointer of the job at `root`, with its version, or what the older objects say (and no
/// version) when there is none yet.
pub async fn read(
    store: &dyn ObjectStore,
    root: &Path,
) -> Result<(Pointer, Option<UpdateVersion>), CheckpointError> {
    let path = root.clone().join(NAME);
    match store.get(&path).await {
        Ok(found) => {
            let version = UpdateVersion {
                e_tag: found.meta.e_tag.clone(),
                version: found.meta.version.clone(),
            };
            let bytes = found.bytes().await?;
            let pointer = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Pointer {
                path: path.to_string(),
                message: e.to_string(),
            })?;
            Ok((pointer, Some(version)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok((legacy(store, root).await, None)),
        Err(e) => Err(e.into()),
    }
}

async fn legacy(store: &dyn ObjectStore, root: &Path) -> Pointer {
    Pointer {
        fence: Attempt(legacy_number(store, root, LEGACY_FENCE).await.unwrap_or(0)),
        latest: legacy_number(store, root, LEGACY_LATEST).await,
    }
}

/// What one conditional write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// The pointer now holds the new value, written by this call.
    Won,
    /// Another writer changed the pointer since it was read; nothing was written.
    Conflict,
}

/// One compare-and-swap on an object store: writes `value` at `path` if the object is still
/// as read (`expected`: absent, or at that version).
pub async fn swap(
    store: &dyn ObjectStore,
    path: &Path,
    expected: Option<UpdateVersion>,
    value: &Pointer,
) -> Result<Swap, CheckpointError> {
    let mode = match expected {
        None => PutMode::Create,
        Some(version) => PutMode::Update(version),
    };
    match store
        .put_opts(path, payload(value), PutOptions::from(mode))
        .await
    {
        Ok(_) => Ok(Swap::Won),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => Ok(Swap::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Changes the pointer of the job at `root` as `decide` says, given what it holds; retried from
/// a fresh read whenever another writer got there first. `local_root` is the directory a local
/// filesystem store maps paths under (`None` for an object store).
pub async fn update(
    store: &dyn ObjectStore,
    local_root: Option<&std::path::Path>,
    root: &Path,
    mut decide: impl FnMut(Pointer) -> Change<CheckpointError>,
) -> Result<Outcome, CheckpointError> {
    if let Some(dir) = local_root {
        return update_local(&dir.join(root.as_ref()), decide);
    }
    let path = root.clone().join(NAME);
    for _ in 0..MAX_ROUNDS {
        let (current, version) = read(store, root).await?;
        let next = match decide(current) {
            Change::Keep => return Ok(Outcome::Kept(current)),
            Change::Refuse(e) => return Err(e),
            Change::Write(next) => next,
        };
        if swap(store, &path, version, &next).await? == Swap::Won {
            return Ok(Outcome::Written(next));
        }
    }
    Err(CheckpointError::Contended {
        path: path.to_string(),
        rounds: MAX_ROUNDS,
    })
}

/// [`update`] on a local filesystem, in the job's directory `dir`: the read, the decision and
/// the write under an exclusive lock.
fn update_local(
    dir: &std::path::Path,
    mut decide: impl FnMut(Pointer) -> Change<CheckpointError>,
) -> Result<Outcome, CheckpointError> {
    use std::os::fd::AsRawFd;
    let file = dir.join(NAME);
    let io = |e: std::io::Error| CheckpointError::Local {
        path: file.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!(".{NAME}.lock")))
        .map_err(io)?;
    // SAFETY: flock on a file descriptor this function owns; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let current = match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Pointer {
            path: file.display().to_string(),
            message: e.to_string(),
        })?,
        // No pointer yet: what the older single-number objects say, read only now.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let number = |name: &str| parse_number(&std::fs::read(dir.join(name)).ok()?);
            Pointer {
                fence: Attempt(number(LEGACY_FENCE).unwrap_or(0)),
                latest: number(LEGACY_LATEST),
            }
        }
        Err(e) => return Err(io(e)),
    };
    let next = match decide(current) {
        Change::Keep => return Ok(Outcome::Kept(current)),
        Change::Refuse(e) => return Err(e),
        Change::Write(next) => next,
    };
    let staging = dir.join(format!(".{NAME}.{}", std::process::id()));
    let mut f = std::fs::File::create(&staging).map_err(io)?;
    f.write_all(&serde_json::to_vec(&next).expect("a pointer serialises"))
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&staging, &file).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    drop(lock);
    Ok(Outcome::Written(next))
}
