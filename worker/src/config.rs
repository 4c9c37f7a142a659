//! The worker daemon's settings: a config file, then `GANTRY_*` environment variables and flags.

use crate::agent::AgentOptions;
use clap::{Args as ClapArgs, Parser, Subcommand};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "gantry-worker", version, about = "Gantry's worker daemon")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs one rank (started by a worker daemon, not by hand).
    #[command(hide = true)]
    Rank(RankArgs),
}

#[derive(Debug, ClapArgs)]
pub struct RankArgs {
    #[arg(long)]
    pub assignment: PathBuf,
}

#[derive(Debug, ClapArgs)]
pub struct DaemonArgs {
    /// A TOML, YAML or JSON file with any of the keys below.
    #[arg(long, env = "GANTRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The coordinator's URL.
    #[arg(long, env = "GANTRY_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Rank processes this worker runs at once.
    #[arg(long, env = "GANTRY_SLOTS")]
    pub slots: Option<u32>,
    /// Where assignments and rank scratch files go.
    #[arg(long, env = "GANTRY_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// The address other ranks reach this worker's ranks on.
    #[arg(long, env = "GANTRY_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Address of the HTTP endpoint with /metrics, /healthz and /readyz (default: none).
    #[arg(long, env = "GANTRY_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as text or as JSON objects (default text).
    #[arg(long, env = "GANTRY_LOG_FORMAT", value_enum)]
    pub log_format: Option<gantry_ops::LogFormat>,
    /// On SIGTERM, how long ranks get to checkpoint and stop before they are killed (default 60).
    #[arg(long, env = "GANTRY_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Print the effective configuration (JSON) and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    coordinator: Option<String>,
    slots: Option<u32>,
    work_dir: Option<PathBuf>,
    advertise_host: Option<String>,
    metrics_listen: Option<std::net::SocketAddr>,
    log_format: Option<gantry_ops::LogFormat>,
    drain_timeout_secs: Option<u64>,
    /// Checkpoint store options for every job's ranks, e.g. `aws_endpoint`, `aws_region`,
    /// `azure_storage_account_name`; never a credential.
    #[serde(
        default,
        deserialize_with = "gantry_core::store_options::scalars_as_strings"
    )]
    object_store: std::collections::BTreeMap<String, String>,
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl DaemonArgs {
    /// The effective options; ranks are run by this same executable's `rank` subcommand.
    pub fn options(&self) -> anyhow::Result<AgentOptions> {
        let file: FileConfig =
            gantry_core::read_config_file(self.config.as_deref()).map_err(anyhow::Error::msg)?;
        let slots = self.slots.or(file.slots).unwrap_or(1);
        anyhow::ensure!(slots > 0, "slots: must be at least 1");
        for key in file.object_store.keys() {
            gantry_core::store_options::canonical(None, key)
                .map_err(|e| anyhow::anyhow!("object_store.{key}: {e}"))?;
        }
        Ok(AgentOptions {
            coordinator: self
                .coordinator
                .clone()
                .or(file.coordinator)
                .unwrap_or_else(|| "http://127.0.0.1:7070".into()),
            slots,
            work_dir: self
                .work_dir
                .clone()
                .or(file.work_dir)
                .unwrap_or_else(|| std::env::temp_dir().join("gantry-worker")),
            hostname: hostname(),
            advertise_host: self
                .advertise_host
                .clone()
                .or(file.advertise_host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            rank_command: vec![
                std::env::current_exe()?.display().to_string(),
                "rank".into(),
            ],
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            drain_timeout_secs: self
                .drain_timeout_secs
                .or(file.drain_timeout_secs)
                .unwrap_or(60),
            store_options: file.object_store,
        })
    }

    /// The log format: flag or variable, then the file, then text.
    pub fn log_format(&self) -> anyhow::Result<gantry_ops::LogFormat> {
        let file: FileConfig =
            gantry_core::read_config_file(self.config.as_deref()).map_err(anyhow::Error::msg)?;
        Ok(self.log_format.or(file.log_format).unwrap_or_default())
    }
}

/// Object-store credentials the usual variables name, which may instead come from files (as a
/// mounted Kubernetes Secret): `AWS_SECRET_ACCESS_KEY_FILE=/path` sets `AWS_SECRET_ACCESS_KEY`
/// from that file, for this daemon and the ranks it starts. Call before any thread starts.
pub fn load_secret_files() -> anyhow::Result<()> {
    const SECRETS: [&str; 6] = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_KEY",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
    ];
    for name in SECRETS {
        if let Ok(path) = std::env::var(format!("{name}_FILE")) {
            let value = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("{name}_FILE={path}: {e}"))?;
            // SAFETY: called at startup, before the runtime or any other thread exists.
            unsafe { std::env::set_var(name, value.trim_end()) };
        }
    }
    Ok(())
}
