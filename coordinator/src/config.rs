//! The coordinator's settings in layers, through the `config` crate: defaults, then a config
//! file, then `GANTRY_*` environment variables and flags (each layer wins over the ones
//! before). Unknown keys in the file are an error.

use crate::Options;
use clap::Parser;
use gantry_ops::LogFormat;
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
    /// A TOML, YAML or JSON file with any of the keys below (in snake_case).
    #[arg(long, env = "GANTRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on (default 127.0.0.1:7070).
    #[arg(long, env = "GANTRY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the state database and the default checkpoint store (default .gantry).
    #[arg(long, env = "GANTRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A worker that sends nothing for this long is declared lost (default 10000).
    #[arg(long, env = "GANTRY_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// How often workers are asked to send a heartbeat (default 1000).
    #[arg(long, env = "GANTRY_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Where checkpoints of jobs that name no `checkpoint.url` go, e.g. s3://bucket/prefix
    /// (default file://<state_dir>/checkpoints).
    #[arg(long, env = "GANTRY_CHECKPOINT_URL")]
    pub checkpoint_url: Option<String>,
    /// Address of the HTTP endpoint with /metrics, /healthz and /readyz (default: none).
    #[arg(long, env = "GANTRY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM, report NOT_SERVING for this long before stopping (default 0).
    #[arg(long, env = "GANTRY_DRAIN_MS")]
    pub drain_ms: Option<u64>,
    /// Serve every call without a token, as an admin: anyone who can reach the coordinator
    /// controls it. For a throwaway cluster on a trusted machine only.
    #[arg(long, env = "GANTRY_INSECURE")]
    pub insecure: bool,
    /// A file holding the admin token to accept (e.g. a mounted Secret); by default the
    /// coordinator writes one to <state_dir>/admin.token when it has none.
    #[arg(long, env = "GANTRY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A file holding the join token workers present; by default the coordinator writes one to
    /// <state_dir>/join.token when it has none.
    #[arg(long, env = "GANTRY_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// The server certificate (PEM), with --tls-key; by default the coordinator makes a CA and
    /// a certificate under <state_dir>/tls/ and serves that (clients verify with its ca.pem).
    #[arg(long, env = "GANTRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "GANTRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A DNS name or IP address a generated certificate is valid for, besides loopback and this
    /// host (the address workers and clients use); repeat it for more.
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,
    /// A URL prefix every store a job names (checkpoint.url, data.source, model.init_from, and
    /// endpoint options) must start with, e.g. s3://team-bucket/ or http://minio.storage:9000;
    /// repeat it for more. None: any, but never a link-local or cloud metadata address.
    #[arg(long = "allowed-store", value_name = "PREFIX")]
    pub allowed_stores: Vec<String>,
    /// Log lines as text or as JSON objects (default text).
    #[arg(long, env = "GANTRY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Print the effective configuration (JSON) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The settings once every layer is applied, as the config file spells them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layered {
    listen: SocketAddr,
    state_dir: PathBuf,
    lease_ttl_ms: u64,
    heartbeat_interval_ms: u64,
    checkpoint_url: Option<String>,
    metrics_listen: Option<SocketAddr>,
    drain_ms: u64,
    log_format: LogFormat,
    insecure: bool,
    admin_token_file: Option<PathBuf>,
    join_token_file: Option<PathBuf>,
    #[serde(default)]
    allowed_stores: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_names: Vec<String>,
    max_message_bytes: usize,
    max_spec_bytes: usize,
    max_watch_streams: usize,
    rate_limit_per_sec: u32,
    rate_limit_burst: u32,
}

/// Everything the coordinator binary runs with.
#[derive(Debug, serde::Serialize)]
pub struct Settings {
    #[serde(flatten)]
    pub options: Options,
    pub log_format: LogFormat,
}

impl Args {
    /// The effective settings, from the `config` crate's layers: the defaults
    /// (`Options::new`, `gantry_core::defaults`), then the config file (read once), then
    /// `GANTRY_*` variables and flags (clap reads both), then validation.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let defaults = Options::new(
            gantry_core::defaults::COORDINATOR_LISTEN
                .parse()
                .expect("valid"),
            PathBuf::from(".gantry"),
        );
        let layers = config::Config::builder()
            .set_default("listen", defaults.listen.to_string())?
            .set_default("state_dir", defaults.state_dir.display().to_string())?
            .set_default("lease_ttl_ms", defaults.lease_ttl_ms)?
            .set_default("heartbeat_interval_ms", defaults.heartbeat_interval_ms)?
            .set_default("drain_ms", defaults.drain_ms)?
            .set_default("log_format", LogFormat::default().as_str())?
            .set_default("insecure", false)?
            .set_default("max_message_bytes", defaults.max_message_bytes as u64)?
            .set_default("max_spec_bytes", defaults.limits.max_spec_bytes as u64)?
            .set_default(
                "max_watch_streams",
                defaults.limits.max_watch_streams as u64,
            )?
            .set_default("rate_limit_per_sec", defaults.rate_limit_per_sec)?
            .set_default("rate_limit_burst", defaults.rate_limit_burst)?
            .set_override_option("listen", self.listen.map(|a| a.to_string()))?
            .set_override_option(
                "state_dir",
                self.state_dir.as_ref().map(|p| p.display().to_string()),
            )?
            .set_override_option("lease_ttl_ms", self.lease_ttl_ms)?
            .set_override_option("heartbeat_interval_ms", self.heartbeat_interval_ms)?
            .set_override_option("checkpoint_url", self.checkpoint_url.clone())?
            .set_override_option("metrics_listen", self.metrics_listen.map(|a| a.to_string()))?
            .set_override_option("drain_ms", self.drain_ms)?
            .set_override_option("log_format", self.log_format.map(LogFormat::as_str))?
            .set_override_option("insecure", self.insecure.then_some(true))?
            .set_override_option(
                "admin_token_file",
                self.admin_token_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
            )?
            .set_override_option(
                "tls_cert",
                self.tls_cert.as_ref().map(|p| p.display().to_string()),
            )?
            .set_override_option(
                "tls_key",
                self.tls_key.as_ref().map(|p| p.display().to_string()),
            )?
            .set_override_option(
                "tls_names",
                (!self.tls_names.is_empty()).then(|| self.tls_names.clone()),
            )?
            .set_override_option(
                "allowed_stores",
                (!self.allowed_stores.is_empty()).then(|| self.allowed_stores.clone()),
            )?
            .set_override_option(
                "join_token_file",
                self.join_token_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
            )?;
        let layered: Layered = gantry_ops::layered_settings(layers, self.config.as_deref())?;
        let options = Options {
            listen: layered.listen,
            state_dir: layered.state_dir,
            lease_ttl_ms: layered.lease_ttl_ms,
            heartbeat_interval_ms: layered.heartbeat_interval_ms,
            checkpoint_url: layered.checkpoint_url,
            metrics_listen: layered.metrics_listen,
            drain_ms: layered.drain_ms,
            insecure: layered.insecure,
            admin_token: layered
                .admin_token_file
                .as_deref()
                .map(|f| gantry_ops::read_token_file(f, "admin_token_file"))
                .transpose()?,
            join_token: layered
                .join_token_file
                .as_deref()
                .map(|f| gantry_ops::read_token_file(f, "join_token_file"))
                .transpose()?,
            allowed_stores: layered.allowed_stores,
            tls: match (layered.tls_cert, layered.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
                (None, None) => None,
                _ => anyhow::bail!("tls_cert and tls_key: give both or neither"),
            },
            tls_names: layered.tls_names,
            limits: crate::service::Limits {
                max_spec_bytes: layered.max_spec_bytes,
                max_watch_streams: layered.max_watch_streams,
            },
            max_message_bytes: layered.max_message_bytes,
            rate_limit_per_sec: layered.rate_limit_per_sec,
            rate_limit_burst: layered.rate_limit_burst,
        };
        anyhow::ensure!(
            options.limits.max_spec_bytes > 0
                && options.limits.max_spec_bytes <= options.max_message_bytes,
            "max_spec_bytes ({}) must be positive and at most max_message_bytes ({})",
            options.limits.max_spec_bytes,
            options.max_message_bytes
        );
        anyhow::ensure!(
            options.heartbeat_interval_ms > 0
                && options.heartbeat_interval_ms < options.lease_ttl_ms,
            "heartbeat_interval_ms ({}) must be positive and below lease_ttl_ms ({})",
            options.heartbeat_interval_ms,
            options.lease_ttl_ms
        );
        if let Some(url) = &options.checkpoint_url {
            anyhow::ensure!(
                url.starts_with("file://") || url.starts_with("s3://"),
                "checkpoint_url: {url:?} is neither file:// nor s3://"
            );
        }
        Ok(Settings {
            options,
            log_format: layered.log_format,
        })
    }
}
