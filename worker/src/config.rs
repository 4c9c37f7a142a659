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
    /// Print the effective configuration and exit.
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
        })
    }
}
