//! The NCCL backend (cargo feature `cuda`), on cudarc's safe NCCL API with the CUDA libraries
//! loaded at run time: a build without CUDA works, and a machine without the libraries gets a
//! clear error instead of a crash.
//!
//! Rank 0 creates the unique id ([`NcclComm::unique_id`]); it reaches the other ranks the same way
//! data-plane addresses do (through the coordinator's rendezvous), and every rank then calls
//! [`NcclComm::new`]. The device-buffer methods are the fast path; the [`Communicator`]
//! implementation stages host buffers through the device so the same tests run on both backends.

use crate::{CommError, Communicator, ReduceOp, check_split};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};
use std::sync::Arc;

pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
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

impl NcclComm {
    /// A new unique id, to be created by rank 0 and shared with every rank.
    pub fn unique_id() -> Result<[u8; 128], CommError> {
        available()?;
        let id = Id::new().map_err(backend("ncclGetUniqueId"))?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Joins the communicator of `world` ranks on GPU `device`.
    pub fn new(
        device: usize,
        rank: u32,
        world: u32,
        unique_id: [u8; 128],
    ) -> Result<Self, CommError> {
        available()?;
        let ctx = CudaContext::new(device).map_err(backend("cuda context"))?;
        let stream = ctx.default_stream();
        let id = Id::uninit(unique_id.map(|b| b as core::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank as usize, world as usize, id)
            .map_err(backend("ncclCommInitRank"))?;
        Ok(Self { comm, stream })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// All-reduces a gradient buffer that lives on the GPU, in place.
    pub fn all_reduce_device(
        &self,
        buf: &mut CudaSlice<f32>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.comm
            .all_reduce_in_place(buf, &nccl_op(op))
            .map_err(backend("ncclAllReduce"))?;
        Ok(())
    }

    /// Sends a device buffer to another rank (pipeline stages).
    pub fn send_device(&self, buf: &CudaSlice<f32>, peer: u32) -> Result<(), CommError> {
        self.comm
            .send(buf, peer as i32)
            .map_err(backend("ncclSend"))
    }

    pub fn recv_device(&self, buf: &mut CudaSlice<f32>, peer: u32) -> Result<(), CommError> {
        self.comm
            .recv(buf, peer as i32)
            .map_err(backend("ncclRecv"))?;
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

    fn download(&self, dev: &CudaSlice<f32>, host: &mut [f32]) -> Result<(), CommError> {
        self.stream
            .memcpy_dtoh(dev, host)
            .map_err(backend("copy to host"))?;
        self.stream.synchronize().map_err(backend("synchronize"))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> u32 {
        self.comm.rank() as u32
    }

    fn size(&self) -> u32 {
        self.comm.world_size() as u32
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(buf)?;
        self.all_reduce_device(&mut dev, op)?;
        self.download(&dev, buf)
    }

    fn reduce_scatter(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        check_split("reduce_scatter", input.len(), output.len(), self.size())?;
        if output.is_empty() {
            return Ok(());
        }
        let src = self.upload(input)?;
        let mut dst = self.upload(output)?;
        self.comm
            .reduce_scatter(&src, &mut dst, &nccl_op(op))
            .map_err(backend("ncclReduceScatter"))?;
        self.download(&dst, output)
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_split("all_gather", output.len(), input.len(), self.size())?;
        if input.is_empty() {
            return Ok(());
        }
        let src = self.upload(input)?;
        let mut dst = self.upload(output)?;
        self.comm
            .all_gather(&src, &mut dst)
            .map_err(backend("ncclAllGather"))?;
        self.download(&dst, output)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(buf)?;
        self.comm
            .broadcast_in_place(&mut dev, root as i32)
            .map_err(backend("ncclBroadcast"))?;
        self.download(&dev, buf)
    }

    fn send(&mut self, buf: &[f32], peer: u32) -> Result<(), CommError> {
        let dev = self.upload(buf)?;
        self.send_device(&dev, peer)?;
        self.stream.synchronize().map_err(backend("synchronize"))
    }

    fn recv(&mut self, buf: &mut [f32], peer: u32) -> Result<(), CommError> {
        let mut dev = self.upload(buf)?;
        self.recv_device(&mut dev, peer)?;
        self.download(&dev, buf)
    }
}
