//! Gang placement of a job's ranks onto worker slots: a pure function of plain data.
//!
//! All ranks of a job are placed or none. Ranks are laid out in mesh order (tensor-parallel
//! innermost, see [`gantry_core::Mesh`]), and each tensor-parallel group goes to a single worker
//! whenever some worker has that many free slots, because TP exchanges activations every layer.
//! A `cuda` job is placed by [`plan_gpus`] instead, which also picks each rank's GPU.

mod gpus;

pub use gpus::{FreeGpu, FreeGpus, GpusUnplaceable, plan_gpus};

use gantry_core::{Mesh, WorkerId};

/// One worker's free capacity, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeSlots {
    pub worker: WorkerId,
    pub free: u32,
}

/// Why a job could not be placed now; shown to the user as the job's pending reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("needs {needed} slots, {free} free")]
pub struct Unplaceable {
    pub needed: u32,
    pub free: u32,
}

/// Places every rank of `mesh`. Returns the worker of each rank, indexed by rank.
pub fn plan(workers: &[FreeSlots], mesh: Mesh) -> Result<Vec<WorkerId>, Unplaceable> {
    let needed = mesh.world_size();
    let free: u32 = workers.iter().map(|w| w.free).sum();
    if free < needed {
        return Err(Unplaceable { needed, free });
    }
    // Most free slots first, ties by id, so placement is deterministic and packs replicas tightly.
    let mut pool: Vec<FreeSlots> = workers.iter().filter(|w| w.free > 0).cloned().collect();
    pool.sort_by(|a, b| b.free.cmp(&a.free).then_with(|| a.worker.cmp(&b.worker)));

    let mut placement = Vec::with_capacity(needed as usize);
    for _group in 0..needed / mesh.tp {
        let whole = pool.iter_mut().find(|w| w.free >= mesh.tp);
        match whole {
            Some(worker) => {
                worker.free -= mesh.tp;
                placement.extend(std::iter::repeat_n(worker.worker.clone(), mesh.tp as usize));
            }
            None => {
                // No worker holds the whole group: spread it, still gang-complete.
                for _ in 0..mesh.tp {
                    let worker = pool
                        .iter_mut()
                        .find(|w| w.free > 0)
                        .expect("total free slots were checked above");
                    worker.free -= 1;
                    placement.push(worker.worker.clone());
                }
            }
        }
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn workers(free: &[u32]) -> Vec<FreeSlots> {
        free.iter()
            .enumerate()
            .map(|(i, &free)| FreeSlots {
                worker: WorkerId(format!("w{i}")),
                free,
            })
            .collect()
    }

    /// Post-conditions of any successful plan, read off `plan`'s contract.
    fn check(
        workers: &[FreeSlots],
        mesh: Mesh,
        placement: &[WorkerId],
    ) -> Result<(), TestCaseError> {
        // Gang: every rank has a worker.
        prop_assert_eq!(placement.len() as u32, mesh.world_size());
        // No worker gets more ranks than it has free slots (and an unknown or full one none).
        let mut used: HashMap<&WorkerId, u32> = HashMap::new();
        for w in placement {
            *used.entry(w).or_default() += 1;
        }
        for (w, n) in &used {
            let cap = workers
                .iter()
                .find(|f| &f.worker == *w)
                .map_or(0, |f| f.free);
            prop_assert!(*n <= cap, "{} over capacity: {} > {}", w, n, cap);
        }
        // Tensor-parallel groups (consecutive ranks, TP innermost as Megatron lays them out)
        // are placed in rank order; a group is split over workers only when, after the groups
        // before it, no worker had room for all of it.
        for first in (0..mesh.world_size()).step_by(mesh.tp as usize) {
            let group = mesh.tp_group(first);
            let host = &placement[group[0] as usize];
            if group.iter().all(|r| &placement[*r as usize] == host) {
                continue;
            }
            let before = &placement[..first as usize];
            for w in workers {
                let left = w.free - before.iter().filter(|p| **p == w.worker).count() as u32;
                prop_assert!(
                    left < mesh.tp,
                    "tp group of rank {} split although {} had {} free",
                    first,
                    w.worker,
                    left
                );
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_with_a_reason_when_the_cluster_is_too_small() {
        let err = plan(&workers(&[1, 1]), Mesh::new(4, 1, 1)).unwrap_err();
        assert_eq!(err.to_string(), "needs 4 slots, 2 free");
    }

    #[test]
    fn dp_spreads_over_single_slot_workers() {
        let ws = workers(&[1, 1, 1]);
        let p = plan(&ws, Mesh::new(2, 1, 1)).unwrap();
        check(&ws, Mesh::new(2, 1, 1), &p).unwrap();
        assert_ne!(p[0], p[1]);
    }

    #[test]
    fn replicas_pack_onto_the_roomiest_worker_first() {
        let ws = workers(&[2, 4]);
        let p = plan(&ws, Mesh::new(2, 2, 1)).unwrap();
        let names: Vec<&str> = p.iter().map(|w| w.0.as_str()).collect();
        assert_eq!(names, ["w1", "w1", "w1", "w1"]);
    }

    fn clusters() -> impl Strategy<Value = Vec<FreeSlots>> {
        prop::collection::vec(0u32..9, 1..7).prop_map(|free| workers(&free))
    }

    fn meshes() -> impl Strategy<Value = Mesh> {
        (1u32..4, 1u32..5, 1u32..4).prop_map(|(dp, tp, pp)| Mesh::new(dp, tp, pp))
    }

    proptest! {
        /// A job is placed exactly when the free slots suffice, and then whole and within
        /// every worker's room, its tensor-parallel groups together where they can be.
        #[test]
        fn every_plan_meets_the_post_conditions(ws in clusters(), mesh in meshes()) {
            let free: u32 = ws.iter().map(|w| w.free).sum();
            match plan(&ws, mesh) {
                Ok(p) => check(&ws, mesh, &p)?,
                Err(e) => {
                    prop_assert!(free < mesh.world_size(), "refused with room: {}", e);
                    prop_assert_eq!(e, Unplaceable { needed: mesh.world_size(), free });
                }
            }
        }

        /// When every worker's room is a whole number of tensor-parallel groups, no group is
        /// ever split.
        #[test]
        fn tp_groups_are_never_split_when_slots_come_in_groups(
            groups in prop::collection::vec(0u32..4, 1..6),
            mesh in meshes(),
        ) {
            let free: Vec<u32> = groups.iter().map(|g| g * mesh.tp).collect();
            let ws = workers(&free);
            if let Ok(p) = plan(&ws, mesh) {
                for first in (0..mesh.world_size()).step_by(mesh.tp as usize) {
                    let group = mesh.tp_group(first);
                    let host = &p[group[0] as usize];
                    prop_assert!(group.iter().all(|r| &p[*r as usize] == host));
                }
            }
        }

        /// The placement depends on the workers and their room, not on the order they are
        /// listed in: the same cluster gives the same plan, so a replan is stable.
        #[test]
        fn a_plan_does_not_depend_on_the_order_of_the_workers(
            (ws, shuffled) in clusters().prop_flat_map(|ws| (Just(ws.clone()), Just(ws).prop_shuffle())),
            mesh in meshes(),
        ) {
            prop_assert_eq!(plan(&ws, mesh), plan(&shuffled, mesh));
        }
    }
}
