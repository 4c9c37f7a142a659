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
    /// GPUs to offer, instead of those the CUDA driver finds (builds with the `cuda` feature
    /// find them); 0 offers none. Each cuda rank takes a GPU and a slot.
    #[arg(long, env = "GANTRY_GPUS")]
    pub gpus: Option<u32>,
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
    /// A file holding the cluster's join token (the coordinator writes one to
    /// <state_dir>/join.token); GANTRY_JOIN_TOKEN gives the token itself.
    #[arg(long, env = "GANTRY_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// The coordinator's CA certificate (PEM), to verify an https:// coordinator (the
    /// coordinator's <state_dir>/tls/ca.pem, or the CA of the certificate it was given).
    #[arg(long, env = "GANTRY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print the effective configuration (JSON) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The daemon's settings once every layer is applied, as the config file spells them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    coordinator: String,
    slots: u32,
    /// None: discover them.
    gpus: Option<u32>,
    work_dir: PathBuf,
    advertise_host: String,
    metrics_listen: Option<std::net::SocketAddr>,
    log_format: gantry_ops::LogFormat,
    drain_timeout_secs: u64,
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
    /// The effective options, from the `config` crate's layers: the defaults
    /// (`gantry_core::defaults`), then the config file (read once), then `GANTRY_*` variables
    /// and flags (clap reads both), then validation. Ranks are run by this same executable's
    /// `rank` subcommand.
    pub fn options(&self) -> anyhow::Result<AgentOptions> {
        use gantry_core::defaults;
        let work_dir = std::env::temp_dir().join("gantry-worker");
        let log_format = self.log_format.map(gantry_ops::LogFormat::as_str);
        let layers = config::Config::builder()
            .set_default("coordinator", defaults::COORDINATOR_URL)?
            .set_default("slots", defaults::WORKER_SLOTS)?
            .set_default("work_dir", work_dir.display().to_string())?
            .set_default("advertise_host", defaults::ADVERTISE_HOST)?
            .set_default("log_format", gantry_ops::LogFormat::default().as_str())?
            .set_default("drain_timeout_secs", defaults::DRAIN_TIMEOUT_SECS)?
            .set_override_option("coordinator", self.coordinator.clone())?
            .set_override_option("slots", self.slots)?
            .set_override_option("gpus", self.gpus)?
            .set_override_option(
                "work_dir",
                self.work_dir.as_ref().map(|p| p.display().to_string()),
            )?
            .set_override_option("advertise_host", self.advertise_host.clone())?
            .set_override_option("metrics_listen", self.metrics_listen.map(|a| a.to_string()))?
            .set_override_option("log_format", log_format)?
            .set_override_option("drain_timeout_secs", self.drain_timeout_secs)?;
        let settings: Settings = gantry_ops::layered_settings(layers, self.config.as_deref())?;
        anyhow::ensure!(settings.slots > 0, "slots: must be at least 1");
        for key in settings.object_store.keys() {
            gantry_core::store_options::canonical(None, key)
                .map_err(|e| anyhow::anyhow!("object_store.{key}: {e}"))?;
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let gpus = crate::gpus::gpus(settings.gpus, visible.as_deref())?;
        Ok(AgentOptions {
            coordinator: settings.coordinator,
            slots: settings.slots,
            gpus,
            work_dir: settings.work_dir,
            hostname: hostname(),
            advertise_host: settings.advertise_host,
            rank_command: vec![
                std::env::current_exe()?.display().to_string(),
                "rank".into(),
            ],
            metrics_listen: settings.metrics_listen,
            drain_timeout_secs: settings.drain_timeout_secs,
            store_options: settings.object_store,
            log_format: settings.log_format,
            join_token: self.join_token()?,
            ca_cert: self
                .ca_cert
                .as_ref()
                .map(|file| {
                    std::fs::read(file)
                        .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", file.display()))
                })
                .transpose()?,
        })
    }

    /// The join token: `GANTRY_JOIN_TOKEN`, else the `--join-token-file`.
    fn join_token(&self) -> anyhow::Result<Option<String>> {
        if let Ok(token) = std::env::var("GANTRY_JOIN_TOKEN") {
            return Ok(Some(token.trim().to_string()));
        }
        self.join_token_file
            .as_deref()
            .map(|file| gantry_ops::read_token_file(file, "--join-token-file"))
            .transpose()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_gpus_reach_the_options_and_zero_offers_none() {
        let options = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["gantry-worker"], args].concat()).unwrap();
            cli.daemon.options()
        };
        if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() {
            let gpus = options(&["--gpus", "2"]).unwrap().gpus;
            assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1]);
        }
        assert_eq!(options(&["--gpus", "0"]).unwrap().gpus, []);
    }
}
