//! Collectives between rank processes over TCP: a ring all-reduce (reduce-scatter, then
//! all-gather), correct and deterministic. Every socket operation has a timeout, so a dead or
//! silent peer makes the call fail on every surviving rank instead of hanging.
//!
//! Each rank connects to its successor and accepts its predecessor; the connection starts with
//! a handshake naming the job, attempt and rank, so a stale rank from an earlier attempt cannot
//! join the ring.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x4741_4e54; // "GANT"

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("collective {op} failed talking to rank {peer}: {source}")]
    Io {
        op: &'static str,
        peer: u32,
        source: std::io::Error,
    },
    #[error("ring setup timed out after {0:?}: {1}")]
    Setup(Duration, String),
}

/// Who a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIdentity {
    /// A hash of the job id.
    pub job: u64,
    pub attempt: u64,
}

impl RingIdentity {
    pub fn new(job_id: &str, attempt: u64) -> Self {
        // FNV-1a: stable across builds and processes, unlike std's hasher.
        let job = job_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self { job, attempt }
    }

    fn encode(&self, rank: u32) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..12].copy_from_slice(&self.job.to_le_bytes());
        out[12..20].copy_from_slice(&self.attempt.to_le_bytes());
        out[20..].copy_from_slice(&rank.to_le_bytes());
        out
    }
}

/// A ring of `world` ranks. With one rank every collective is the identity.
pub struct Ring {
    rank: u32,
    world: u32,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank - 1.
    prev: Option<TcpStream>,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl Ring {
    /// Connects to the successor in `peers` and accepts the predecessor on `listener`, within `timeout`.
    pub fn connect(
        listener: TcpListener,
        peers: &[String],
        rank: u32,
        identity: RingIdentity,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let world = peers.len() as u32;
        let mut ring = Ring {
            rank,
            world,
            next: None,
            prev: None,
            send_buf: Vec::new(),
            recv_buf: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = peers[next_rank as usize].clone();
        let connector = std::thread::spawn(move || -> Result<TcpStream, String> {
            loop {
                match TcpStream::connect(&next_addr) {
                    Ok(mut stream) => {
                        stream.set_nodelay(true).map_err(|e| e.to_string())?;
                        stream
                            .write_all(&identity.encode(rank))
                            .map_err(|e| e.to_string())?;
                        return Ok(stream);
                    }
                    Err(e) if Instant::now() >= deadline => {
                        return Err(format!(
                            "connecting to rank {next_rank} at {next_addr}: {e}"
                        ));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::Setup(timeout, e.to_string()))?;
        let prev = loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(5))))
                        .map_err(|e| CommError::Setup(timeout, e.to_string()))?;
                    let mut hello = [0u8; 24];
                    // A connection that does not identify as our predecessor is dropped.
                    if stream.read_exact(&mut hello).is_ok() && hello == identity.encode(prev_rank)
                    {
                        stream.set_nodelay(true).ok();
                        break stream;
                    }
                    tracing::warn!(
                        "refused a ring connection that is not rank {prev_rank} of this attempt"
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(CommError::Setup(
                            timeout,
                            format!("rank {prev_rank} never connected"),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(CommError::Setup(timeout, e.to_string())),
            }
        };
        let next = connector
            .join()
            .map_err(|_| CommError::Setup(timeout, "connector thread panicked".into()))?
            .map_err(|e| CommError::Setup(timeout, e))?;
        for stream in [&next, &prev] {
            stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_write_timeout(Some(timeout)))
                .map_err(|e| CommError::Setup(timeout, e.to_string()))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    /// Sums `buf` element-wise across all ranks; every rank ends with identical bits.
    ///
    /// Each segment is summed in a fixed ring order, so the same inputs give the same output
    /// on every run.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let n = self.world as usize;
        if n == 1 {
            return Ok(());
        }
        let len = buf.len();
        let bounds = |i: usize| (i * len / n, (i + 1) * len / n);
        let rank = self.rank as usize;
        // Reduce-scatter: after n-1 steps rank r holds the full sum of segment (r + 1) % n.
        for s in 0..n - 1 {
            let (ss, se) = bounds((rank + n - s) % n);
            let (rs, re) = bounds((rank + n - s - 1) % n);
            let received = self.exchange("all_reduce", &buf[ss..se], re - rs)?;
            for (dst, src) in buf[rs..re].iter_mut().zip(received) {
                *dst += src;
            }
        }
        // All-gather: pass the reduced segments around the ring.
        for s in 0..n - 1 {
            let (ss, se) = bounds((rank + 1 + n - s) % n);
            let (rs, re) = bounds((rank + n - s) % n);
            let received = self.exchange("all_reduce", &buf[ss..se], re - rs)?;
            buf[rs..re].copy_from_slice(&received);
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<(), CommError> {
        let mut token = [1.0f32];
        self.all_reduce_sum(&mut token)
    }

    /// Sends `out` to the successor while receiving `len` floats from the predecessor.
    fn exchange(
        &mut self,
        op: &'static str,
        out: &[f32],
        len: usize,
    ) -> Result<Vec<f32>, CommError> {
        let next_rank = (self.rank + 1) % self.world;
        let prev_rank = (self.rank + self.world - 1) % self.world;
        let Ring {
            next: Some(next),
            prev: Some(prev),
            send_buf,
            recv_buf,
            ..
        } = self
        else {
            unreachable!("a ring of more than one rank is connected")
        };
        send_buf.clear();
        send_buf.extend(out.iter().flat_map(|f| f.to_le_bytes()));
        recv_buf.resize(len * 4, 0);
        let next: &TcpStream = next;
        let send_buf: &[u8] = send_buf;
        let (sent, received) = std::thread::scope(|scope| {
            let sender = scope.spawn(move || {
                let mut writer = next;
                writer.write_all(send_buf)
            });
            let received = prev.read_exact(recv_buf);
            if received.is_err() {
                // Unblock our own sender: the ring is broken anyway.
                let _ = next.shutdown(Shutdown::Both);
            }
            (sender.join().expect("sender thread"), received)
        });
        received.map_err(|source| CommError::Io {
            op,
            peer: prev_rank,
            source,
        })?;
        sent.map_err(|source| CommError::Io {
            op,
            peer: next_rank,
            source,
        })?;
        Ok(self
            .recv_buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on `world` ranks connected over loopback, one thread each.
    fn with_ring<T: Send + 'static>(
        world: u32,
        f: impl Fn(&mut Ring) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                let f = f.clone();
                std::thread::spawn(move || {
                    let id = RingIdentity::new("job", 1);
                    let mut ring =
                        Ring::connect(listener, &peers, rank as u32, id, Duration::from_secs(10))
                            .unwrap();
                    f(&mut ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn input(rank: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.37 + rank as f32 * 1.3).sin() * 1e3).fract())
            .collect()
    }

    #[test]
    fn all_reduce_matches_a_direct_sum_for_every_world_and_length() {
        for world in 1..=5u32 {
            for len in [0usize, 1, 3, 4, 7, 1000, 4099] {
                let results = with_ring(world, move |ring| {
                    let mut buf = input(ring.rank(), len);
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf
                });
                let expected: Vec<f32> = (0..len)
                    .map(|i| (0..world).map(|r| input(r, len)[i] as f64).sum::<f64>() as f32)
                    .collect();
                for got in &results {
                    assert_eq!(
                        got, &results[0],
                        "ranks disagree (world {world}, len {len})"
                    );
                    for (g, e) in got.iter().zip(&expected) {
                        assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{g} vs {e}");
                    }
                }
                // Deterministic: a second run gives the same bits.
                let again = with_ring(world, move |ring| {
                    let mut buf = input(ring.rank(), len);
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf
                });
                assert_eq!(again, results);
            }
        }
    }

    #[test]
    fn a_dead_peer_fails_the_collective_instead_of_hanging() {
        let results = with_ring(3, |ring| {
            if ring.rank() == 2 {
                return None; // leaves: its sockets close
            }
            ring.next
                .as_ref()
                .unwrap()
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            ring.prev
                .as_ref()
                .unwrap()
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let started = Instant::now();
            let mut buf = vec![1.0f32; 1 << 16];
            let outcome = ring.all_reduce_sum(&mut buf);
            Some((outcome.is_err(), started.elapsed()))
        });
        for (failed, took) in results.into_iter().flatten() {
            assert!(failed);
            assert!(took < Duration::from_secs(5), "took {took:?}");
        }
    }
}
