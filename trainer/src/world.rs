//! The communicator a rank trains with: a full mesh of TCP connections between the ranks of a
//! cpu job, one NCCL communicator per group of the mesh between the GPU ranks of a cuda job.
//! Either way the ranks meet through the coordinator's rendezvous: a TCP rank sends the address
//! it listens on, an NCCL rank a fresh unique id for each group it leads (is the first member
//! of), and every rank gets all of them once the whole attempt has reported.

use gantry_collective::{UniqueId, World};
use gantry_core::Mesh;
use std::time::Duration;

/// An NCCL communicator to join: its members (global ranks, ascending) and its unique id.
pub type NcclGroup = (Vec<u32>, UniqueId);

/// The groups `rank` leads, each with a new id from `new_id`: what it sends to the rendezvous.
pub fn nccl_ids_to_send(
    mesh: Mesh,
    rank: u32,
    mut new_id: impl FnMut() -> anyhow::Result<UniqueId>,
) -> anyhow::Result<Vec<NcclGroup>> {
    mesh.groups(rank)
        .into_iter()
        .filter(|members| members[0] == rank)
        .map(|members| Ok((members, new_id()?)))
        .collect()
}

/// This rank's groups, in the order to join them, with the ids their leaders sent, from the
/// complete rendezvous table (every group id of the attempt).
pub fn nccl_ids_of(
    mesh: Mesh,
    rank: u32,
    table: &[(Vec<u32>, Vec<u8>)],
) -> anyhow::Result<Vec<NcclGroup>> {
    mesh.groups(rank)
        .into_iter()
        .map(|members| {
            let (_, id) = table.iter().find(|(m, _)| *m == members).ok_or_else(|| {
                anyhow::anyhow!(
                    "rendezvous: rank {} sent no NCCL id for group {members:?}",
                    members[0]
                )
            })?;
            let id: UniqueId = id.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "rendezvous: NCCL id of group {members:?} has {} bytes",
                    id.len()
                )
            })?;
            Ok((members, id))
        })
        .collect()
}

/// A fresh NCCL unique id.
#[cfg(feature = "cuda")]
pub fn new_nccl_id() -> anyhow::Result<UniqueId> {
    Ok(gantry_collective::nccl::NcclComm::unique_id()?)
}

#[cfg(not(feature = "cuda"))]
pub fn new_nccl_id() -> anyhow::Result<UniqueId> {
    // The device check refuses the job first; this only keeps the two builds' code paths equal.
    crate::device::cuda().map(|_| unreachable!("a build without CUDA has no CUDA device"))
}

/// Joins this rank's NCCL communicators on its GPU (device 0 of those it sees).
#[cfg(feature = "cuda")]
pub fn nccl(
    mesh: Mesh,
    rank: u32,
    groups: Vec<NcclGroup>,
    timeout: Duration,
) -> anyhow::Result<Box<dyn World>> {
    Ok(Box::new(gantry_collective::nccl::NcclWorld::connect(
        0,
        rank,
        mesh.world_size(),
        groups,
        timeout,
    )?))
}

#[cfg(not(feature = "cuda"))]
pub fn nccl(
    _mesh: Mesh,
    _rank: u32,
    _groups: Vec<NcclGroup>,
    _timeout: Duration,
) -> anyhow::Result<Box<dyn World>> {
    new_nccl_id().map(|_| unreachable!("a build without CUDA has no NCCL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank of a mesh sends the ids of the groups it leads; from the table of all of them,
    /// each rank finds an id for each of its groups, in the mesh's order, and the members of a
    /// group all find the same id: the one its leader created.
    #[test]
    fn every_member_of_a_group_joins_it_with_its_leaders_id() {
        for (dp, tp, pp) in [(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 2, 1), (1, 4, 2)] {
            let mesh = Mesh::new(dp, tp, pp);
            let mut next = 0u8;
            let mut table = Vec::new();
            let mut sent = std::collections::HashMap::new();
            for rank in 0..mesh.world_size() {
                let ids = nccl_ids_to_send(mesh, rank, || {
                    next += 1;
                    Ok([next; 128])
                })
                .unwrap();
                for (members, id) in ids {
                    assert_eq!(members[0], rank);
                    assert!(
                        sent.insert(members.clone(), id).is_none(),
                        "{members:?} twice"
                    );
                    table.push((members, id.to_vec()));
                }
            }
            for rank in 0..mesh.world_size() {
                let joined = nccl_ids_of(mesh, rank, &table).unwrap();
                let order: Vec<Vec<u32>> = joined.iter().map(|(m, _)| m.clone()).collect();
                assert_eq!(order, mesh.groups(rank));
                assert_eq!(order[0], (0..mesh.world_size()).collect::<Vec<_>>());
                for (members, id) in joined {
                    assert_eq!(sent[&members], id, "{mesh:?} rank {rank} {members:?}");
                }
            }
        }
    }

    #[test]
    fn a_missing_or_malformed_id_is_named() {
        let mesh = Mesh::new(2, 1, 1);
        let err = nccl_ids_of(mesh, 1, &[(vec![0, 1], vec![1; 128])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rendezvous: rank 1 sent no NCCL id for group [1]"
        );
        let err = nccl_ids_of(mesh, 1, &[(vec![0, 1], vec![1; 3])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rendezvous: NCCL id of group [0, 1] has 3 bytes"
        );
    }

    /// A cuda job's rank on a machine without CUDA (this one, CI) cannot create an id, and says
    /// what is missing; on a GPU machine's cuda build it gets one.
    #[test]
    fn an_nccl_id_without_cuda_is_a_clear_error() {
        match new_nccl_id() {
            Ok(id) => assert!(id.iter().any(|&b| b != 0)),
            Err(e) => {
                let err = format!("{e:#}");
                assert!(
                    err.contains("libcuda") || err.contains("libnccl") || err.contains("CUDA"),
                    "{err}"
                );
            }
        }
    }
}
