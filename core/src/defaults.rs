//! The defaults every component agrees on, written once: the daemons' configs, the CLI and the
//! local cluster of `gantry up` all read them from here.

/// Where the coordinator serves gRPC.
pub const COORDINATOR_LISTEN: &str = "127.0.0.1:7070";
/// Where clients and workers look for the coordinator.
pub const COORDINATOR_URL: &str = "http://127.0.0.1:7070";
/// The address a worker's ranks are reached on by other ranks.
pub const ADVERTISE_HOST: &str = "127.0.0.1";
/// Rank processes a worker runs at once.
pub const WORKER_SLOTS: u32 = 1;
/// How long ranks of a draining worker get to checkpoint and stop before they are killed.
pub const DRAIN_TIMEOUT_SECS: u64 = 60;
