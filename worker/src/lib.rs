//! Gantry's worker daemon: it registers with the coordinator, keeps a session with it, runs one
//! OS process per assigned rank and relays what they report. What runs inside a rank process is
//! the `gantry-trainer` crate; this crate knows ranks only by their contract in `gantry-core`
//! (the assignment, the events, the exit codes), so it has no burn in it.

pub mod agent;
pub mod config;
pub mod gpus;
pub mod metrics;
