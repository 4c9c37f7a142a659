//! Collective communication between the ranks of a job.
//!
//! Two traits make the seam where backends plug in. [`Communicator`] is one group's
//! collectives (all-reduce, reduce-scatter, all-gather, broadcast, send/recv, barrier);
//! [`World`] is a job's whole communicator, from which the data-, tensor- and
//! pipeline-parallel groups of its mesh are taken: `world.group(&mesh.dp_group(rank))`. The
//! training step sees only these two traits. [`tcp::TcpComm`] is the CPU backend (a full mesh
//! of persistent TCP connections, with pipelined ring algorithms); with the `cuda` feature,
//! `nccl::NcclWorld` (one `nccl::NcclComm` per group of the mesh) runs the same operations on
//! GPUs. Nothing here knows about burn: buffers
//! are contiguous `f32` slices.

pub mod plan;
pub mod tcp;

#[cfg(test)]
mod tests;

#[cfg(feature = "cuda")]
pub mod nccl;

use std::time::Duration;

/// An NCCL unique id (the bytes of `ncclUniqueId`), as ranks exchange them whether or not this
/// build has the NCCL backend.
pub type UniqueId = [u8; 128];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum, then divide by the group size.
    Avg,
    Max,
}

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("{op} failed talking to rank {peer}: {source}")]
    Io {
        op: &'static str,
        peer: u32,
        source: std::io::Error,
    },
    #[error("{op} made no progress for {timeout:?} (waiting on rank {peer})")]
    Timeout {
        op: &'static str,
        peer: u32,
        timeout: Duration,
    },
    #[error("{op}: rank {peer} closed its connection")]
    Closed { op: &'static str, peer: u32 },
    #[error("communicator aborted")]
    Aborted,
    #[error("{op}: rank {peer} is running a different collective ({detail})")]
    Mismatch {
        op: &'static str,
        peer: u32,
        detail: String,
    },
    #[error("setup failed after {0:?}: {1}")]
    Setup(Duration, String),
    #[error("invalid call: {0}")]
    Invalid(String),
    #[error("backend: {0}")]
    Backend(String),
}

/// The collectives every backend offers, over contiguous f32 buffers. Every rank of the group
/// must make the same calls in the same order; every call fails (never hangs) when a peer dies.
pub trait Communicator {
    /// This rank's index in the group.
    fn rank(&self) -> u32;
    fn size(&self) -> u32;
    /// Reduces `buf` element-wise across the group; every rank ends with identical bits.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// `input` holds `size` equal segments; rank r receives the reduction of segment r.
    fn reduce_scatter(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError>;
    /// `output` receives every rank's `input`, in rank order.
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CommError>;
    fn send(&mut self, buf: &[f32], peer: u32) -> Result<(), CommError>;
    fn recv(&mut self, buf: &mut [f32], peer: u32) -> Result<(), CommError>;
    /// Returns once every rank of the group has called it.
    fn barrier(&mut self) -> Result<(), CommError> {
        let mut token = [0.0f32];
        self.all_reduce(&mut token, ReduceOp::Sum)
    }
}

/// A borrowed communicator is one: a [`World`] can hand out a group it owns.
impl<C: Communicator + ?Sized> Communicator for &mut C {
    fn rank(&self) -> u32 {
        (**self).rank()
    }
    fn size(&self) -> u32 {
        (**self).size()
    }
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        (**self).all_reduce(buf, op)
    }
    fn reduce_scatter(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        (**self).reduce_scatter(input, output, op)
    }
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        (**self).all_gather(input, output)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CommError> {
        (**self).broadcast(buf, root)
    }
    fn send(&mut self, buf: &[f32], peer: u32) -> Result<(), CommError> {
        (**self).send(buf, peer)
    }
    fn recv(&mut self, buf: &mut [f32], peer: u32) -> Result<(), CommError> {
        (**self).recv(buf, peer)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        (**self).barrier()
    }
}

/// A job's communicator over all its ranks. Groups are views on it: any subset of the world
/// (this rank included) runs collectives among its own members, in the order given.
pub trait World {
    /// This rank's index in the world.
    fn world_rank(&self) -> u32;
    fn world_size(&self) -> u32;
    /// The group of the global ranks in `members`, e.g. a data-parallel group.
    fn group(&mut self, members: &[u32]) -> Result<Box<dyn Communicator + '_>, CommError>;
    /// Every rank of the job as one group.
    fn world(&mut self) -> Box<dyn Communicator + '_> {
        let members: Vec<u32> = (0..self.world_size()).collect();
        self.group(&members).expect("every rank is in the world")
    }
}

/// Checks the buffer lengths of a reduce-scatter or all-gather: `whole` is `parts` × `part`.
pub(crate) fn check_split(
    op: &str,
    whole: usize,
    part: usize,
    parts: u32,
) -> Result<(), CommError> {
    if whole != part * parts as usize {
        return Err(CommError::Invalid(format!(
            "{op}: buffer of {whole} elements is not {parts} × {part}"
        )));
    }
    Ok(())
}
