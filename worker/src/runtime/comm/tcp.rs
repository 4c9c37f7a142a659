//! The TCP backend: one persistent connection between every pair of ranks, set up once after
//! rendezvous, and ring algorithms driven by a single-threaded poll loop per operation.
//!
//! The loop writes to the successor and reads from the predecessor whenever either is ready, so
//! sending, receiving and reducing overlap, no call can deadlock on full socket buffers, and a
//! chunk is forwarded as soon as it has been reduced. Data goes straight between the caller's
//! buffer and the socket (reductions use one reusable scratch chunk): no per-call allocation of
//! big buffers. Every operation starts with a header naming the operation, the group and a
//! sequence number, so ranks that disagree about what they are doing fail loudly instead of
//! mixing data; the connection handshake names the job and attempt, so a rank from an earlier
//! attempt cannot join.

use super::plan::{self, Action, RingPlan};
use super::{CommError, Communicator, ReduceOp, check_split};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[cfg(target_endian = "big")]
compile_error!("the TCP collectives send f32 in native byte order and assume little-endian hosts");

const MAGIC: u32 = 0x4741_4e54; // "GANT"
/// Elements per pipelined chunk (512 KiB of f32).
const CHUNK: usize = 128 * 1024;
const SOCKET_BUFFER: usize = 4 << 20;
/// All-reduces up to this many bytes take the one-hop path (every rank sends its buffer to every
/// other rank, each sums in rank order): one network latency instead of 2(n-1).
const SMALL_ALL_REDUCE: usize = 64 << 10;

/// Who a connection belongs to: a hash of the job id, and the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub job: u64,
    pub attempt: u64,
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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

/// Aborts a communicator from another thread: every blocked or future call fails at once.
#[derive(Clone)]
pub struct AbortHandle {
    flag: Arc<AtomicBool>,
    streams: Arc<Vec<TcpStream>>,
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
    rank: u32,
    world: u32,
    /// The connection to each other rank (None for ourselves).
    links: Vec<Option<TcpStream>>,
    timeout: Duration,
    aborted: Arc<AtomicBool>,
    abort: AbortHandle,
    /// Reused receive area for reductions, and the working buffer of reduce-scatter.
    scratch: Vec<f32>,
    work: Vec<f32>,
    /// Operations issued per group, so both ends can check they are in step.
    sequence: HashMap<u64, u64>,
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

    /// A view on the ranks in `members` (global ranks, this one included), e.g. a DP group.
    pub fn group(&mut self, members: &[u32]) -> Result<Group<'_>, CommError> {
        let index = members
            .iter()
            .position(|&m| m == self.rank)
            .ok_or_else(|| {
                CommError::Invalid(format!("rank {} is not in group {members:?}", self.rank))
            })?;
        if members.iter().any(|&m| m >= self.world) {
            return Err(CommError::Invalid(format!(
                "group {members:?} outside a world of {}",
                self.world
            )));
        }
        let id = fnv1a(members.iter().flat_map(|m| m.to_le_bytes()));
        Ok(Group {
            comm: self,
            members: members.to_vec(),
            index,
            id,
        })
    }

    /// The whole world as a group.
    pub fn world(&mut self) -> Group<'_> {
        let members: Vec<u32> = (0..self.world).collect();
        self.group(&members).expect("every rank is in the world")
    }

    fn header(&mut self, op: u32, group: u64, len: usize, sequenced: bool) -> [u8; 32] {
        let seq = if sequenced {
            let s = self.sequence.entry(group).or_default();
            *s += 1;
            *s
        } else {
            0
        };
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&op.to_le_bytes());
        h[8..16].copy_from_slice(&group.to_le_bytes());
        h[16..24].copy_from_slice(&seq.to_le_bytes());
        h[24..].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    /// Streams `plan` over `buf`: sends to `next`, receives from `prev` (global ranks).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        op: &'static str,
        header: [u8; 32],
        next: Option<u32>,
        prev: Option<u32>,
        buf: Buf<'_>,
        plan: &RingPlan,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        self.stream_plan(op, header, next, prev, buf, plan, reduce)
            .map_err(|e| self.aborted_or(e))
    }

    /// An abort shuts the sockets down: report it as what it is, not as a broken peer.
    fn aborted_or(&self, e: CommError) -> CommError {
        if self.aborted.load(Ordering::SeqCst) {
            CommError::Aborted
        } else {
            e
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stream_plan(
        &mut self,
        op: &'static str,
        header: [u8; 32],
        next: Option<u32>,
        prev: Option<u32>,
        mut buf: Buf<'_>,
        plan: &RingPlan,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        let TcpComm {
            links,
            timeout,
            aborted,
            scratch,
            ..
        } = self;
        let link = |r: Option<u32>| r.and_then(|r| links[r as usize].as_ref());
        let (out, inp) = (link(next), link(prev));
        let mut sends: VecDeque<Range<usize>> = VecDeque::new();
        let mut header_out = if out.is_some() { 0 } else { 32 };
        let mut sent = 0usize; // bytes of the front send chunk already written
        for r in &plan.initial {
            push_chunks(&mut sends, r.clone());
        }
        let mut header_in = [0u8; 32];
        let mut header_filled = if inp.is_some() { 0 } else { 32 };
        let receives: Vec<(Range<usize>, Action, bool)> = plan
            .receives
            .iter()
            .flat_map(|r| chunks(r.range.clone()).map(move |c| (c, r.action, r.forward)))
            .collect();
        let mut current = 0usize;
        let mut filled = 0usize; // bytes of the current receive chunk already read
        let mut last_progress = Instant::now();
        // Try the sockets before waiting on them; `idle` counts fruitless tries since progress.
        let mut fresh = true;
        let mut idle = 0u32;
        loop {
            if aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            let want_write = header_out < 32 || !sends.is_empty();
            let want_read = header_filled < 32 || current < receives.len();
            if !want_write && !want_read {
                return Ok(());
            }
            let wait = timeout.saturating_sub(last_progress.elapsed());
            if wait.is_zero() {
                let peer = if want_read { prev } else { next };
                return Err(CommError::Timeout {
                    op,
                    peer: peer.unwrap_or_default(),
                    timeout: *timeout,
                });
            }
            let (readable, writable) = if fresh {
                fresh = false;
                (want_read, want_write)
            } else {
                let wait = wait.min(Duration::from_millis(200));
                wait_ready(
                    out.filter(|_| want_write),
                    inp.filter(|_| want_read),
                    wait,
                    &mut idle,
                )
            };
            let progress_before = last_progress;
            let io_err = |peer: Option<u32>, e: std::io::Error| CommError::Io {
                op,
                peer: peer.unwrap_or_default(),
                source: e,
            };
            if writable && let Some(mut stream) = out {
                loop {
                    let bytes: &[u8] = if header_out < 32 {
                        &header[header_out..]
                    } else if let Some(r) = sends.front() {
                        &bytemuck::cast_slice(&buf.read()[r.clone()])[sent..]
                    } else {
                        break;
                    };
                    match stream.write(bytes) {
                        Ok(0) => {
                            return Err(CommError::Closed {
                                op,
                                peer: next.unwrap_or_default(),
                            });
                        }
                        Ok(n) => {
                            last_progress = Instant::now();
                            if header_out < 32 {
                                header_out += n;
                            } else {
                                sent += n;
                                if sent == sends.front().map_or(0, |r| r.len() * 4) {
                                    sends.pop_front();
                                    sent = 0;
                                }
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(next, e)),
                    }
                }
            }
            if readable && let Some(mut stream) = inp {
                loop {
                    let target: &mut [u8] = if header_filled < 32 {
                        &mut header_in[header_filled..]
                    } else if let Some((range, action, _)) = receives.get(current) {
                        match action {
                            Action::Reduce => {
                                &mut bytemuck::cast_slice_mut(&mut scratch[..range.len()])[filled..]
                            }
                            Action::Copy => {
                                &mut bytemuck::cast_slice_mut(&mut buf.write()[range.clone()])
                                    [filled..]
                            }
                        }
                    } else {
                        break;
                    };
                    match stream.read(target) {
                        Ok(0) => {
                            return Err(CommError::Closed {
                                op,
                                peer: prev.unwrap_or_default(),
                            });
                        }
                        Ok(n) => {
                            last_progress = Instant::now();
                            if header_filled < 32 {
                                header_filled += n;
                                if header_filled == 32 && header_in != header {
                                    return Err(CommError::Mismatch {
                                        op,
                                        peer: prev.unwrap_or_default(),
                                        detail: describe(&header_in, &header),
                                    });
                                }
                                continue;
                            }
                            filled += n;
                            let (range, action, forward) = &receives[current];
                            if filled == range.len() * 4 {
                                if *action == Action::Reduce {
                                    combine(
                                        &mut buf.write()[range.clone()],
                                        &scratch[..range.len()],
                                        reduce,
                                    );
                                }
                                if *forward {
                                    sends.push_back(range.clone());
                                }
                                current += 1;
                                filled = 0;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(prev, e)),
                    }
                }
            }
            if last_progress != progress_before {
                idle = 0;
            }
        }
    }
}

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
    fn exchange_with(
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
    fn exchange_all(
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
        if &got != header {
            return Err(CommError::Mismatch {
                op: self.op,
                peer: self.peer,
                detail: describe(&got, header),
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

fn chunks(r: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    (r.start..r.end)
        .step_by(CHUNK)
        .map(move |s| s..(s + CHUNK).min(r.end))
}

fn push_chunks(queue: &mut VecDeque<Range<usize>>, r: Range<usize>) {
    queue.extend(chunks(r));
}

fn combine(dst: &mut [f32], src: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
        ReduceOp::Max => dst.iter_mut().zip(src).for_each(|(d, s)| *d = d.max(*s)),
    }
}

fn describe(got: &[u8; 32], want: &[u8; 32]) -> String {
    let field = |h: &[u8; 32], r: Range<usize>| {
        u64::from_le_bytes({
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&h[r]);
            b
        })
    };
    format!(
        "peer sent op {} group {:x} seq {} len {}, expected op {} group {:x} seq {} len {}",
        field(got, 4..8),
        field(got, 8..16),
        field(got, 16..24),
        field(got, 24..32),
        field(want, 4..8),
        field(want, 8..16),
        field(want, 16..24),
        field(want, 24..32),
    )
}

/// Times a waiting side yields the CPU before sleeping in `poll`. Data on loopback usually
/// arrives within microseconds, and a sleeping process takes tens of microseconds to wake; yielding
/// (rather than spinning) keeps this fair when ranks outnumber cores.
const YIELDS_BEFORE_SLEEP: u32 = 64;

/// Waits for readiness: first by yielding a bounded number of times (`*idle` counts them; the
/// caller resets it on progress), then by sleeping in `poll`. Returns (readable, writable).
fn wait_ready(
    write: Option<&TcpStream>,
    read: Option<&TcpStream>,
    wait: Duration,
    idle: &mut u32,
) -> (bool, bool) {
    if *idle < YIELDS_BEFORE_SLEEP {
        *idle += 1;
        std::thread::yield_now();
        return (read.is_some(), write.is_some());
    }
    poll(write, read, wait)
}

/// Waits until `read` is readable or `write` writable (either may be absent, or the same socket).
fn poll(write: Option<&TcpStream>, read: Option<&TcpStream>, wait: Duration) -> (bool, bool) {
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2);
    let (wfd, rfd) = (write.map(|s| s.as_raw_fd()), read.map(|s| s.as_raw_fd()));
    for (fd, events) in [(wfd, libc::POLLOUT), (rfd, libc::POLLIN)] {
        let Some(fd) = fd else { continue };
        match fds.iter_mut().find(|p| p.fd == fd) {
            Some(p) => p.events |= events,
            None => fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            }),
        }
    }
    if fds.is_empty() {
        return (false, false);
    }
    // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs that outlives the call.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            wait.as_millis().max(1) as i32,
        )
    };
    if n <= 0 {
        return (false, false);
    }
    // Errors and hang-ups count as ready: the following read or write reports them.
    let ready = |fd: Option<i32>, flag: i16| {
        fd.is_some_and(|fd| {
            fds.iter()
                .any(|p| p.fd == fd && p.revents & (flag | libc::POLLERR | libc::POLLHUP) != 0)
        })
    };
    (ready(rfd, libc::POLLIN), ready(wfd, libc::POLLOUT))
}

const OP_ALL_REDUCE: u32 = 1;
const OP_REDUCE_SCATTER: u32 = 2;
const OP_ALL_GATHER: u32 = 3;
const OP_BROADCAST: u32 = 4;
const OP_P2P: u32 = 5;

/// A group of ranks on a [`TcpComm`]; ring order is the order of `members`.
pub struct Group<'a> {
    comm: &'a mut TcpComm,
    members: Vec<u32>,
    index: usize,
    id: u64,
}

impl Group<'_> {
    fn next(&self) -> Option<u32> {
        (self.members.len() > 1).then(|| self.members[(self.index + 1) % self.members.len()])
    }

    fn prev(&self) -> Option<u32> {
        let n = self.members.len();
        (n > 1).then(|| self.members[(self.index + n - 1) % n])
    }

    fn member(&self, index: u32) -> Result<u32, CommError> {
        self.members.get(index as usize).copied().ok_or_else(|| {
            CommError::Invalid(format!(
                "rank {index} outside a group of {}",
                self.members.len()
            ))
        })
    }

    fn ring(
        &mut self,
        op: &'static str,
        code: u32,
        buf: &mut [f32],
        plan: &RingPlan,
        reduce: ReduceOp,
    ) -> Result<(), CommError> {
        if self.members.len() == 1 {
            return Ok(());
        }
        let header = self.comm.header(code, self.id, buf.len(), true);
        let (next, prev) = (self.next(), self.prev());
        self.comm
            .run(op, header, next, prev, Buf::Write(buf), plan, reduce)
    }
}

impl Communicator for Group<'_> {
    fn rank(&self) -> u32 {
        self.index as u32
    }

    fn size(&self) -> u32 {
        self.members.len() as u32
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let n = self.members.len();
        if n > 1 && buf.len() * 4 <= SMALL_ALL_REDUCE {
            let header = self.comm.header(OP_ALL_REDUCE, self.id, buf.len(), true);
            let mut theirs = std::mem::take(&mut self.comm.work);
            let result = if n.is_power_of_two() {
                // Recursive doubling: log2(n) exchanges with one partner each. Partners combine
                // the same two values (IEEE addition and max are commutative), so every rank
                // holds identical bits after every round.
                theirs.resize(buf.len(), 0.0);
                let mut result = Ok(());
                let mut mask = 1;
                while mask < n && result.is_ok() {
                    let partner = self.members[self.index ^ mask];
                    result = self.comm.exchange_with(header, partner, buf, &mut theirs);
                    if result.is_ok() {
                        combine(buf, &theirs, op);
                    }
                    mask <<= 1;
                }
                result
            } else {
                // One hop: everyone's buffer to everyone, summed in rank order everywhere.
                theirs.resize(buf.len() * n, 0.0);
                let result = self
                    .comm
                    .exchange_all(header, &self.members, buf, &mut theirs);
                if result.is_ok() {
                    buf.copy_from_slice(&theirs[..buf.len()]);
                    for part in theirs.chunks_exact(buf.len().max(1)).skip(1).take(n - 1) {
                        combine(buf, part, op);
                    }
                }
                result
            };
            self.comm.work = theirs;
            result.map_err(|e| self.comm.aborted_or(e))?;
        } else {
            let plan = plan::all_reduce(buf.len(), n, self.index);
            self.ring("all_reduce", OP_ALL_REDUCE, buf, &plan, op)?;
        }
        if op == ReduceOp::Avg && n > 1 {
            let scale = 1.0 / n as f32;
            buf.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    fn reduce_scatter(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let n = self.members.len();
        check_split("reduce_scatter", input.len(), output.len(), n as u32)?;
        let mut work = std::mem::take(&mut self.comm.work);
        work.clear();
        work.extend_from_slice(input);
        let plan = plan::reduce_scatter(output.len(), n, self.index);
        let result = self.ring("reduce_scatter", OP_REDUCE_SCATTER, &mut work, &plan, op);
        let mine = self.index * output.len()..(self.index + 1) * output.len();
        output.copy_from_slice(&work[mine]);
        self.comm.work = work;
        result?;
        if op == ReduceOp::Avg && n > 1 {
            let scale = 1.0 / n as f32;
            output.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = self.members.len();
        check_split("all_gather", output.len(), input.len(), n as u32)?;
        output[self.index * input.len()..(self.index + 1) * input.len()].copy_from_slice(input);
        let plan = plan::all_gather(input.len(), n, self.index);
        self.ring("all_gather", OP_ALL_GATHER, output, &plan, ReduceOp::Sum)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: u32) -> Result<(), CommError> {
        self.member(root)?;
        let plan = plan::broadcast(buf.len(), self.members.len(), self.index, root as usize);
        self.ring("broadcast", OP_BROADCAST, buf, &plan, ReduceOp::Sum)
    }

    fn send(&mut self, buf: &[f32], peer: u32) -> Result<(), CommError> {
        let to = self.member(peer)?;
        let header = self.comm.header(
            OP_P2P,
            self.id ^ u64::from(self.comm.rank),
            buf.len(),
            false,
        );
        let plan = RingPlan {
            initial: plan::whole(buf.len()),
            receives: vec![],
        };
        self.comm.run(
            "send",
            header,
            Some(to),
            None,
            Buf::Read(buf),
            &plan,
            ReduceOp::Sum,
        )
    }

    fn recv(&mut self, buf: &mut [f32], peer: u32) -> Result<(), CommError> {
        let from = self.member(peer)?;
        let header = self
            .comm
            .header(OP_P2P, self.id ^ u64::from(from), buf.len(), false);
        let plan = RingPlan {
            initial: vec![],
            receives: vec![plan::Receive {
                range: 0..buf.len(),
                action: Action::Copy,
                forward: false,
            }],
        };
        self.comm.run(
            "recv",
            header,
            None,
            Some(from),
            Buf::Write(buf),
            &plan,
            ReduceOp::Sum,
        )
    }
}

/// The buffer an operation streams: a send-only operation gets it read-only.
enum Buf<'a> {
    Read(&'a [f32]),
    Write(&'a mut [f32]),
}

impl Buf<'_> {
    fn read(&self) -> &[f32] {
        match self {
            Buf::Read(s) => s,
            Buf::Write(s) => s,
        }
    }

    fn write(&mut self) -> &mut [f32] {
        match self {
            Buf::Write(s) => s,
            Buf::Read(_) => unreachable!("a plan with receives always gets a writable buffer"),
        }
    }
}
