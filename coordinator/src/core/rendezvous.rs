//! The rendezvous: ranks of the live attempt report their data-plane addresses and get the
//! whole table once every rank has; the attempt is running from then on.

use super::{Core, RankKey};
use crate::error::CoordinatorError;
use crate::message::{NcclGroup, PeerTable, RendezvousTable};
use crate::state::{Job, JobState};
use gantry_core::{Mesh, Rank};

impl Core {
    /// A rank reports its data-plane address (a rank of a cuda job also the NCCL ids of the
    /// groups it leads). Returns the peer table once every rank has.
    pub fn rendezvous(
        &mut self,
        key: &RankKey,
        address: String,
        nccl_groups: Vec<NcclGroup>,
        now_ms: i64,
    ) -> Result<Option<PeerTable>, CoordinatorError> {
        if address.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "address: must not be empty".into(),
            ));
        }
        let job = self.job(&key.job)?;
        if job.attempt != key.attempt || job.state.placement().is_none() {
            return Err(CoordinatorError::Aborted(format!(
                "attempt {} of job {} is not live (live attempt: {})",
                key.attempt, key.job, job.attempt
            )));
        }
        let world = job.spec.parallel.world_size();
        if key.rank.get() >= world {
            return Err(CoordinatorError::InvalidArgument(format!(
                "key.rank: {} is outside the world of {world} ranks",
                key.rank
            )));
        }
        let p = job.spec.parallel;
        check_nccl_groups(Mesh::new(p.dp, p.tp, p.pp), key.rank, &nccl_groups)?;
        let table = self
            .rendezvous
            .entry((key.job.clone(), key.attempt))
            .or_insert_with(|| RendezvousTable {
                addresses: vec![None; world as usize],
                nccl_groups: vec![Vec::new(); world as usize],
            });
        table.addresses[key.rank.index()] = Some(address);
        // A rank asks again until the table is complete, each time with the same ids.
        table.nccl_groups[key.rank.index()] = nccl_groups;
        let complete = table
            .addresses
            .iter()
            .cloned()
            .collect::<Option<Vec<String>>>()
            .map(|addresses| PeerTable {
                addresses,
                nccl_groups: table.nccl_groups.concat(),
            });
        if complete.is_some()
            && matches!(self.jobs[&key.job].state, JobState::Scheduled { .. })
            && self.update_job(&key.job, now_ms, Job::to_running)?
        {
            self.note(
                &key.job,
                now_ms,
                &format!("attempt {} running", key.attempt),
            )?;
        }
        Ok(complete)
    }
}

/// A rank may send an id only for a group of its mesh that it leads (is the first member of),
/// each group once, each id of NCCL's 128 bytes.
fn check_nccl_groups(mesh: Mesh, rank: Rank, groups: &[NcclGroup]) -> Result<(), CoordinatorError> {
    let led: Vec<Vec<u32>> = mesh
        .groups(rank.get())
        .into_iter()
        .filter(|g| g[0] == rank.get())
        .collect();
    for (i, g) in groups.iter().enumerate() {
        let field = format!("nccl_groups[{i}]");
        if !led.contains(&g.members) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{field}.members: {:?} is not a group rank {rank} leads in a mesh of dp={} tp={} pp={} (it leads {led:?})",
                g.members, mesh.dp, mesh.tp, mesh.pp
            )));
        }
        if g.unique_id.len() != 128 {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{field}.unique_id: {} bytes, an NCCL unique id has 128",
                g.unique_id.len()
            )));
        }
        if groups[..i].iter().any(|h| h.members == g.members) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "{field}.members: {:?} sent twice",
                g.members
            )));
        }
    }
    Ok(())
}
