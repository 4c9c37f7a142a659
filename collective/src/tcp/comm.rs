//! The TCP communicator's state: the connection to every other rank, the timeout every wait is
//! bounded by, the abort flag, and the reusable buffers.

use crate::CommError;
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Elements per pipelined chunk (512 KiB of f32).
pub(super) const CHUNK: usize = 128 * 1024;
pub(super) const SOCKET_BUFFER: usize = 4 << 20;
/// All-reduces up to this many bytes take the one-hop path (every rank sends its buffer to every
/// other rank, each sums in rank order): one network latency instead of 2(n-1).
pub(super) const SMALL_ALL_REDUCE: usize = 64 << 10;

/// Aborts a communicator from another thread: every blocked or future call fails at once.
#[derive(Clone)]
pub struct AbortHandle {
    pub(super) flag: Arc<AtomicBool>,
    pub(super) streams: Arc<Vec<TcpStream>>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for s in self.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub struct TcpComm {
    pub(super) rank: u32,
    pub(super) world: u32,
    /// The connection to each other rank (None for ourselves).
    pub(super) links: Vec<Option<TcpStream>>,
    pub(super) timeout: Duration,
    pub(super) aborted: Arc<AtomicBool>,
    pub(super) abort: AbortHandle,
    /// Reused receive area for reductions, and the working buffer of reduce-scatter.
    pub(super) scratch: Vec<f32>,
    pub(super) work: Vec<f32>,
    /// Operations issued per group, so both ends can check they are in step.
    pub(super) sequence: HashMap<u64, u64>,
}

impl TcpComm {
    pub fn world_rank(&self) -> u32 {
        self.rank
    }

    pub fn world_size(&self) -> u32 {
        self.world
    }

    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// An abort shuts the sockets down: report it as what it is, not as a broken peer.
    pub(super) fn aborted_or(&self, e: CommError) -> CommError {
        if self.aborted.load(Ordering::SeqCst) {
            CommError::Aborted
        } else {
            e
        }
    }
}
