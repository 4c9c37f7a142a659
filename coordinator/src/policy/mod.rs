//! The coordinator's decisions as pure functions of `now` and plain data, each returning the
//! decision together with its reason, after torchft's `quorum_compute(now, state, opt)`. No
//! store, session or clock inside: the core gathers the data, calls one, and carries out what
//! it returns, so each decision is tested on its own.
//!
//! - [`restart`]: what a rank's exit means, and restart (after which backoff) or give up;
//! - [`avoid`]: which workers placement avoids (lost, draining, flaky);
//! - [`hang`]: whether an attempt hangs;
//! - [`reconcile`]: what to do with a reconnected worker's running ranks;
//! - [`stores`]: which stores and endpoints a spec may make workers reach.

pub mod avoid;
pub mod hang;
pub mod reconcile;
pub mod restart;
pub mod stores;
