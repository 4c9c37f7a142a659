//! The defaults every component agrees on, written once: the daemons' configs, the CLI and the
//! local cluster of `gantry up` all read them from here.

/// Where the coordinator serves gRPC.
pub const COORDINATOR_LISTEN: &str = "127.0.0.1:7070";
/// Where clients and workers look for the coordinator (over TLS: it serves TLS unless it runs
/// `--insecure`).
pub const COORDINATOR_URL: &str = "https://127.0.0.1:7070";
/// The CA certificate clients read when none is named: the one `gantry up` makes in its
/// default state directory.
pub const CA_CERT_FILE: &str = ".gantry/tls/ca.pem";
/// The address a worker's ranks are reached on by other ranks.
pub const ADVERTISE_HOST: &str = "127.0.0.1";
/// Rank processes a worker runs at once.
pub const WORKER_SLOTS: u32 = 1;
/// How long ranks of a draining worker get to checkpoint and stop before they are killed.
pub const DRAIN_TIMEOUT_SECS: u64 = 60;
