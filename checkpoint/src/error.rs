//! What can go wrong with a checkpoint, by kind.

use gantry_core::Attempt;

/// Why a checkpoint could not be opened, written, committed or read. Callers decide by the
/// variant, never by the message: a resume skips [`Partial`](Self::Partial) and
/// [`Corrupt`](Self::Corrupt) checkpoints for the one before, and fails over the others.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint url {0:?}: {1}")]
    Url(String, String),
    /// The step has no manifest: torn by a crash, or still being written.
    #[error("checkpoint at step {step}: no manifest (partial checkpoint)")]
    Partial { step: u64 },
    /// The step's manifest is unusable, or a file it names is missing, short or fails its
    /// checksum.
    #[error("checkpoint at step {step}: {message}")]
    Corrupt { step: u64, message: String },
    /// The store refused this process access (permissions, credentials): it says who reads,
    /// not what was written.
    #[error("object store: {0}")]
    Refused(object_store::Error),
    /// The store failed or could not be reached.
    #[error("object store: {0}")]
    Store(object_store::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("attempt {attempt} may not commit step {step}: attempt {fence} has started since")]
    Stale {
        attempt: Attempt,
        fence: Attempt,
        step: u64,
    },
    /// The job's pointer object does not parse.
    #[error("{path}: not a checkpoint pointer: {message}")]
    Pointer { path: String, message: String },
    /// A pointer's compare-and-swap lost every round to other writers.
    #[error("{path}: gave up after {rounds} conflicting writes")]
    Contended { path: String, rounds: usize },
    /// A local pointer file or its lock could not be used.
    #[error("{path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
}

impl From<object_store::Error> for CheckpointError {
    fn from(e: object_store::Error) -> Self {
        if refused(&e) {
            Self::Refused(e)
        } else {
            Self::Store(e)
        }
    }
}

/// Whether the store refused this reader access: the store said so, or the local filesystem
/// did (an I/O error of kind `PermissionDenied` anywhere in the chain of sources).
pub(crate) fn refused(error: &object_store::Error) -> bool {
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

impl CheckpointError {
    /// The message without the step it is about: what a listing shows beside the step, and
    /// what a resume says when it skips one.
    pub fn detail(&self) -> String {
        match self {
            CheckpointError::Partial { .. } => "no manifest (partial checkpoint)".into(),
            CheckpointError::Corrupt { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}
