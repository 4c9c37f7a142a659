//! Which workers placement avoids: some not at all (lost, not connected, draining), flaky ones
//! only when the job fits nowhere else, so a worker that keeps killing ranks does not keep
//! getting them while a job still waiting is worse than a risky placement.

use crate::scheduler::FreeSlots;
use gantry_core::WorkerId;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A worker with this many failures of its own within [`FLAKY_WINDOW_MS`] is avoided for as
/// long, when the job fits elsewhere.
pub const FLAKY_FAILURES: usize = 2;
pub const FLAKY_WINDOW_MS: i64 = 10 * 60 * 1000;

/// Recent failures that were a worker's own (its lease expired, its rank was killed).
#[derive(Debug, Default)]
pub struct FailureLog(HashMap<WorkerId, Vec<i64>>);

impl FailureLog {
    /// Records a failure of `worker` at `now_ms`, forgetting those out of the window. Returns
    /// true when this failure is the one that makes the worker flaky.
    pub fn record(&mut self, worker: &WorkerId, now_ms: i64) -> bool {
        let failures = self.0.entry(worker.clone()).or_default();
        failures.retain(|t| now_ms - t < FLAKY_WINDOW_MS);
        failures.push(now_ms);
        failures.len() == FLAKY_FAILURES
    }

    /// How many failures of `worker` fall within the window at `now_ms`.
    pub fn recent(&self, worker: &WorkerId, now_ms: i64) -> usize {
        self.0.get(worker).map_or(0, |f| {
            f.iter().filter(|t| now_ms - **t < FLAKY_WINDOW_MS).count()
        })
    }
}

/// What placement needs to know about one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub worker: WorkerId,
    pub free: u32,
    /// Its lease holds.
    pub alive: bool,
    /// It has a session stream to send assignments down.
    pub connected: bool,
    /// It said it is shutting down.
    pub draining: bool,
    /// Its own failures within [`FLAKY_WINDOW_MS`].
    pub recent_failures: usize,
}

/// Why a worker is avoided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AvoidReason {
    Lost,
    NotConnected,
    Draining,
    Flaky { failures: usize },
}

impl fmt::Display for AvoidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AvoidReason::Lost => f.write_str("its lease expired"),
            AvoidReason::NotConnected => f.write_str("it has no session open"),
            AvoidReason::Draining => f.write_str("it is shutting down"),
            AvoidReason::Flaky { failures } => write!(
                f,
                "it failed {failures} times in the last {} min",
                FLAKY_WINDOW_MS / 60_000
            ),
        }
    }
}

/// How placement treats one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Avoid {
    /// Gets no ranks.
    Exclude(AvoidReason),
    /// Gets ranks only for a job that fits nowhere else.
    LastResort(AvoidReason),
}

/// Decides how placement treats `c`; `None`: like any other worker.
pub fn avoid(c: &Candidate) -> Option<Avoid> {
    if !c.alive {
        Some(Avoid::Exclude(AvoidReason::Lost))
    } else if !c.connected {
        Some(Avoid::Exclude(AvoidReason::NotConnected))
    } else if c.draining {
        Some(Avoid::Exclude(AvoidReason::Draining))
    } else if c.recent_failures >= FLAKY_FAILURES {
        Some(Avoid::LastResort(AvoidReason::Flaky {
            failures: c.recent_failures,
        }))
    } else {
        None
    }
}

/// The workers placement may use, and which of them only as a last resort.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pools {
    pub usable: Vec<FreeSlots>,
    pub last_resort: HashSet<WorkerId>,
}

impl Pools {
    /// The usable workers that are not a last resort.
    pub fn preferred(&self) -> Vec<FreeSlots> {
        self.usable
            .iter()
            .filter(|f| !self.last_resort.contains(&f.worker))
            .cloned()
            .collect()
    }
}

/// Sorts `candidates` into [`Pools`], in the order given.
pub fn pools(candidates: &[Candidate]) -> Pools {
    let mut pools = Pools::default();
    for c in candidates {
        match avoid(c) {
            Some(Avoid::Exclude(_)) => continue,
            Some(Avoid::LastResort(_)) => {
                pools.last_resort.insert(c.worker.clone());
            }
            None => {}
        }
        pools.usable.push(FreeSlots {
            worker: c.worker.clone(),
            free: c.free,
        });
    }
    pools
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str) -> Candidate {
        Candidate {
            worker: WorkerId(name.into()),
            free: 2,
            alive: true,
            connected: true,
            draining: false,
            recent_failures: 0,
        }
    }

    #[test]
    fn lost_unconnected_and_draining_workers_get_nothing_and_say_why() {
        let lost = Candidate {
            alive: false,
            ..candidate("a")
        };
        let away = Candidate {
            connected: false,
            ..candidate("b")
        };
        let draining = Candidate {
            draining: true,
            recent_failures: 5,
            ..candidate("c")
        };
        assert_eq!(avoid(&lost), Some(Avoid::Exclude(AvoidReason::Lost)));
        assert_eq!(
            avoid(&away),
            Some(Avoid::Exclude(AvoidReason::NotConnected))
        );
        assert_eq!(
            avoid(&draining),
            Some(Avoid::Exclude(AvoidReason::Draining)),
            "draining beats flaky"
        );
        assert_eq!(AvoidReason::Draining.to_string(), "it is shutting down");
        let p = pools(&[lost, away, draining, candidate("d")]);
        assert_eq!(
            p.usable,
            [FreeSlots {
                worker: WorkerId("d".into()),
                free: 2
            }]
        );
    }

    #[test]
    fn a_flaky_worker_is_a_last_resort() {
        let one = Candidate {
            recent_failures: 1,
            ..candidate("a")
        };
        let two = Candidate {
            recent_failures: 2,
            ..candidate("b")
        };
        assert_eq!(avoid(&one), None, "one failure is bad luck");
        assert_eq!(
            avoid(&two),
            Some(Avoid::LastResort(AvoidReason::Flaky { failures: 2 }))
        );
        assert_eq!(
            AvoidReason::Flaky { failures: 2 }.to_string(),
            "it failed 2 times in the last 10 min"
        );
        let p = pools(&[one, two]);
        assert_eq!(p.usable.len(), 2, "still usable");
        let preferred: Vec<String> = p.preferred().into_iter().map(|f| f.worker.0).collect();
        assert_eq!(preferred, ["a"]);
    }

    #[test]
    fn failures_age_out_of_the_window() {
        let w = WorkerId("w".into());
        let mut log = FailureLog::default();
        assert!(!log.record(&w, 0));
        assert!(log.record(&w, 1_000), "the second failure makes it flaky");
        assert_eq!(log.recent(&w, FLAKY_WINDOW_MS - 1), 2);
        assert_eq!(log.recent(&w, FLAKY_WINDOW_MS), 1);
        assert_eq!(log.recent(&w, FLAKY_WINDOW_MS + 1_000), 0);
        assert!(
            !log.record(&w, FLAKY_WINDOW_MS + 1_000),
            "old failures were forgotten"
        );
        assert_eq!(log.recent(&WorkerId("other".into()), 0), 0);
    }
}
