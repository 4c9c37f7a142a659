//! The NCCL backend (cargo feature `cuda`), on cudarc's safe NCCL API with the CUDA libraries
//! loaded at run time: a build without CUDA works, and a machine without the libraries gets a
//! clear error instead of a crash.
//!
//! A rank of a cuda job joins one communicator per group of its mesh ([`NcclWorld`]). The first
//! member of each group creates its unique id ([`NcclComm::unique_id`]); the ids reach the other
//! members through the coordinator's rendezvous, fresh for every attempt, so a rank of an older
//! attempt can never join a newer attempt's communicators (the fencing the TCP backend does with
//! its handshake). Every wait is bounded by the collective timeout: a communicator whose
//! operation does not complete in time is aborted (`ncclCommAbort`, which cudarc calls when a
//! `Comm` is dropped) and every later call on it fails.
//!
//! [`NcclComm::all_reduce_device`] is the fast path; the [`Communicator`] implementation stages
//! host buffers through the device, which is what the training step hands a communicator today.

use crate::{CommError, Communicator, ReduceOp, World, check_split};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::UniqueId;

pub struct NcclComm {
    /// None once aborted.
    comm: Option<Comm>,
    stream: Arc<CudaStream>,
    rank: u32,
    size: u32,
    timeout: Duration,
    /// Sends not issued yet: each goes out in one NCCL group with the next receive (or alone
    /// before any other operation), so that two neighbours sending to each other at once, as
    /// pipeline stages do in 1F1B, do not wait on each other forever.
    pending: Vec<(CudaSlice<f32>, u32)>,
}

fn backend<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> CommError + '_ {
    move |e| CommError::Backend(format!("{what}: {e:?}"))
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded here. With cudarc's dynamic loading
/// the first driver call panics without it, so everything that touches CUDA asks this first.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether that worked.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the CUDA driver and NCCL libraries can be loaded here.
pub fn available() -> Result<(), CommError> {
    // SAFETY: only tries to dlopen the library and reports whether that worked.
    let nccl = unsafe { cudarc::nccl::sys::is_culib_present() };
    match (driver_present(), nccl) {
        (true, true) => Ok(()),
        (false, _) => Err(CommError::Backend(
            "the CUDA driver library (libcuda.so) is not available on this machine".into(),
        )),
        (true, false) => Err(CommError::Backend(
            "the NCCL library (libnccl.so) was not found; put it on LD_LIBRARY_PATH".into(),
        )),
    }
}

/// A communicator being created on another thread, so that its wait can be bounded.
struct Joining(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as one thread uses it at a
// time; the joining thread hands it over and never touches it again.
unsafe impl Send for Joining {}

impl NcclComm {
    /// A new unique id, created by a group's first member and shared with the others.
    pub fn unique_id() -> Result<UniqueId, CommError> {
        available()?;
        let id = Id::new().map_err(backend("ncclGetUniqueId"))?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Joins the communicator of `size` ranks (this one `rank` of them) on GPU `device`. Waits
    /// at most `timeout` for the other ranks to join.
    pub fn new(
        device: usize,
        rank: u32,
        size: u32,
        unique_id: UniqueId,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        available()?;
        if rank >= size {
            return Err(CommError::Invalid(format!(
                "rank {rank} outside a group of {size}"
            )));
        }
        let ctx = CudaContext::new(device).map_err(backend("cuda context"))?;
        let stream = ctx.default_stream();
        let id = Id::uninit(unique_id.map(|b| b as core::ffi::c_char));
        let (tx, rx) = std::sync::mpsc::channel();
        let joining = stream.clone();
        // ncclCommInitRank blocks until every member has called it: when a member never does,
        // this rank gives up after the timeout (and ends, taking the blocked thread with it).
        std::thread::spawn(move || {
            let _ =
                tx.send(Comm::from_rank(joining, rank as usize, size as usize, id).map(Joining));
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(joined) => joined.map_err(backend("ncclCommInitRank"))?.0,
            Err(_) => {
                return Err(CommError::Setup(
                    timeout,
                    format!("ncclCommInitRank: not every rank of the group of {size} joined"),
                ));
            }
        };
        Ok(Self {
            comm: Some(comm),
            stream,
            rank,
            size,
            timeout,
            pending: Vec::new(),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn comm(&self) -> Result<&Comm, CommError> {
        self.comm.as_ref().ok_or(CommError::Aborted)
    }

    /// Waits for everything queued on the stream, at most the collective timeout; past it, the
    /// communicator is aborted, which releases the wait, and this and every later call fail.
    pub fn wait(&mut self, op: &'static str) -> Result<(), CommError> {
        let done = self
            .stream
            .record_event(None)
            .map_err(backend("cuEventRecord"))?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(20);
        while !done.try_is_complete().map_err(backend(op))? {
            if Instant::now() >= deadline {
                // Dropping the communicator calls ncclCommAbort.
                self.comm = None;
                return Err(CommError::Backend(format!(
                    "{op} did not complete within {:?}; communicator aborted",
                    self.timeout
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Issues the sends not issued yet, in one NCCL group with the receive `into` (a buffer and
    /// the peer it comes from) if given, and waits for all of them.
    fn exchange(
        &mut self,
        op: &'static str,
        into: Option<(&mut CudaSlice<f32>, u32)>,
    ) -> Result<(), CommError> {
        if self.pending.is_empty() && into.is_none() {
            return Ok(());
        }
        {
            let comm = self.comm()?;
            let sends: Vec<_> = self
                .pending
                .iter()
                .map(|(buf, peer)| (buf.slice(..), *peer))
                .collect();
            let recv = into.map(|(buf, peer)| (buf.slice_mut(..), peer));
            let mut group = comm.group();
            for (view, peer) in sends {
                group.send(view, peer as i32).map_err(backend("ncclSend"))?;
            }
            if let Some((view, peer)) = recv {
                group.recv(view, peer as i32).map_err(backend("ncclRecv"))?;
            }
            // ncclGroupEnd as the group drops.
        }
        let waited = self.wait(op);
        self.pending.clear();
        waited
    }

    /// Issues (and waits for) the sends not issued yet: called before every other operation.
    pub fn flush(&mut self) -> Result<(), CommError> {
        self.exchange("send", None)
    }

    /// Queues an in-place all-reduce of a buffer that lives on the GPU (no host copy).
    pub fn all_reduce_device(
        &self,
        buf: &mut CudaSlice<f32>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.comm()?
            .all_reduce_in_place(buf, &nccl_op(op))
            .map_err(backend("ncclAllReduce"))?;
        Ok(())
    }

    fn check_peer(&self, peer: u32) -> Result<(), CommError> {
        if peer >= self.size || peer == self.rank {
            return Err(CommError::Invalid(format!(
                "peer {peer} of rank {} in a group of {}",
                self.rank, self.size
            )));
        }
        Ok(())
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>, CommError> {
        if host.is_empty() {
            return self.stream.alloc_zeros::<f32>(0).map_err(backend("alloc"));
        }
        self.stream
            .clone_htod(host)
            .map_err(backend("copy to device"))
    }

    fn download(
        &mut self,
        op: &'static str,
        dev: &CudaSlice<f32>,
        host: &mut [f32],
    ) -> Result<(), CommError> {
        self.wait(op)?;
        self.stream
            .memcpy_dtoh(dev, host)
            .map_err(backend("copy to host"))?;
        self.stream.synchronize().map_err(backend("synchronize"))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.flush()?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(buf)?;
        self.all_reduce_device(&mut dev, op)?;
        self.download("all_reduce", &dev, buf)
    }

    fn reduce_scatter(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        check_split("reduce_scatter", input.len(), output.len(), self.size)?;
        self.flush()?;
        if output.is_empty() {
            return Ok(());
        }
        let src = self.upload(input)?;
        let mut dst = self.upload(output)?;
        self.comm()?
            .reduce_scatter(&src, &mut dst, &nccl_op(op))
            .map_err(backend("ncclReduceScatter"))?;
        self.download("reduce_scatter", &dst, output)
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_split("all_gather", output.len(), input.len(), self.size)?;
        self.flush()?;
        if input.is_empty() {
            return Ok(());
        }
        let src = self.upload(input)?;
        let mut dst = self.upload(output)?;
        self.comm()?
            .all_gather(&src, &mut dst)
            .map_err(backend("ncclAllGather"))?;
        self.download("all_gather", &dst, output)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CommError> {
        self.flush()?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(buf)?;
        self.comm()?
            .broadcast_in_place(&mut dev, root as i32)
            .map_err(backend("ncclBroadcast"))?;
        self.download("broadcast", &dev, buf)
    }

    /// Returns once the buffer is copied: the send itself goes out with the next receive.
    fn send(&mut self, buf: &[f32], peer: u32) -> Result<(), CommError> {
        self.check_peer(peer)?;
        let dev = self.upload(buf)?;
        self.pending.push((dev, peer));
        Ok(())
    }

    fn recv(&mut self, buf: &mut [f32], peer: u32) -> Result<(), CommError> {
        self.check_peer(peer)?;
        let mut dev = self.upload(buf)?;
        self.exchange("recv", Some((&mut dev, peer)))?;
        self.download("recv", &dev, buf)
    }
}

/// A job's communicators on one rank: one NCCL communicator per group of the mesh this rank is
/// in. [`World::group`] hands out the one whose members are asked for; any other set of ranks
/// is refused (the TCP backend makes groups of any subset, NCCL communicators are set up ahead).
pub struct NcclWorld {
    rank: u32,
    size: u32,
    groups: Vec<(Vec<u32>, NcclComm)>,
}

impl NcclWorld {
    /// Joins the communicator of each of `groups` (its members as global ranks, ascending, and
    /// its unique id), in the order given: the same order on every member of a group, or the
    /// joins deadlock (the mesh's `groups` gives one). The world of `size` ranks
    /// must be among them.
    pub fn connect(
        device: usize,
        rank: u32,
        size: u32,
        groups: Vec<(Vec<u32>, UniqueId)>,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let world: Vec<u32> = (0..size).collect();
        if !groups.iter().any(|(members, _)| *members == world) {
            return Err(CommError::Invalid("no NCCL id for the world group".into()));
        }
        let mut joined = Vec::with_capacity(groups.len());
        for (members, id) in groups {
            let index = members.iter().position(|&m| m == rank).ok_or_else(|| {
                CommError::Invalid(format!("rank {rank} is not in group {members:?}"))
            })?;
            let comm = NcclComm::new(device, index as u32, members.len() as u32, id, timeout)
                .map_err(|e| match e {
                    CommError::Setup(t, what) => {
                        CommError::Setup(t, format!("group {members:?}: {what}"))
                    }
                    other => other,
                })?;
            joined.push((members, comm));
        }
        Ok(Self {
            rank,
            size,
            groups: joined,
        })
    }
}

impl World for NcclWorld {
    fn world_rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.size
    }

    fn group(&mut self, members: &[u32]) -> Result<Box<dyn Communicator + '_>, CommError> {
        let rank = self.rank;
        // Sends still held by another group's communicator go out first: its peers may be
        // waiting for them before they join this group's operation.
        for (m, comm) in &mut self.groups {
            if m != members {
                comm.flush()?;
            }
        }
        match self.groups.iter_mut().find(|(m, _)| m == members) {
            Some((_, comm)) => Ok(Box::new(comm)),
            None => Err(CommError::Invalid(format!(
                "rank {rank} has no NCCL communicator for group {members:?}"
            ))),
        }
    }
}
