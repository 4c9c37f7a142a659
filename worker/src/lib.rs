//! Gantry's worker: the daemon (`agent`) that runs rank processes for the coordinator, and the
//! `runtime` that runs inside each rank process.

pub mod agent;
pub mod config;
pub mod metrics;
pub mod runtime;
