//! The scheduling loop: waiting jobs are placed oldest first, and a job that does not fit
//! leaves room for later, smaller ones (backfill). Where ranks go is `scheduler::plan`'s call;
//! which workers it may use, `policy::avoid`'s.

use super::{Assignment, Core, RankKey, WorkerCommand};
use crate::error::CoordinatorError;
use crate::policy::avoid::{self, Candidate};
use crate::scheduler;
use gantry_core::{JobId, Mesh, Rank, WorkerId};
use std::collections::HashMap;

impl Core {
    pub(super) fn used_slots(&self) -> HashMap<WorkerId, u32> {
        let mut used = HashMap::new();
        for job in self.jobs.values() {
            for w in job.state.placement().unwrap_or_default() {
                *used.entry(w.clone()).or_default() += 1;
            }
        }
        used
    }

    /// Places waiting jobs, oldest first; a job that does not fit gets the reason and later,
    /// smaller jobs may still start (backfill).
    pub(super) fn schedule(&mut self, now_ms: i64) -> Result<(), CoordinatorError> {
        let used = self.used_slots();
        let candidates: Vec<Candidate> = self
            .workers
            .values()
            .map(|w| Candidate {
                worker: w.id.clone(),
                free: w
                    .slots
                    .saturating_sub(used.get(&w.id).copied().unwrap_or(0)),
                alive: w.is_alive(),
                connected: self.sessions.contains_key(&w.id),
                draining: self.draining.contains(&w.id),
                recent_failures: self.worker_failures.recent(&w.id, now_ms),
            })
            .collect();
        let mut pools = avoid::pools(&candidates);
        let waiting: Vec<JobId> = self
            .order
            .iter()
            .filter(|id| self.jobs[*id].state.wants_slots())
            .cloned()
            .collect();
        for id in waiting {
            if self.jobs[&id].not_before_ms > now_ms {
                continue; // restart backoff; a later tick places it
            }
            let p = self.jobs[&id].spec.parallel;
            let mesh = Mesh::new(p.dp, p.tp, p.pp);
            let planned = scheduler::plan(&pools.preferred(), mesh)
                .or_else(|_| scheduler::plan(&pools.usable, mesh));
            match planned {
                Ok(placement) => {
                    if !self.update_job(&id, now_ms, |job| job.to_scheduled(placement.clone()))? {
                        continue;
                    }
                    for w in &placement {
                        let slot = pools
                            .usable
                            .iter_mut()
                            .find(|f| &f.worker == w)
                            .expect("planned");
                        slot.free -= 1;
                    }
                    self.last_progress_ms.insert(id.clone(), now_ms);
                    let attempt = self.jobs[&id].attempt;
                    self.store.start_attempt(&id, attempt, &placement, now_ms)?;
                    let mut hosts: Vec<&str> = placement.iter().map(|w| w.0.as_str()).collect();
                    hosts.dedup();
                    self.note(
                        &id,
                        now_ms,
                        &format!("attempt {attempt} scheduled on {}", hosts.join(", ")),
                    )?;
                    for (rank, w) in placement.iter().enumerate() {
                        self.send_assignment(&id, Rank(rank as u32), w);
                    }
                }
                Err(why) => {
                    let why = Some(why.to_string());
                    if self
                        .jobs
                        .get_mut(&id)
                        .expect("listed")
                        .set_waiting_reason(why)
                    {
                        self.update_job(&id, now_ms, |_| Ok(()))?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn send_assignment(&mut self, id: &JobId, rank: Rank, worker: &WorkerId) {
        let job = &self.jobs[id];
        let assignment = Assignment {
            key: RankKey {
                job: id.clone(),
                attempt: job.attempt,
                rank,
            },
            spec: job.spec.clone(),
            resume_step: job.resume_step,
        };
        self.send(worker, WorkerCommand::Assign(Box::new(assignment)));
    }
}
