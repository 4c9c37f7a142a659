//! Setting up the full mesh: every rank connects to the lower ranks and accepts the higher
//! ones. Each connection starts with a hello naming the job and attempt, then a
//! challenge-response over fresh nonces in both directions, HMAC-SHA256 under the attempt's
//! secret: a process that does not hold the secret (anyone on the network, a rank of an earlier
//! attempt) cannot join a ring or feed it gradients, and learns nothing it could replay.
//!
//! The handshake authenticates the connection's ends; the frames after it are neither
//! encrypted nor signed, so the data plane belongs on a network that nobody can tamper with
//! (a Kubernetes NetworkPolicy, a private subnet).

use super::comm::{AbortHandle, CHUNK, SOCKET_BUFFER, TcpComm};
use super::frame::{MAGIC, fnv1a};
use crate::CommError;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Who a connection belongs to: a hash of the job id, the attempt, and the key derived from
/// the attempt's secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub job: u64,
    pub attempt: u64,
    key: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("job", &self.job)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Bytes of each side's nonce, and of a proof.
const NONCE: usize = 16;
const PROOF: usize = 32;

impl Identity {
    pub fn new(job_id: &str, attempt: u64, key: [u8; 32]) -> Self {
        Self {
            job: fnv1a(job_id.bytes()),
            attempt,
            key,
        }
    }

    /// The MAC of `side` ("accept" or "connect") over the hello and both nonces.
    fn mac(&self, side: &[u8], hello: &[u8], nonces: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        for part in [b"gantry-collective/", side, hello, nonces] {
            mac.update(part);
        }
        mac
    }

    /// The proof that `side` holds the key.
    fn proof(&self, side: &[u8], hello: &[u8], nonces: &[u8]) -> [u8; PROOF] {
        use hmac::Mac;
        self.mac(side, hello, nonces).finalize().into_bytes().into()
    }

    /// Whether `proof` is `side`'s, in time that does not depend on where it differs.
    fn verify(&self, side: &[u8], hello: &[u8], nonces: &[u8], proof: &[u8]) -> bool {
        use hmac::Mac;
        self.mac(side, hello, nonces).verify_slice(proof).is_ok()
    }

    /// The 24 bytes a rank opens a connection with: the magic, the job, the attempt, its rank.
    pub fn hello(&self, rank: u32) -> [u8; 24] {
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
            // The hello and our nonce; the peer answers with its nonce and its proof, then
            // wants ours, and acknowledges only if it holds.
            let hello = identity.hello(rank);
            let ours: [u8; NONCE] = rand::random();
            stream
                .write_all(&[&hello[..], &ours].concat())
                .map_err(|e| setup(e.to_string()))?;
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            stream
                .set_read_timeout(Some(wait))
                .map_err(|e| setup(e.to_string()))?;
            let mut answer = [0u8; NONCE + PROOF];
            stream.read_exact(&mut answer).map_err(|e| {
                setup(format!(
                    "rank {peer} refused this rank (another job or attempt?): {e}"
                ))
            })?;
            let nonces = [&ours[..], &answer[..NONCE]].concat();
            if !identity.verify(b"accept", &hello, &nonces, &answer[NONCE..]) {
                return Err(setup(format!(
                    "the process at {addr} (rank {peer}'s address) does not hold this attempt's secret"
                )));
            }
            stream
                .write_all(&identity.proof(b"connect", &hello, &nonces))
                .map_err(|e| setup(e.to_string()))?;
            let mut ack = [0u8; 1];
            stream
                .read_exact(&mut ack)
                .map_err(|e| setup(format!("rank {peer} did not accept this rank's proof: {e}")))?;
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
                    match accept_peer(&mut stream, &identity, rank, world, &links) {
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

/// The rank a higher peer that just connected proves to be: its hello names this job, attempt
/// and a rank above ours not yet linked, and its proof holds. `None` for anything else (the
/// caller drops the connection).
fn accept_peer(
    stream: &mut TcpStream,
    identity: &Identity,
    rank: u32,
    world: u32,
    links: &[Option<TcpStream>],
) -> Option<u32> {
    let mut opening = [0u8; OPENING];
    stream.read_exact(&mut opening).ok()?;
    let linked: Vec<bool> = links.iter().map(Option::is_some).collect();
    let peer = admit(&opening, identity, rank, world, &linked)?;
    let ours: [u8; NONCE] = rand::random();
    let (hello, theirs) = opening.split_at(24);
    let nonces = [theirs, &ours[..]].concat();
    let proof = identity.proof(b"accept", hello, &nonces);
    stream.write_all(&[&ours[..], &proof].concat()).ok()?;
    let mut theirs_proof = [0u8; PROOF];
    stream.read_exact(&mut theirs_proof).ok()?;
    identity
        .verify(b"connect", hello, &nonces, &theirs_proof)
        .then_some(peer)
}

/// Bytes a connecting rank opens with: its hello and its nonce.
pub const OPENING: usize = 24 + NONCE;

/// The rank whose opening this is, if it may go on to prove itself: its hello names this job,
/// this attempt and a rank above ours (`rank`) in a world of `world`, not yet `linked`.
/// Anything else (any bytes at all) is `None`. The first thing a listening rank reads from a
/// stranger, so it is fuzzed (`gantry-fuzz frame`).
pub fn admit(
    opening: &[u8],
    identity: &Identity,
    rank: u32,
    world: u32,
    linked: &[bool],
) -> Option<u32> {
    let hello = opening.get(..24)?;
    let peer = u32::from_le_bytes(hello[20..].try_into().ok()?);
    (opening.len() == OPENING
        && peer > rank
        && peer < world
        && hello == identity.hello(peer)
        && !linked.get(peer as usize).copied().unwrap_or(true))
    .then_some(peer)
}
