//! Gantry's coordinator: durable job state, gang scheduling, worker leases and rendezvous.
//!
//! `core` owns the state and makes every decision; `scheduler` is the pure placement function;
//! `service` adapts gRPC to the core; `store` is the SQLite database the core caches.

pub mod config;
pub mod convert;
pub mod core;
pub mod error;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod store;

#[cfg(test)]
mod core_tests;

use crate::core::{Core, CoreOptions};
use crate::service::{Clock, Handle, JobApi, SystemClock, WorkerApi};
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
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
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
        let store = Store::open(&state_dir.join("coordinator.db"))?;
        let mut core_options = CoreOptions::for_state_dir(&state_dir);
        core_options.heartbeat_interval_ms = options.heartbeat_interval_ms;
        core_options.lease_ttl_ms = options.lease_ttl_ms;
        let core = Core::load(store, core_options, clock.now_ms())?;
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

        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(JobServiceServer::new(JobApi(handle.clone())))
            .add_service(WorkerServiceServer::new(WorkerApi(handle.clone())));
        let task = tokio::spawn(async move {
            server
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await?;
            Ok(())
        });
        Ok(Self { addr, handle, task })
    }
}
