//! A local cluster in one process: the coordinator and N worker daemons (`gantry up`). Rank
//! processes are still real OS processes: this executable's hidden `rank` subcommand.

use gantry_coordinator::{Coordinator, Options};
use gantry_worker::agent::{self, AgentOptions};
use std::net::SocketAddr;
use std::path::Path;
use tokio_util::sync::CancellationToken;

pub struct LocalCluster {
    pub url: String,
    /// The admin token the coordinator wrote to `<state_dir>/admin.token` (none `--insecure`).
    pub admin_token: Option<String>,
    /// The CA certificate it made (`<state_dir>/tls/ca.pem`), which clients verify it with
    /// (none `--insecure`).
    pub ca: Option<Vec<u8>>,
    pub coordinator: Coordinator,
    pub workers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl LocalCluster {
    pub async fn start(
        listen: SocketAddr,
        state_dir: &Path,
        workers: u32,
        slots_per_worker: u32,
        shutdown: CancellationToken,
        insecure: bool,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(workers >= 1, "--workers: must be at least 1");
        anyhow::ensure!(
            slots_per_worker >= 1,
            "--slots-per-worker: must be at least 1"
        );
        let mut options = Options::new(listen, state_dir.to_path_buf());
        options.insecure = insecure;
        if !listen.ip().is_unspecified() {
            // The certificate it makes must name the address clients use.
            options.tls_names.push(listen.ip().to_string());
        }
        let coordinator = Coordinator::start(options, shutdown.clone()).await?;
        let scheme = if insecure { "http" } else { "https" };
        let url = format!("{scheme}://{}", coordinator.addr);
        // The credentials the coordinator made (or found) in its state directory.
        let state = std::fs::canonicalize(state_dir)?;
        let read = |name: &str| {
            std::fs::read_to_string(state.join(name))
                .map(|t| t.trim().to_string())
                .map_err(|e| anyhow::anyhow!("{}: {e}", state.join(name).display()))
        };
        let (admin_token, join_token, ca) = if insecure {
            (None, None, None)
        } else {
            (
                Some(read("admin.token")?),
                Some(read("join.token")?),
                Some(std::fs::read(state.join("tls/ca.pem"))?),
            )
        };
        let exe = std::env::current_exe()?.display().to_string();
        let host = gantry_worker::config::hostname();
        let handles = (0..workers)
            .map(|i| {
                let options = AgentOptions {
                    coordinator: url.clone(),
                    slots: slots_per_worker,
                    // Workers of one machine would all offer the same GPUs: none offer any.
                    gpus: Vec::new(),
                    work_dir: state_dir.join("workers").join(format!("worker-{i}")),
                    hostname: format!("{host}-w{i}"),
                    advertise_host: gantry_core::defaults::ADVERTISE_HOST.into(),
                    rank_command: vec![exe.clone(), "rank".into()],
                    metrics_listen: None,
                    drain_timeout_secs: gantry_core::defaults::DRAIN_TIMEOUT_SECS,
                    store_options: Default::default(),
                    log_format: Default::default(),
                    join_token: join_token.clone(),
                    ca_cert: ca.clone(),
                };
                tokio::spawn(agent::run(
                    options,
                    shutdown.clone(),
                    CancellationToken::new(),
                ))
            })
            .collect();
        Ok(Self {
            url,
            admin_token,
            ca,
            coordinator,
            workers: handles,
        })
    }

    /// Waits for the daemons to stop after `shutdown` was cancelled.
    pub async fn stopped(self) -> anyhow::Result<()> {
        for w in self.workers {
            w.await??;
        }
        self.coordinator.task.await??;
        Ok(())
    }
}
