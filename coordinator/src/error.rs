//! The coordinator's errors, and the one place they become gRPC status codes.

use crate::store::StoreError;
use gantry_core::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid job spec: {0}")]
    InvalidSpec(#[from] SpecError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller belongs to an attempt that is no longer live (fencing).
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        let message = e.to_string();
        match e {
            CoordinatorError::InvalidArgument(_) | CoordinatorError::InvalidSpec(_) => {
                tonic::Status::invalid_argument(message)
            }
            CoordinatorError::NotFound(_) => tonic::Status::not_found(message),
            CoordinatorError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            CoordinatorError::Aborted(_) => tonic::Status::aborted(message),
            CoordinatorError::Store(_) => {
                tracing::error!(error = %message, "store failure");
                tonic::Status::internal(message)
            }
        }
    }
}
