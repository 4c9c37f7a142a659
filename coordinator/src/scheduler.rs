//! Gang placement of a job's ranks onto worker slots: a pure function of plain data.
//!
//! All ranks of a job are placed or none. Ranks are laid out in mesh order (tensor-parallel
//! innermost, see [`gantry_core::Mesh`]), and each tensor-parallel group goes to a single worker
//! whenever some worker has that many free slots, because TP exchanges activations every layer.

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

    /// Post-conditions of any successful plan.
    fn check(workers: &[FreeSlots], mesh: Mesh, placement: &[WorkerId]) {
        assert_eq!(placement.len() as u32, mesh.world_size());
        let mut used: HashMap<&WorkerId, u32> = HashMap::new();
        for w in placement {
            *used.entry(w).or_default() += 1;
        }
        for (w, n) in used {
            let cap = workers.iter().find(|f| &f.worker == w).unwrap().free;
            assert!(n <= cap, "{w} over capacity: {n} > {cap}");
        }
        // A TP group is co-located whenever any worker could hold it.
        if workers.iter().all(|w| w.free % mesh.tp == 0) {
            for rank in (0..mesh.world_size()).step_by(mesh.tp as usize) {
                let group = mesh.tp_group(rank);
                let first = &placement[group[0] as usize];
                assert!(group.iter().all(|r| &placement[*r as usize] == first));
            }
        }
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
        check(&ws, Mesh::new(2, 1, 1), &p);
        assert_ne!(p[0], p[1]);
    }

    #[test]
    fn random_clusters_satisfy_the_post_conditions() {
        // A small deterministic generator: the property is checked on many shapes.
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = |n: u32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as u32
        };
        for _ in 0..2000 {
            let n_workers = 1 + next(6);
            let free: Vec<u32> = (0..n_workers).map(|_| next(9)).collect();
            let ws = workers(&free);
            let mesh = Mesh::new(1 + next(3), 1 + next(4), 1 + next(3));
            match plan(&ws, mesh) {
                Ok(p) => check(&ws, mesh, &p),
                Err(e) => assert!(free.iter().sum::<u32>() < mesh.world_size(), "{e}"),
            }
        }
    }
}
