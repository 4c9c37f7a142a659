//! The TCP backend against direct computations, with one thread per rank over loopback.

use crate::tcp::{Identity, TcpComm};
use crate::{CommError, Communicator, ReduceOp};
use gantry_core::Mesh;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// `n` listeners on loopback, and their addresses.
fn listeners(n: u32) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (listeners, peers)
}

/// Runs `f` on every rank of a fresh world of `n`, one thread each.
fn with_world<T: Send + 'static>(
    n: u32,
    identities: impl Fn(u32) -> Identity,
    timeout: Duration,
    f: impl Fn(Result<TcpComm, CommError>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let (listeners, peers) = listeners(n);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (peers, f, identity) = (peers.clone(), f.clone(), identities(rank as u32));
            std::thread::spawn(move || {
                f(TcpComm::connect(
                    listener,
                    &peers,
                    rank as u32,
                    identity,
                    timeout,
                ))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The attempt's key in these tests.
const KEY: [u8; 32] = [42; 32];

/// A rank of attempt 1 of "job", holding its key.
fn member() -> Identity {
    Identity::new("job", 1, KEY)
}

fn world<T: Send + 'static>(
    n: u32,
    f: impl Fn(&mut TcpComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    with_world(
        n,
        |_| member(),
        Duration::from_secs(20),
        move |c| f(&mut c.unwrap()),
    )
}

fn input(rank: u32, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 * 0.37 + rank as f32 * 1.3).sin() * 1e3).fract())
        .collect()
}

fn close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{g} vs {w}"
        );
    }
}

/// Small lengths take the one-hop or recursive-doubling path; 20_000 (80 KB) takes the ring.
const LENGTHS: [usize; 9] = [0, 1, 2, 3, 4, 7, 1000, 4099, 20_000];

#[test]
fn all_reduce_sum_avg_max_match_direct_computation() {
    for n in 1..=5u32 {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let run = move || {
                world(n, move |c| {
                    LENGTHS
                        .iter()
                        .map(|&len| {
                            let mut buf = input(c.world_rank(), len);
                            c.world().all_reduce(&mut buf, op).unwrap();
                            buf
                        })
                        .collect::<Vec<_>>()
                })
            };
            let results = run();
            for (k, &len) in LENGTHS.iter().enumerate() {
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
                let want: Vec<f64> = (0..len)
                    .map(|i| {
                        let vals = inputs.iter().map(|v| f64::from(v[i]));
                        match op {
                            ReduceOp::Sum => vals.sum(),
                            ReduceOp::Avg => vals.sum::<f64>() / f64::from(n),
                            ReduceOp::Max => vals.fold(f64::MIN, f64::max),
                        }
                    })
                    .collect();
                for r in &results {
                    assert_eq!(
                        r[k], results[0][k],
                        "ranks disagree: n={n} len={len} {op:?}"
                    );
                    close(&r[k], &want);
                }
            }
            assert_eq!(
                run(),
                results,
                "a second run gives the same bits (n={n} {op:?})"
            );
        }
    }
}

#[test]
fn large_buffers_cross_many_chunks() {
    let len = 300_007; // more than two pipelined chunks, not a multiple of anything
    let results = world(3, move |c| {
        let mut buf = input(c.world_rank(), len);
        c.world().all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        buf
    });
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(r, len)).collect();
    let want: Vec<f64> = (0..len)
        .map(|i| inputs.iter().map(|v| f64::from(v[i])).sum())
        .collect();
    for r in &results {
        close(r, &want);
    }
}

#[test]
fn reduce_scatter_all_gather_broadcast_send_recv() {
    for n in 1..=5u32 {
        for part in [0usize, 1, 3, 1000] {
            let results = world(n, move |c| {
                let rank = c.world_rank();
                let mut g = c.world();
                let mut rs = vec![0.0; part];
                g.reduce_scatter(&input(rank, part * n as usize), &mut rs, ReduceOp::Sum)
                    .unwrap();
                let mut ag = vec![0.0; part * n as usize];
                g.all_gather(&input(rank, part), &mut ag).unwrap();
                let mut bc: Vec<Vec<f32>> = Vec::new();
                for root in 0..n {
                    let mut buf = input(rank, part);
                    g.broadcast(&mut buf, root).unwrap();
                    bc.push(buf);
                }
                // A ring of sends: each rank sends to the next and receives from the previous.
                let mut got = vec![0.0; part];
                if n > 1 {
                    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
                    if rank % 2 == 0 {
                        g.send(&input(rank, part), next).unwrap();
                        g.recv(&mut got, prev).unwrap();
                    } else {
                        g.recv(&mut got, prev).unwrap();
                        g.send(&input(rank, part), next).unwrap();
                    }
                }
                (rs, ag, bc, got)
            });
            for (rank, (rs, ag, bc, got)) in results.iter().enumerate() {
                let rank = rank as u32;
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, part * n as usize)).collect();
                let want_rs: Vec<f64> = (0..part)
                    .map(|i| {
                        inputs
                            .iter()
                            .map(|v| f64::from(v[rank as usize * part + i]))
                            .sum()
                    })
                    .collect();
                close(rs, &want_rs);
                let want_ag: Vec<f32> = (0..n).flat_map(|r| input(r, part)).collect();
                assert_eq!(ag, &want_ag);
                for (root, b) in bc.iter().enumerate() {
                    assert_eq!(b, &input(root as u32, part));
                }
                if n > 1 {
                    assert_eq!(got, &input((rank + n - 1) % n, part));
                }
            }
        }
    }
}

#[test]
fn every_subgroup_of_a_2x2x2_mesh() {
    let mesh = Mesh::new(2, 2, 2);
    let results = world(8, move |c| {
        let rank = c.world_rank();
        let mut out = Vec::new();
        for members in [
            mesh.dp_group(rank),
            mesh.tp_group(rank),
            mesh.pp_group(rank),
        ] {
            let mut g = c.group(&members).unwrap();
            let mut buf = input(rank, 13);
            g.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
            let mut gathered = vec![0.0; 2 * 5];
            g.all_gather(&input(rank, 5), &mut gathered).unwrap();
            out.push((members, buf, gathered));
        }
        out
    });
    for per_rank in &results {
        for (members, sum, gathered) in per_rank {
            let want: Vec<f64> = (0..13)
                .map(|i| members.iter().map(|&m| f64::from(input(m, 13)[i])).sum())
                .collect();
            close(sum, &want);
            let want_gather: Vec<f32> = members.iter().flat_map(|&m| input(m, 5)).collect();
            assert_eq!(gathered, &want_gather);
        }
    }
}

#[test]
fn a_dead_peer_fails_every_survivor_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    let results = with_world(
        3,
        |_| member(),
        timeout,
        move |c| {
            let mut c = c.unwrap();
            if c.world_rank() == 2 {
                return None; // dies: its sockets close
            }
            let started = Instant::now();
            let mut buf = vec![1.0f32; 1 << 20];
            let outcome = c.world().all_reduce(&mut buf, ReduceOp::Sum);
            Some((outcome.map_err(|e| e.to_string()), started.elapsed()))
        },
    );
    for (outcome, took) in results.into_iter().flatten() {
        assert!(outcome.is_err(), "a survivor's all-reduce succeeded");
        assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    }
}

#[test]
fn a_silent_peer_times_out_and_abort_unblocks_from_another_thread() {
    let results = with_world(
        2,
        |_| member(),
        Duration::from_millis(700),
        move |c| {
            let mut c = c.unwrap();
            if c.world_rank() == 1 {
                std::thread::sleep(Duration::from_secs(3)); // alive, but never joins the collective
                return String::new();
            }
            let started = Instant::now();
            let err = c
                .world()
                .all_reduce(&mut [1.0; 8], ReduceOp::Sum)
                .unwrap_err();
            assert!(matches!(err, CommError::Timeout { .. }), "{err}");
            assert!(started.elapsed() < Duration::from_secs(2));
            c.set_timeout(Duration::from_secs(60));
            let abort = c.abort_handle();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                abort.abort();
            });
            let started = Instant::now();
            let err = c
                .world()
                .all_reduce(&mut [1.0; 8], ReduceOp::Sum)
                .unwrap_err();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "abort took {:?}",
                started.elapsed()
            );
            err.to_string()
        },
    );
    assert!(results[0].contains("aborted"), "{}", results[0]);
}

#[test]
fn ranks_running_different_collectives_fail_instead_of_mixing_data() {
    let results = world(2, |c| {
        let mut g = c.world();
        if g.rank() == 0 {
            g.all_reduce(&mut [1.0; 4], ReduceOp::Sum)
                .map_err(|e| e.to_string())
        } else {
            g.all_gather(&[1.0; 2], &mut [0.0; 4])
                .map_err(|e| e.to_string())
        }
    });
    assert!(
        results.iter().any(|r| r
            .as_ref()
            .is_err_and(|e| e.contains("different collective"))),
        "{results:?}"
    );
}

#[test]
fn a_rank_of_another_attempt_cannot_join() {
    let results = with_world(
        2,
        |rank| {
            if rank == 1 {
                Identity::new("job", 7, KEY)
            } else {
                member()
            }
        },
        Duration::from_millis(800),
        |c| c.is_err(),
    );
    assert_eq!(results, [true, true]);
}

#[test]
fn a_rank_without_the_attempts_secret_cannot_join() {
    let results = with_world(
        2,
        |rank| Identity::new("job", 1, if rank == 1 { [7; 32] } else { KEY }),
        Duration::from_millis(800),
        |c| c.map(|_| ()).map_err(|e| e.to_string()),
    );
    let refused = results[1].as_ref().unwrap_err();
    assert!(
        refused.contains("does not hold this attempt's secret"),
        "{refused}"
    );
    assert!(
        results[0].is_err(),
        "rank 0 linked a rank without the secret"
    );
}

/// A process that knows the job, the attempt and a rank number but not the secret connects
/// first and claims rank 1: it is dropped, the real rank 1 joins, and the world works.
#[test]
fn an_intruder_without_the_secret_is_dropped_and_the_world_forms_without_it() {
    use std::io::{Read, Write};
    let (listeners, peers) = listeners(2);
    // The intruder's opening: rank 1's hello, as `Identity::hello` writes it, and a nonce.
    let mut intruder = std::net::TcpStream::connect(&peers[0]).unwrap();
    let mut opening = Vec::new();
    opening.extend_from_slice(&0x4741_4e54u32.to_le_bytes()); // the frames' magic, "GANT"
    opening.extend_from_slice(&member().job.to_le_bytes());
    opening.extend_from_slice(&1u64.to_le_bytes());
    opening.extend_from_slice(&1u32.to_le_bytes());
    opening.extend_from_slice(&[0u8; 16]);
    intruder.write_all(&opening).unwrap();
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                if rank == 1 {
                    // After the intruder has been answered.
                    std::thread::sleep(Duration::from_millis(200));
                }
                let mut c = TcpComm::connect(
                    listener,
                    &peers,
                    rank as u32,
                    member(),
                    Duration::from_secs(10),
                )
                .unwrap();
                let mut v = vec![rank as f32 + 1.0; 4];
                c.world().all_reduce(&mut v, ReduceOp::Sum).unwrap();
                v
            })
        })
        .collect();
    // Rank 0 answers with its nonce and proof, then wants a proof the intruder cannot make.
    let mut answer = [0u8; 48];
    intruder.read_exact(&mut answer).unwrap();
    intruder.write_all(&[0u8; 32]).unwrap();
    let mut ack = [0u8; 1];
    assert!(
        !matches!(intruder.read(&mut ack), Ok(1)),
        "rank 0 acknowledged the intruder"
    );
    for t in threads {
        assert_eq!(t.join().unwrap(), [3.0; 4]);
    }
}
