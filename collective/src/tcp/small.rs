//! The small-message path: all-reduces of up to 64 KiB go in one hop (or log2(n) exchanges)
//! instead of a ring's 2(n-1), with blocking-style sends and receives on the non-blocking
//! sockets.

use super::comm::TcpComm;
use super::frame::check_header;
use super::poll::wait_ready;
use crate::CommError;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

impl TcpComm {
    /// Small-message transfers with `peer`, bounded by this operation's timeout.
    fn peer(&self, peer: u32, op: &'static str) -> Peer<'_> {
        Peer {
            stream: self.links[peer as usize].as_ref().expect("connected"),
            peer,
            op,
            deadline: Instant::now() + self.timeout,
            aborted: &self.aborted,
            timeout: self.timeout,
        }
    }

    /// Swaps small buffers with one peer: ours goes out, theirs lands in `theirs`.
    pub(super) fn exchange_with(
        &mut self,
        header: [u8; 32],
        peer: u32,
        buf: &[f32],
        theirs: &mut [f32],
    ) -> Result<(), CommError> {
        let p = self.peer(peer, "all_reduce");
        p.send(&header)?;
        p.send(bytemuck::cast_slice(buf))?;
        p.recv_checked(&header, bytemuck::cast_slice_mut(theirs))
    }

    /// Sends `buf` to every other member and receives each member's buffer into `gathered`
    /// (member-major), for small messages whose every write fits the socket buffers.
    pub(super) fn exchange_all(
        &mut self,
        header: [u8; 32],
        members: &[u32],
        buf: &[f32],
        gathered: &mut [f32],
    ) -> Result<(), CommError> {
        let len = buf.len();
        for &peer in members.iter().filter(|&&m| m != self.rank) {
            let p = self.peer(peer, "all_reduce");
            p.send(&header)?;
            p.send(bytemuck::cast_slice(buf))?;
        }
        for (i, &peer) in members.iter().enumerate() {
            let slot = &mut gathered[i * len..(i + 1) * len];
            if peer == self.rank {
                slot.copy_from_slice(buf);
            } else {
                self.peer(peer, "all_reduce")
                    .recv_checked(&header, bytemuck::cast_slice_mut(slot))?;
            }
        }
        Ok(())
    }
}

/// Blocking-style sends and receives on a non-blocking socket, for messages small enough that
/// every write fits the socket buffers: each waits (yielding, then polling) until done, the
/// deadline passes or the communicator is aborted.
struct Peer<'a> {
    stream: &'a TcpStream,
    peer: u32,
    op: &'static str,
    deadline: Instant,
    aborted: &'a AtomicBool,
    timeout: Duration,
}

impl Peer<'_> {
    fn send(&self, bytes: &[u8]) -> Result<(), CommError> {
        self.drive(bytes.len(), false, |mut s, done| s.write(&bytes[done..]))
    }

    /// Receives the operation header, checks it matches ours, then the payload.
    fn recv_checked(&self, header: &[u8; 32], payload: &mut [u8]) -> Result<(), CommError> {
        let mut got = [0u8; 32];
        self.drive(32, true, |mut s, done| s.read(&mut got[done..]))?;
        if let Err(detail) = check_header(&got, header) {
            return Err(CommError::Mismatch {
                op: self.op,
                peer: self.peer,
                detail,
            });
        }
        self.drive(payload.len(), true, |mut s, done| {
            s.read(&mut payload[done..])
        })
    }

    /// Repeats `io` (given the bytes done so far) until `total` bytes have moved.
    fn drive(
        &self,
        total: usize,
        reading: bool,
        mut io: impl FnMut(&TcpStream, usize) -> std::io::Result<usize>,
    ) -> Result<(), CommError> {
        let (op, peer) = (self.op, self.peer);
        let (mut done, mut idle) = (0, 0);
        while done < total {
            if self.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            match io(self.stream, done) {
                Ok(0) => return Err(CommError::Closed { op, peer }),
                Ok(n) => {
                    done += n;
                    idle = 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let wait = self.deadline.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        return Err(CommError::Timeout {
                            op,
                            peer,
                            timeout: self.timeout,
                        });
                    }
                    let (w, r) = if reading {
                        (None, Some(self.stream))
                    } else {
                        (Some(self.stream), None)
                    };
                    wait_ready(w, r, wait.min(Duration::from_millis(200)), &mut idle);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(CommError::Io {
                        op,
                        peer,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}
