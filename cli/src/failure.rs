//! How a command fails: the message, and the exit code it maps to (0 ok; 1 the job failed or
//! was cancelled; 2 bad usage or invalid input; 3 coordinator unreachable).

use gantry_proto::Bearer;
use gantry_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use std::time::Duration;

/// A job-service client that presents the CLI's token.
pub type Client = JobServiceClient<gantry_proto::Authed>;

/// The coordinator a command talks to, and the credential it presents.
#[derive(Debug, Clone)]
pub struct Remote {
    pub url: String,
    pub bearer: Bearer,
    /// The coordinator's CA certificate (PEM), for an `https://` URL.
    pub ca: Option<Vec<u8>>,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        if s.code() == Code::Unknown && s.message() == "transport error" {
            // Most often the two ends disagree on TLS.
            return Self {
                code: 3,
                message: "the connection to the coordinator failed (transport error): a \
                          coordinator that serves TLS (the default) needs an https:// URL, one \
                          that runs --insecure an http:// one"
                    .into(),
            };
        }
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => 3,
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Unauthenticated
            | Code::PermissionDenied => 2,
            _ => 1,
        };
        Self {
            code,
            message: s.message().to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

/// A client of the coordinator, or the failure that says why not (exit code 3).
pub async fn connect(remote: &Remote) -> Result<Client, Failure> {
    let url = &remote.url;
    let endpoint = gantry_proto::endpoint(url, remote.ca.as_deref())
        .map_err(|e| Failure::usage(format!("--coordinator: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| Failure {
        code: 3,
        message: format!("cannot reach the coordinator at {url}: {e}"),
    })?;
    Ok(gantry_proto::job_client(channel, remote.bearer.clone()))
}
