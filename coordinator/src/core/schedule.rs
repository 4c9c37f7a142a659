//! The scheduling loop: waiting jobs are placed oldest first, and a job that does not fit
//! leaves room for later, smaller ones (backfill). Where ranks go is `scheduler::plan`'s call,
//! or `scheduler::plan_gpus`'s for a cuda job; which workers they may use, `policy::avoid`'s.

use super::{Assignment, Core, RankKey, WorkerCommand};
use crate::error::CoordinatorError;
use crate::policy::avoid::{self, Candidate};
use crate::scheduler::{self, FreeGpu, FreeGpus, FreeSlots};
use gantry_core::spec::DeviceKind;
use gantry_core::{JobId, JobSpec, Mesh, Rank, WorkerId};
use std::collections::{HashMap, HashSet};

/// Each rank's worker, and for a cuda job each rank's GPU there (empty for a cpu job).
type Placement = (Vec<WorkerId>, Vec<u32>);

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

    /// The GPUs live attempts hold. A GPU is free again as soon as its attempt is no longer
    /// live, as a slot is: the placement is the only record of either.
    pub(super) fn used_gpus(&self) -> HashSet<(WorkerId, u32)> {
        let mut used = HashSet::new();
        for job in self.jobs.values() {
            let placement = job.state.placement().unwrap_or_default();
            for (w, gpu) in placement.iter().zip(job.state.gpus()) {
                used.insert((w.clone(), *gpu));
            }
        }
        used
    }

    /// The room for cuda ranks on `slots`' workers: their free slots and the GPUs not `taken`.
    fn gpu_room(&self, slots: &[FreeSlots], taken: &HashSet<(WorkerId, u32)>) -> Vec<FreeGpus> {
        slots
            .iter()
            .map(|f| FreeGpus {
                worker: f.worker.clone(),
                slots: f.free,
                gpus: self.workers[&f.worker]
                    .gpus
                    .iter()
                    .filter(|g| !taken.contains(&(f.worker.clone(), g.index)))
                    .map(|g| FreeGpu {
                        index: g.index,
                        memory_bytes: g.memory_bytes,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Where `spec`'s ranks go: on the preferred workers if they fit there, else on any usable
    /// one; the reason of the last refusal otherwise.
    fn place(
        &self,
        spec: &JobSpec,
        pools: &avoid::Pools,
        taken: &HashSet<(WorkerId, u32)>,
    ) -> Result<Placement, String> {
        let p = spec.parallel;
        let mesh = Mesh::new(p.dp, p.tp, p.pp);
        match spec.resources.device {
            DeviceKind::Cpu => scheduler::plan(&pools.preferred(), mesh)
                .or_else(|_| scheduler::plan(&pools.usable, mesh))
                .map(|workers| (workers, Vec::new()))
                .map_err(|e| e.to_string()),
            DeviceKind::Cuda => {
                let need = spec.memory_per_rank();
                let on = |slots: &[FreeSlots]| {
                    scheduler::plan_gpus(&self.gpu_room(slots, taken), mesh, need)
                };
                on(&pools.preferred())
                    .or_else(|_| on(&pools.usable))
                    .map(|ranks| ranks.into_iter().unzip())
                    .map_err(|e| e.to_string())
            }
        }
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
        let mut taken = self.used_gpus();
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
            match self.place(&self.jobs[&id].spec, &pools, &taken) {
                Ok((placement, gpus)) => {
                    let scheduled = self.update_job(&id, now_ms, |job| {
                        job.to_scheduled(placement.clone(), gpus.clone())
                    })?;
                    if !scheduled {
                        continue;
                    }
                    for (w, gpu) in placement.iter().zip(&gpus) {
                        taken.insert((w.clone(), *gpu));
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
                    let why = Some(why);
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
            gpu: job.state.gpus().get(rank.index()).copied(),
            secret: self.attempt_secret(id, job.attempt),
        };
        self.send(worker, WorkerCommand::Assign(Box::new(assignment)));
    }
}
