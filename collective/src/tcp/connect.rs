//! Setting up the full mesh: every rank connects to the lower ranks and accepts the higher
//! ones, and each connection starts with a hello naming the job and attempt, so a rank from
//! another job or an earlier attempt cannot join.

use super::comm::{AbortHandle, CHUNK, SOCKET_BUFFER, TcpComm};
use super::frame::{MAGIC, fnv1a};
use crate::CommError;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Who a connection belongs to: a hash of the job id, and the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub job: u64,
    pub attempt: u64,
}

impl Identity {
    pub fn new(job_id: &str, attempt: u64) -> Self {
        Self {
            job: fnv1a(job_id.bytes()),
            attempt,
        }
    }

    fn hello(&self, rank: u32) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..12].copy_from_slice(&self.job.to_le_bytes());
        out[12..20].copy_from_slice(&self.attempt.to_le_bytes());
        out[20..].copy_from_slice(&rank.to_le_bytes());
        out
    }
}

impl TcpComm {
    /// Connects to every peer (`peers[r]` is rank r's address; ours is served by `listener`)
    /// within `timeout`, which also bounds every later operation's wait for progress.
    pub fn connect(
        listener: TcpListener,
        peers: &[String],
        rank: u32,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let world = peers.len() as u32;
        if rank >= world {
            return Err(CommError::Invalid(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        let setup = |e: String| CommError::Setup(timeout, e);
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        // Lower ranks accept us (the kernel completes the connection even before they call accept).
        for peer in 0..rank {
            let addr = &peers[peer as usize];
            let mut stream = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(setup(format!("connecting to rank {peer} at {addr}: {e}")));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            stream
                .write_all(&identity.hello(rank))
                .map_err(|e| setup(e.to_string()))?;
            // The peer acknowledges only a hello from a rank of its own job and attempt.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            stream
                .set_read_timeout(Some(wait))
                .map_err(|e| setup(e.to_string()))?;
            let mut ack = [0u8; 1];
            stream.read_exact(&mut ack).map_err(|e| {
                setup(format!(
                    "rank {peer} refused this rank (another job or attempt?): {e}"
                ))
            })?;
            links[peer as usize] = Some(stream);
        }
        // Higher ranks connect to us.
        listener
            .set_nonblocking(true)
            .map_err(|e| setup(e.to_string()))?;
        let mut missing = world - rank - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| setup(e.to_string()))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(|e| setup(e.to_string()))?;
                    let mut hello = [0u8; 24];
                    let peer = stream.read_exact(&mut hello).ok().and_then(|()| {
                        let peer = u32::from_le_bytes(hello[20..].try_into().expect("4 bytes"));
                        (peer > rank
                            && peer < world
                            && hello == identity.hello(peer)
                            && links[peer as usize].is_none())
                        .then_some(peer)
                    });
                    match peer {
                        Some(peer) => {
                            stream.write_all(&[1]).map_err(|e| setup(e.to_string()))?;
                            links[peer as usize] = Some(stream);
                            missing -= 1;
                        }
                        None => tracing::warn!(
                            "refused a connection that is not a rank of this attempt"
                        ),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(setup(format!("{missing} higher rank(s) never connected")));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(setup(e.to_string())),
            }
        }
        let mut clones = Vec::new();
        for stream in links.iter().flatten() {
            stream.set_nodelay(true).map_err(|e| setup(e.to_string()))?;
            let sock = socket2::SockRef::from(stream);
            let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
            let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
            stream
                .set_nonblocking(true)
                .map_err(|e| setup(e.to_string()))?;
            clones.push(stream.try_clone().map_err(|e| setup(e.to_string()))?);
        }
        let aborted = Arc::new(AtomicBool::new(false));
        Ok(Self {
            rank,
            world,
            links,
            timeout,
            abort: AbortHandle {
                flag: aborted.clone(),
                streams: Arc::new(clones),
            },
            aborted,
            scratch: vec![0.0; CHUNK],
            work: Vec::new(),
            sequence: HashMap::new(),
        })
    }
}
