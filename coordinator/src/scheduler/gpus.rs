//! Gang placement of a `cuda` job: every rank gets a GPU of its own, a pure function of plain
//! data like [`super::plan`].
//!
//! Unlike slots, a tensor-parallel group is never spread over workers here: its ranks exchange
//! activations every layer, which NVLink or PCIe inside one host carries and a network between
//! hosts would make the bottleneck of every step. So a job that fits only by splitting a group
//! waits, with a reason that says so.

use gantry_core::{Mesh, WorkerId};
use std::fmt;

/// One GPU no live rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeGpu {
    /// The CUDA device index on its worker.
    pub index: u32,
    /// 0: the worker did not say (a GPU declared in its config), which never refuses a rank.
    pub memory_bytes: u64,
}

/// One worker's room for `cuda` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeGpus {
    pub worker: WorkerId,
    /// Free slots: a cuda rank is a process like any other, so it takes one as well.
    pub slots: u32,
    pub gpus: Vec<FreeGpu>,
}

/// Why a `cuda` job could not be placed now; shown as the job's pending reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct GpusUnplaceable {
    /// GPUs the job needs (one per rank).
    pub needed: u32,
    /// Ranks of a tensor-parallel group, which must share a worker.
    pub tp: u32,
    /// GPUs ranks could use now: free, with a free slot beside them and enough memory.
    pub free: u32,
    /// Usable workers looked at, with GPUs or without.
    pub workers: usize,
    /// Free GPUs left out because a rank does not fit their memory.
    pub too_small: u32,
}

impl fmt::Display for GpusUnplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "needs {} GPUs (cuda)", self.needed)?;
        if self.tp > 1 {
            write!(f, " in groups of {} on one worker", self.tp)?;
        }
        write!(f, ", {} free on {} workers", self.free, self.workers)?;
        if self.too_small > 0 {
            write!(f, " ({} more too small for a rank)", self.too_small)?;
        }
        Ok(())
    }
}

/// The GPUs of `w` a rank needing `per_rank_bytes` may use, lowest index first, as many as its
/// free slots allow; and how many free ones were too small.
fn usable(w: &FreeGpus, per_rank_bytes: u64) -> (Vec<u32>, u32) {
    let (mut fit, small): (Vec<&FreeGpu>, Vec<&FreeGpu>) = w
        .gpus
        .iter()
        .partition(|g| g.memory_bytes == 0 || g.memory_bytes >= per_rank_bytes);
    let mut fit: Vec<u32> = fit.drain(..).map(|g| g.index).collect();
    fit.sort_unstable();
    fit.dedup();
    fit.truncate(w.slots as usize);
    (fit, small.len() as u32)
}

/// Places every rank of `mesh` on a GPU of its own whose memory holds `per_rank_bytes`, each
/// tensor-parallel group on one worker. Returns each rank's worker and GPU index, by rank.
pub fn plan_gpus(
    workers: &[FreeGpus],
    mesh: Mesh,
    per_rank_bytes: u64,
) -> Result<Vec<(WorkerId, u32)>, GpusUnplaceable> {
    let needed = mesh.world_size();
    // Most usable GPUs first, ties by id, so the plan does not depend on the order of
    // `workers` and replicas pack onto as few hosts as they can.
    let mut too_small = 0;
    let mut pool: Vec<(WorkerId, Vec<u32>)> = workers
        .iter()
        .map(|w| {
            let (fit, small) = usable(w, per_rank_bytes);
            too_small += small;
            (w.worker.clone(), fit)
        })
        .collect();
    pool.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    let free: u32 = pool.iter().map(|(_, g)| g.len() as u32).sum();
    // Groups are all the same size, so first fit places as many as can be placed at all: the
    // sum over workers of how many whole groups each holds.
    let groups: u32 = pool.iter().map(|(_, g)| g.len() as u32 / mesh.tp).sum();
    if groups < needed / mesh.tp {
        return Err(GpusUnplaceable {
            needed,
            tp: mesh.tp,
            free,
            workers: workers.len(),
            too_small,
        });
    }
    let mut placement = Vec::with_capacity(needed as usize);
    for _group in 0..needed / mesh.tp {
        let (worker, gpus) = pool
            .iter_mut()
            .find(|(_, g)| g.len() as u32 >= mesh.tp)
            .expect("whole groups were counted above");
        for index in gpus.drain(..mesh.tp as usize) {
            placement.push((worker.clone(), index));
        }
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const GIB: u64 = 1 << 30;

    /// Workers by (free slots, memory of each free GPU in GiB).
    fn workers(spec: &[(u32, &[u64])]) -> Vec<FreeGpus> {
        spec.iter()
            .enumerate()
            .map(|(i, (slots, gpus))| FreeGpus {
                worker: WorkerId(format!("w{i}")),
                slots: *slots,
                gpus: gpus
                    .iter()
                    .enumerate()
                    .map(|(index, gib)| FreeGpu {
                        index: index as u32,
                        memory_bytes: gib * GIB,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Post-conditions of any successful plan, read off `plan_gpus`'s contract.
    fn check(
        workers: &[FreeGpus],
        mesh: Mesh,
        need: u64,
        placement: &[(WorkerId, u32)],
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(placement.len() as u32, mesh.world_size());
        let mut seen = HashSet::new();
        for (rank, (w, index)) in placement.iter().enumerate() {
            // Only on a worker that has that GPU free, and that GPU big enough.
            let worker = workers.iter().find(|f| &f.worker == w);
            let gpu = worker.and_then(|f| f.gpus.iter().find(|g| g.index == *index));
            prop_assert!(
                gpu.is_some(),
                "rank {} on {}:{}, not a free GPU",
                rank,
                w,
                index
            );
            let gpu = gpu.unwrap();
            prop_assert!(gpu.memory_bytes == 0 || gpu.memory_bytes >= need);
            // No GPU twice.
            prop_assert!(seen.insert((w.clone(), *index)), "{}:{} twice", w, index);
        }
        for w in workers {
            let ranks = placement.iter().filter(|(p, _)| p == &w.worker).count();
            prop_assert!(ranks as u32 <= w.slots, "{} over its slots", w.worker);
        }
        for first in (0..mesh.world_size()).step_by(mesh.tp as usize) {
            let group = mesh.tp_group(first);
            let host = &placement[group[0] as usize].0;
            prop_assert!(group.iter().all(|r| &placement[*r as usize].0 == host));
        }
        Ok(())
    }

    #[test]
    fn a_cpu_only_cluster_refuses_with_a_reason() {
        let err = plan_gpus(
            &workers(&[(4, &[]), (4, &[]), (4, &[])]),
            Mesh::new(2, 1, 1),
            0,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "needs 2 GPUs (cuda), 0 free on 3 workers");
    }

    #[test]
    fn a_tp_group_is_not_split_even_when_the_gpus_add_up() {
        let ws = workers(&[(2, &[80, 80]), (2, &[80, 80])]);
        let err = plan_gpus(&ws, Mesh::new(1, 4, 1), GIB).unwrap_err();
        assert_eq!(
            err.to_string(),
            "needs 4 GPUs (cuda) in groups of 4 on one worker, 4 free on 2 workers"
        );
    }

    #[test]
    fn small_gpus_are_left_out_and_said_so() {
        let ws = workers(&[(4, &[8, 40, 8])]);
        let err = plan_gpus(&ws, Mesh::new(2, 1, 1), 16 * GIB).unwrap_err();
        assert_eq!(
            err.to_string(),
            "needs 2 GPUs (cuda), 1 free on 1 workers (2 more too small for a rank)"
        );
        let p = plan_gpus(&ws, Mesh::new(1, 1, 1), 16 * GIB).unwrap();
        assert_eq!(p, [(WorkerId("w0".into()), 1)]);
    }

    #[test]
    fn a_slot_is_needed_beside_each_gpu() {
        let ws = workers(&[(1, &[80, 80])]);
        assert_eq!(plan_gpus(&ws, Mesh::new(2, 1, 1), 0).unwrap_err().free, 1);
    }

    #[test]
    fn groups_pack_onto_the_roomiest_worker_and_get_distinct_gpus() {
        let ws = workers(&[(8, &[80, 80]), (8, &[80, 80, 80, 80])]);
        let p = plan_gpus(&ws, Mesh::new(3, 2, 1), GIB).unwrap();
        let names: Vec<(&str, u32)> = p.iter().map(|(w, i)| (w.0.as_str(), *i)).collect();
        assert_eq!(
            names,
            [
                ("w1", 0),
                ("w1", 1),
                ("w1", 2),
                ("w1", 3),
                ("w0", 0),
                ("w0", 1)
            ]
        );
    }

    /// A cluster of 1 to 6 workers, some without GPUs, each GPU of 8, 16, 40 or 80 GiB (0:
    /// unknown), the GPUs of a worker with distinct indices but not always from 0 (some taken).
    fn clusters() -> impl Strategy<Value = Vec<FreeGpus>> {
        let gpu = prop::sample::select(vec![0u64, 8, 16, 40, 80]);
        let worker = (0u32..9, prop::collection::vec((gpu, 0u32..3), 0..6));
        prop::collection::vec(worker, 1..7).prop_map(|ws| {
            ws.into_iter()
                .enumerate()
                .map(|(i, (slots, gpus))| {
                    let mut index = 0;
                    let gpus = gpus
                        .into_iter()
                        .map(|(gib, skip)| {
                            index += skip;
                            let g = FreeGpu {
                                index,
                                memory_bytes: gib * GIB,
                            };
                            index += 1;
                            g
                        })
                        .collect();
                    FreeGpus {
                        worker: WorkerId(format!("w{i}")),
                        slots,
                        gpus,
                    }
                })
                .collect()
        })
    }

    fn meshes() -> impl Strategy<Value = Mesh> {
        (1u32..4, 1u32..5, 1u32..3).prop_map(|(dp, tp, pp)| Mesh::new(dp, tp, pp))
    }

    proptest! {
        /// A plan puts each rank on a free GPU of its own with room for it, on a worker with a
        /// slot for it, and each tensor-parallel group on one worker; and it is refused only
        /// when the usable GPUs hold fewer whole groups than the job has.
        #[test]
        fn every_plan_meets_the_post_conditions(
            ws in clusters(),
            mesh in meshes(),
            need in prop::sample::select(vec![0u64, GIB, 12 * GIB, 60 * GIB]),
        ) {
            match plan_gpus(&ws, mesh, need) {
                Ok(p) => check(&ws, mesh, need, &p)?,
                Err(e) => {
                    let groups: u32 = ws
                        .iter()
                        .map(|w| usable(w, need).0.len() as u32 / mesh.tp)
                        .sum();
                    prop_assert!(groups < mesh.dp * mesh.pp, "refused with room: {}", e);
                    prop_assert_eq!(e.needed, mesh.world_size());
                    prop_assert_eq!(e.workers, ws.len());
                }
            }
        }

        /// The same cluster listed in another order gives the same plan.
        #[test]
        fn a_plan_does_not_depend_on_the_order_of_the_workers(
            (ws, shuffled) in clusters().prop_flat_map(|ws| (Just(ws.clone()), Just(ws).prop_shuffle())),
            mesh in meshes(),
        ) {
            prop_assert_eq!(plan_gpus(&ws, mesh, GIB), plan_gpus(&shuffled, mesh, GIB));
        }
    }
}
