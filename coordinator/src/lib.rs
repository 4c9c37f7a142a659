//! Gantry's coordinator: durable job state, gang scheduling, worker leases and rendezvous.
//!
//! `core` owns the state and carries out every decision; `scheduler` is the pure placement
//! function; `message` holds what workers report, in core types; `service` adapts gRPC to the
//! core; `store` is the SQLite database the core caches.

pub mod auth;
pub mod config;
pub mod convert;
pub mod core;
pub mod error;
pub mod handle;
pub mod message;
pub mod metrics;
pub mod policy;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod store;
pub mod tls;

#[cfg(test)]
mod core_gpu_tests;
#[cfg(test)]
mod core_tests;

use crate::core::{Core, CoreOptions};
use crate::handle::{Clock, Handle, SystemClock};
use crate::service::{JobApi, WorkerApi};
use crate::store::Store;
use gantry_proto::v1::{
    job_service_server::JobServiceServer, worker_service_server::WorkerServiceServer,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// What a coordinator needs to start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    /// Where checkpoints go when a job spec names no `checkpoint.url`; by default
    /// `file://<state_dir>/checkpoints` (which workers on other machines cannot reach).
    pub checkpoint_url: Option<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` over HTTP; none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// How long the gRPC health service reports NOT_SERVING before the server stops.
    pub drain_ms: u64,
    /// Serve every call without a token (as an anonymous admin). Off by default.
    pub insecure: bool,
    /// An admin token to accept (e.g. from a Kubernetes Secret); without one, the coordinator
    /// writes a fresh one to `<state_dir>/admin.token` when it has no admin token yet.
    #[serde(skip_serializing)]
    pub admin_token: Option<String>,
    /// The join token workers present; without one, the coordinator writes a fresh one to
    /// `<state_dir>/join.token` when it has no worker token yet.
    #[serde(skip_serializing)]
    pub join_token: Option<String>,
    /// URL prefixes every store and endpoint a spec names must start with; empty: any, but
    /// never a link-local or cloud metadata address.
    pub allowed_stores: Vec<String>,
    /// The server's certificate and key (PEM); without them the coordinator serves a
    /// certificate it made under `<state_dir>/tls/` (`ca.pem` is what clients verify it with).
    pub tls: Option<tls::TlsFiles>,
    /// More names (DNS or IP) a generated certificate is valid for, besides loopback and this
    /// host: the addresses clients and workers reach the coordinator by.
    pub tls_names: Vec<String>,
    /// What one client may ask.
    pub limits: service::Limits,
    /// The largest gRPC message accepted, in bytes (bigger is RESOURCE_EXHAUSTED).
    pub max_message_bytes: usize,
    /// Requests per second each client address may send (0: no limit), and the burst.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
}

impl Options {
    /// The defaults for a coordinator on `listen` with its state in `state_dir`.
    pub fn new(listen: SocketAddr, state_dir: PathBuf) -> Self {
        Self {
            listen,
            state_dir,
            heartbeat_interval_ms: 1_000,
            lease_ttl_ms: 10_000,
            checkpoint_url: None,
            metrics_listen: None,
            drain_ms: 0,
            insecure: false,
            admin_token: None,
            join_token: None,
            allowed_stores: Vec::new(),
            tls: None,
            tls_names: Vec::new(),
            limits: service::Limits::default(),
            max_message_bytes: 4 << 20,
            rate_limit_per_sec: 1000,
            rate_limit_burst: 2000,
        }
    }
}

/// The tokens and the TLS configuration a coordinator serves with: none of either `--insecure`
/// (said loudly); else the tokens in its database, with an admin and a join token made (or the
/// given ones recorded), and the certificate it was given or made.
fn secure(
    options: &Options,
    state_dir: &std::path::Path,
    database: &std::path::Path,
    now_ms: i64,
) -> anyhow::Result<(
    Option<Arc<auth::Tokens>>,
    Option<tonic::transport::ServerTlsConfig>,
)> {
    if options.insecure {
        tracing::warn!(
            "--insecure: plain TCP, and every call is served without a token, as an admin; \
             anyone who can reach {} can submit, cancel and resume jobs and register as a worker",
            options.listen
        );
        return Ok((None, None));
    }
    let tokens = auth::Tokens::open(database)?;
    tokens.bootstrap(
        auth::Role::Admin,
        "admin",
        options.admin_token.as_deref(),
        &state_dir.join("admin.token"),
        now_ms,
    )?;
    tokens.bootstrap(
        auth::Role::Worker,
        "workers",
        options.join_token.as_deref(),
        &state_dir.join("join.token"),
        now_ms,
    )?;
    let files = match &options.tls {
        Some(files) => files.clone(),
        None => tls::self_signed(
            &state_dir.join("tls"),
            &tls::default_names(&options.tls_names),
        )?,
    };
    Ok((Some(Arc::new(tokens)), Some(tls::server_config(&files)?)))
}

/// A started coordinator: its bound address and a handle on its state.
pub struct Coordinator {
    pub addr: SocketAddr,
    pub handle: Handle,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Coordinator {
    /// Opens the store under `state_dir`, binds `listen` (port 0 picks one) and serves until
    /// `shutdown` is cancelled.
    pub async fn start(options: Options, shutdown: CancellationToken) -> anyhow::Result<Self> {
        Self::start_with_clock(options, Arc::new(SystemClock), shutdown).await
    }

    pub async fn start_with_clock(
        options: Options,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.state_dir)?;
        let state_dir = std::fs::canonicalize(&options.state_dir)?;
        // The database holds token hashes and the key attempt secrets derive from: the state
        // directory is its owner's alone (where the filesystem lets us say so).
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) =
                std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
            {
                tracing::warn!(dir = %state_dir.display(), error = %e, "could not make the state directory private");
            }
        }
        let database = state_dir.join("coordinator.db");
        let store = Store::open(&database)?;
        let mut core_options = CoreOptions::for_state_dir(&state_dir);
        core_options.heartbeat_interval_ms = options.heartbeat_interval_ms;
        core_options.lease_ttl_ms = options.lease_ttl_ms;
        core_options.allowed_stores = options.allowed_stores.clone();
        if let Some(url) = &options.checkpoint_url {
            core_options.default_checkpoint_url = url.clone();
        }
        let core = Core::load(store, core_options, clock.now_ms())?;
        // Credentials first: a coordinator that cannot have them starts nothing.
        let (tokens, tls) = secure(&options, &state_dir, &database, clock.now_ms())?;
        let handle = Handle::new(core, clock);
        let listener = TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, state_dir = %state_dir.display(), "coordinator listening");

        let ticker = handle.clone();
        let tick_shutdown = shutdown.clone();
        let tick_every = Duration::from_millis((options.lease_ttl_ms / 10).clamp(50, 1000));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick_every);
            loop {
                tokio::select! {
                    _ = tick_shutdown.cancelled() => return,
                    _ = interval.tick() => {
                        if let Err(e) = ticker.with(|core, now| core.tick(now)) {
                            tracing::error!(error = %e, "tick failed");
                        }
                    }
                }
            }
        });

        let rpc = metrics::RpcMetrics::default();
        let authenticate = auth::Authenticate {
            tokens: tokens.clone(),
            metrics: rpc.clone(),
            limiter: auth::rate_limiter(options.rate_limit_per_sec, options.rate_limit_burst),
        };
        let worker_tokens = tokens.clone();
        let jobs = JobApi::new(handle.clone(), tokens, options.limits, rpc.clone());
        if let Some(listen) = options.metrics_listen {
            let collect = metrics::collector(handle.clone(), rpc.clone());
            gantry_ops::serve_http(
                listen,
                collect,
                gantry_ops::Readiness::ready(),
                shutdown.clone(),
            )
            .await?;
        }
        // The standard gRPC health service: SERVING while up, NOT_SERVING once shutdown starts,
        // for `drain_ms` before the server stops (so load balancers and probes move away).
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<JobServiceServer<JobApi>>().await;
        health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let stop = CancellationToken::new();
        let drain = Duration::from_millis(options.drain_ms);
        let stop_server = stop.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            health.set_not_serving::<JobServiceServer<JobApi>>().await;
            health
                .set_not_serving::<WorkerServiceServer<WorkerApi>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            tokio::time::sleep(drain).await;
            stop_server.cancel();
        });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .layer(tower::layer::layer_fn(move |inner| rpc.layer(inner)))
            .layer(tower::layer::layer_fn(move |inner| {
                authenticate.layer(inner)
            }))
            .add_service(health_service)
            .add_service(
                JobServiceServer::new(jobs).max_decoding_message_size(options.max_message_bytes),
            )
            .add_service(
                WorkerServiceServer::new(WorkerApi(handle.clone(), worker_tokens))
                    .max_decoding_message_size(options.max_message_bytes),
            );
        let task = tokio::spawn(async move {
            server
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await?;
            Ok(())
        });
        Ok(Self { addr, handle, task })
    }
}
