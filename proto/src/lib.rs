//! The gantry.v1 wire contract, generated at build time, plus the protocol version that every
//! worker and rank message carries.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// Bumped on any change a peer of another version could misread. Workers and ranks send it on
/// every message; the coordinator refuses a mismatch with FAILED_PRECONDITION.
pub const PROTOCOL_VERSION: u32 = 1;

/// The core's classifier metrics on the wire and back: the worker sends what its ranks report,
/// the coordinator keeps and serves them.
impl From<gantry_core::ClassMetrics> for v1::ClassMetrics {
    fn from(m: gantry_core::ClassMetrics) -> Self {
        Self {
            accuracy: m.accuracy,
            precision: m.precision,
            recall: m.recall,
            f1: m.f1,
            samples: m.samples,
        }
    }
}

impl From<v1::ClassMetrics> for gantry_core::ClassMetrics {
    fn from(m: v1::ClassMetrics) -> Self {
        Self {
            accuracy: m.accuracy,
            precision: m.precision,
            recall: m.recall,
            f1: m.f1,
            samples: m.samples,
        }
    }
}

/// The metadata key that carries a bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// A client's credential: adds `authorization: Bearer <token>` to every call (nothing when it
/// holds no token).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// A credential from a token; refused when it cannot travel in a header.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| "the token has characters a header cannot carry".to_string())
            })
            .transpose()
            .map(Self)
    }
}

impl std::fmt::Debug for Bearer {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(…)"
        } else {
            "Bearer(none)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a [`Bearer`] credential.
pub type Authed =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// A job-service client over `channel`, presenting `bearer`.
pub fn job_client(
    channel: tonic::transport::Channel,
    bearer: Bearer,
) -> v1::job_service_client::JobServiceClient<Authed> {
    v1::job_service_client::JobServiceClient::with_interceptor(channel, bearer)
}

/// A worker-service client over `channel`, presenting `bearer`.
pub fn worker_client(
    channel: tonic::transport::Channel,
    bearer: Bearer,
) -> v1::worker_service_client::WorkerServiceClient<Authed> {
    v1::worker_service_client::WorkerServiceClient::with_interceptor(channel, bearer)
}

/// The endpoint of a coordinator at `url`: over TLS for `https://`, verifying the server
/// against `ca_pem` (the coordinator's `ca.pem`); plain TCP for `http://` (a coordinator that
/// runs `--insecure`), where `ca_pem` is not used.
pub fn endpoint(url: &str, ca_pem: Option<&[u8]>) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url:?}: {e}"))?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let ca = ca_pem.ok_or_else(|| {
        format!(
            "{url} is TLS: name the coordinator's CA certificate (its state dir's tls/ca.pem) \
             with --ca-cert or GANTRY_CA_CERT"
        )
    })?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    endpoint.tls_config(tls).map_err(|e| format!("{url}: {e}"))
}
