//! The rendezvous: ranks of the live attempt report their data-plane addresses and get the
//! whole table once every rank has; the attempt is running from then on.

use super::{Core, RankKey};
use crate::error::CoordinatorError;
use crate::message::{PeerTable, RendezvousTable};
use crate::state::{Job, JobState};
use gantry_core::Rank;

impl Core {
    /// A rank reports its data-plane address (rank 0 also its NCCL unique id, if any).
    /// Returns the peer table once every rank has.
    pub fn rendezvous(
        &mut self,
        key: &RankKey,
        address: String,
        nccl_unique_id: Option<Vec<u8>>,
        now_ms: i64,
    ) -> Result<Option<PeerTable>, CoordinatorError> {
        if address.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "address: must not be empty".into(),
            ));
        }
        if nccl_unique_id
            .as_ref()
            .is_some_and(|id| id.len() != 128 || key.rank != Rank::LEADER)
        {
            return Err(CoordinatorError::InvalidArgument(
                "nccl_unique_id: only rank 0 sends one, of 128 bytes".into(),
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
        let table = self
            .rendezvous
            .entry((key.job.clone(), key.attempt))
            .or_insert_with(|| RendezvousTable {
                addresses: vec![None; world as usize],
                nccl_unique_id: None,
            });
        table.addresses[key.rank.index()] = Some(address);
        if nccl_unique_id.is_some() {
            table.nccl_unique_id = nccl_unique_id;
        }
        let complete = table
            .addresses
            .iter()
            .cloned()
            .collect::<Option<Vec<String>>>()
            .map(|addresses| PeerTable {
                addresses,
                nccl_unique_id: table.nccl_unique_id.clone(),
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
