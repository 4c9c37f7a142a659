//! The rank mesh, Megatron-style: tensor-parallel ranks are innermost (consecutive ranks, so the
//! scheduler can keep a TP group on one worker), then data-parallel replicas, then pipeline
//! stages. The coordinator's placement and every rank's group derivation use this one layout.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    pub dp: u32,
    pub tp: u32,
    pub pp: u32,
}

/// A rank's position in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub pp: u32,
    pub dp: u32,
    pub tp: u32,
}

impl Mesh {
    pub fn new(dp: u32, tp: u32, pp: u32) -> Self {
        assert!(
            dp > 0 && tp > 0 && pp > 0,
            "mesh dimensions must be positive"
        );
        Self { dp, tp, pp }
    }

    pub fn world_size(&self) -> u32 {
        self.dp * self.tp * self.pp
    }

    pub fn coords(&self, rank: u32) -> Coords {
        assert!(rank < self.world_size(), "rank {rank} outside {self:?}");
        Coords {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        }
    }

    pub fn rank(&self, c: Coords) -> u32 {
        c.pp * self.dp * self.tp + c.dp * self.tp + c.tp
    }

    /// Ranks that share this rank's pipeline stage and tensor shard: they all-reduce gradients.
    pub fn dp_group(&self, rank: u32) -> Vec<u32> {
        let c = self.coords(rank);
        (0..self.dp)
            .map(|dp| self.rank(Coords { dp, ..c }))
            .collect()
    }

    /// Ranks that hold the shards of the same layers.
    pub fn tp_group(&self, rank: u32) -> Vec<u32> {
        let c = self.coords(rank);
        (0..self.tp)
            .map(|tp| self.rank(Coords { tp, ..c }))
            .collect()
    }

    /// The stages this rank's activations flow through, first to last.
    pub fn pp_group(&self, rank: u32) -> Vec<u32> {
        let c = self.coords(rank);
        (0..self.pp)
            .map(|pp| self.rank(Coords { pp, ..c }))
            .collect()
    }

    /// Every group `rank` runs collectives in, each once, in the order ranks set them up: the
    /// world, then its data-, tensor- and pipeline-parallel groups. A group whose members equal
    /// an earlier one's is left out (with dp alone, the dp group is the world), and since the
    /// order and the members depend only on the mesh, every member of a group lists it at the
    /// same position among the groups they share: communicators that block until all members
    /// join (NCCL's) are created without deadlock.
    pub fn groups(&self, rank: u32) -> Vec<Vec<u32>> {
        let world: Vec<u32> = (0..self.world_size()).collect();
        let mut groups = vec![world];
        for g in [
            self.dp_group(rank),
            self.tp_group(rank),
            self.pp_group(rank),
        ] {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_partition_the_world_and_round_trip() {
        for (dp, tp, pp) in [(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 2, 1), (1, 4, 2)] {
            let mesh = Mesh::new(dp, tp, pp);
            for rank in 0..mesh.world_size() {
                assert_eq!(mesh.rank(mesh.coords(rank)), rank);
                for group in [
                    mesh.dp_group(rank),
                    mesh.tp_group(rank),
                    mesh.pp_group(rank),
                ] {
                    assert!(group.contains(&rank));
                }
                assert_eq!(mesh.dp_group(rank).len() as u32, dp);
                assert_eq!(mesh.tp_group(rank).len() as u32, tp);
                assert_eq!(mesh.pp_group(rank).len() as u32, pp);
            }
            // Each group, as any member lists it, has the same members and comes in the same
            // order relative to the other groups two ranks share.
            for rank in 0..mesh.world_size() {
                let mine = mesh.groups(rank);
                for g in &mine {
                    assert!(g.contains(&rank) && g.windows(2).all(|w| w[0] < w[1]));
                    for &other in g {
                        let theirs = mesh.groups(other);
                        let shared = |list: &[Vec<u32>]| -> Vec<Vec<u32>> {
                            list.iter()
                                .filter(|h| mine.contains(h) && theirs.contains(h))
                                .cloned()
                                .collect()
                        };
                        assert_eq!(shared(&mine), shared(&theirs), "{mesh:?} {rank} {other}");
                    }
                }
            }
            // TP groups are runs of consecutive ranks.
            let tp0 = mesh.tp_group(0);
            assert_eq!(tp0, (0..tp).collect::<Vec<_>>());
        }
    }
}
