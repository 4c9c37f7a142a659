//! The coordinator's settings in layers: defaults, then a config file, then `GANTRY_*`
//! environment variables and flags (flags win). Unknown keys in the file are an error.

use crate::Options;
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "gantry-coordinator",
    version,
    about = "Gantry's coordinator daemon"
)]
pub struct Args {
    /// A TOML, YAML or JSON file with any of the keys below.
    #[arg(long, env = "GANTRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, env = "GANTRY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the state database and the default checkpoint store.
    #[arg(long, env = "GANTRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A worker that sends nothing for this long is declared lost.
    #[arg(long, env = "GANTRY_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// How often workers are asked to send a heartbeat.
    #[arg(long, env = "GANTRY_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    lease_ttl_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
}

impl Args {
    pub fn options(&self) -> anyhow::Result<Options> {
        let file: FileConfig =
            gantry_core::read_config_file(self.config.as_deref()).map_err(anyhow::Error::msg)?;
        let options = Options {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7070".parse().expect("valid")),
            state_dir: self
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(".gantry")),
            lease_ttl_ms: self.lease_ttl_ms.or(file.lease_ttl_ms).unwrap_or(10_000),
            heartbeat_interval_ms: self
                .heartbeat_interval_ms
                .or(file.heartbeat_interval_ms)
                .unwrap_or(1_000),
        };
        anyhow::ensure!(
            options.heartbeat_interval_ms > 0
                && options.heartbeat_interval_ms < options.lease_ttl_ms,
            "heartbeat_interval_ms ({}) must be positive and below lease_ttl_ms ({})",
            options.heartbeat_interval_ms,
            options.lease_ttl_ms
        );
        Ok(options)
    }
}
