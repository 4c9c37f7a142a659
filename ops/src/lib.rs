//! Operations plumbing shared by the coordinator and the worker daemon: log output (text or
//! JSON lines) and one small HTTP endpoint with Prometheus metrics and health checks.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;

pub use prometheus_client;

/// How log lines are written to stderr.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the span fields (job, attempt, rank) as keys.
    Json,
}

impl LogFormat {
    /// The name config files and `--log-format` use.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// A daemon's settings from its layers, through the `config` crate: `layers` holds the defaults
/// and the overrides (flags and `GANTRY_*` variables, which clap has read); the config `file`,
/// read once when given, goes between the two (config-rs always ranks defaults lowest and
/// overrides highest). An error names the file.
pub fn layered_settings<T: serde::de::DeserializeOwned>(
    layers: config::ConfigBuilder<config::builder::DefaultState>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<T> {
    let layers = match file {
        Some(path) => layers.add_source(config::File::from(path)),
        None => layers,
    };
    layers
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| match file {
            Some(path) => anyhow::anyhow!("{}: {e}", path.display()),
            None => anyhow::anyhow!("{e}"),
        })
}

/// Installs the global tracing subscriber; `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Builds the metrics a scrape returns, from the daemon's state at that moment.
pub type Collect = Arc<dyn Fn(&mut Registry) + Send + Sync>;

/// Whether the daemon takes work: `/readyz` answers 503 once this is false (draining).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn ready() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves `GET /metrics` (Prometheus text format), `GET /healthz` (the process is up) and
/// `GET /readyz` (it takes work) on `listen` until `shutdown`. Returns the bound address.
pub async fn serve_http(
    listen: SocketAddr,
    collect: Collect,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let collect = collect.clone();
                async move { metrics(&collect) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                    }
                }
            }),
        );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(%addr, "metrics and health on http://{addr}/metrics");
    Ok(addr)
}

fn metrics(collect: &Collect) -> axum::response::Response {
    let mut registry = Registry::default();
    collect(&mut registry);
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A labelled gauge family of floats, the shape most scrape-time metrics take.
pub type Gauges = prometheus_client::metrics::family::Family<
    Vec<(String, String)>,
    prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
>;

/// Registers a new gauge family under `name` and returns it for filling.
pub fn gauges(registry: &mut Registry, name: &str, help: &str) -> Gauges {
    let family = Gauges::default();
    registry.register(name, help, family.clone());
    family
}

/// Labels from pairs of string slices.
pub fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes `bytes` to `path` (replacing it), readable and writable by its owner only: for
/// tokens, and for rank assignments, which hold their attempt's secret.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The token in `file` (a mounted Secret, `admin.token`, `join.token`), trimmed; refused, naming
/// `setting` and the file, when it cannot be read or is empty.
pub fn read_token_file(file: &std::path::Path, setting: &str) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("{setting} {}: {e}", file.display()))?;
    let token = token.trim();
    anyhow::ensure!(!token.is_empty(), "{setting} {}: empty", file.display());
    Ok(token.to_string())
}
