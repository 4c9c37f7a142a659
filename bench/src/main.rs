//! `gantry-bench`: collective benchmarks over real rank processes on this machine, reported like
//! nccl-tests (median time, algorithm bandwidth, bus bandwidth).
//!
//! ```text
//! gantry-bench collectives --world 2,4                     # all-reduce, reduce-scatter, all-gather, send/recv
//! gantry-bench collectives --ops all_reduce --max-bytes 64MiB
//! gantry-bench checkpoint                                  # async stall, write throughput
//! gantry-bench recovery                                    # worker kill -9 -> next step
//! gantry-bench gpu                                         # on a GPU machine: scripts/gpu-check
//! ```

mod faults;
mod gpu;
mod overhead;

use clap::{Parser, Subcommand, ValueEnum};
use gantry_collective::tcp::{Identity, TcpComm};
use gantry_collective::{Communicator, ReduceOp};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "gantry-bench", about = "Gantry benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// TCP collectives between local rank processes.
    Collectives(Options),
    /// Checkpoint stall (async against sync) and write throughput (against a file copy).
    Checkpoint(faults::CheckpointOptions),
    /// Time from a worker's kill -9 to the next completed step, on a local cluster.
    Recovery(faults::RecoveryOptions),
    /// A training step as a dp = 1 Gantry job against the same step in a bare burn loop.
    Overhead(overhead::OverheadOptions),
    /// The device check on a GPU machine (scripts/gpu-check): CUDA against CPU, NCCL, step time.
    Gpu(gpu::GpuOptions),
    /// One rank of a benchmark (started by `collectives`).
    #[command(hide = true)]
    Rank {
        #[command(flatten)]
        options: Options,
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        world_size: u32,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
#[value(rename_all = "snake_case")]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    SendRecv,
}

#[derive(clap::Args, Clone)]
struct Options {
    /// World sizes to run, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    world: Vec<u32>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all_reduce,reduce_scatter,all_gather,send_recv"
    )]
    ops: Vec<Op>,
    /// Smallest message (bytes per rank buffer, e.g. 1024, 64KiB, 1MiB); sizes grow ×4 up to
    /// --max-bytes.
    #[arg(long, default_value = "1KiB", value_parser = parse_bytes)]
    min_bytes: usize,
    /// Largest message, with the same units.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    max_bytes: usize,
    /// Seconds to spend timing each size (at least 3 and at most 200 iterations).
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
}

/// A size in bytes: a plain number, or one with a unit: `KiB`, `MiB`, `GiB` (also `K`, `M`,
/// `G`: powers of 1024) or `KB`, `MB`, `GB` (powers of 1000), `B` for bytes.
pub(crate) fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4096, 64KiB, 1MiB)"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unit {other:?} of {text:?} is not one of B, KiB, MiB, GiB, KB, MB, GB"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Reference all-reduce bus bandwidths (GB/s) measured on this machine type and recorded in
/// shared/TOOLCHAIN.md: (bytes, world, OpenMPI over TCP, gloo).
const BASELINES: &[(usize, u32, f64, f64)] = &[
    (64 << 10, 2, 1.05, 0.11),
    (64 << 10, 4, 0.67, 0.014),
    (1 << 20, 2, 0.8, 0.86),
    (1 << 20, 4, 0.70, 0.20),
    (16 << 20, 2, 1.17, 1.04),
    (16 << 20, 4, 0.60, 0.68),
    (256 << 20, 2, 0.87, 1.20),
    (256 << 20, 4, 0.58, 0.89),
];

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Bench::Collectives(options) => launch(&options),
        Bench::Checkpoint(options) => faults::checkpoint(&options),
        Bench::Recovery(options) => faults::recovery(&options),
        Bench::Overhead(options) => overhead::overhead(&options),
        Bench::Gpu(options) => gpu::gpu(&options),
        Bench::Rank {
            options,
            rank,
            world_size,
            dir,
        } => rank_main(&options, rank, world_size, &dir),
    }
}

fn sizes(o: &Options) -> Vec<usize> {
    std::iter::successors(Some(o.min_bytes.max(4)), |s| Some(s * 4))
        .take_while(|s| *s <= o.max_bytes)
        .collect()
}

fn launch(o: &Options) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    println!(
        "{:<15} {:>3} {:>12} {:>12} {:>10} {:>10}  all-reduce busbw vs baselines (TOOLCHAIN.md)",
        "op", "ws", "bytes", "median µs", "algbw GB/s", "busbw GB/s",
    );
    for &world in &o.world {
        let dir = tempfile::tempdir()?;
        let mut children = Vec::new();
        for rank in 0..world {
            let mut cmd = Command::new(&exe);
            cmd.arg("rank")
                .args([
                    "--rank",
                    &rank.to_string(),
                    "--world-size",
                    &world.to_string(),
                ])
                .arg("--dir")
                .arg(dir.path())
                .args([
                    "--min-bytes",
                    &o.min_bytes.to_string(),
                    "--max-bytes",
                    &o.max_bytes.to_string(),
                ])
                .args(["--seconds", &o.seconds.to_string()])
                .arg("--ops")
                .arg(
                    o.ops
                        .iter()
                        .map(|op| {
                            op.to_possible_value()
                                .expect("named")
                                .get_name()
                                .to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                );
            children.push(cmd.spawn()?);
        }
        for mut child in children {
            anyhow::ensure!(child.wait()?.success(), "a benchmark rank failed");
        }
    }
    Ok(())
}

/// Publishes this rank's address in `dir` and waits for everyone's.
fn meet(dir: &Path, rank: u32, world: u32, listener: &TcpListener) -> anyhow::Result<Vec<String>> {
    let tmp = dir.join(format!(".addr-{rank}"));
    std::fs::write(&tmp, listener.local_addr()?.to_string())?;
    std::fs::rename(&tmp, dir.join(format!("addr-{rank}")))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers: Option<Vec<String>> = (0..world)
            .map(|r| std::fs::read_to_string(dir.join(format!("addr-{r}"))).ok())
            .collect();
        if let Some(peers) = peers {
            return Ok(peers);
        }
        anyhow::ensure!(Instant::now() < deadline, "peers never showed up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rank_main(o: &Options, rank: u32, world: u32, dir: &Path) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let peers = meet(dir, rank, world, &listener)?;
    let mut comm = TcpComm::connect(
        listener,
        &peers,
        rank,
        Identity::new("bench", 1, [1; 32]),
        Duration::from_secs(60),
    )?;
    let n = world as usize;
    for &op in &o.ops {
        if op == Op::SendRecv && !world.is_multiple_of(2) {
            continue;
        }
        for bytes in sizes(o) {
            let len = bytes / 4;
            // Per-rank buffers, allocated once per size, outside the timed loop.
            let mut buf = vec![1.0f32; len];
            let mut out = vec![
                0.0f32;
                match op {
                    Op::ReduceScatter => len / n,
                    Op::AllGather => len * n,
                    _ => 0,
                }
            ];
            let mut g = comm.world();
            let mut once = |g: &mut dyn Communicator| -> anyhow::Result<()> {
                match op {
                    Op::AllReduce => g.all_reduce(&mut buf, ReduceOp::Sum)?,
                    Op::ReduceScatter => {
                        g.reduce_scatter(&buf[..(len / n) * n], &mut out, ReduceOp::Sum)?
                    }
                    Op::AllGather => g.all_gather(&buf, &mut out)?,
                    // Pairs (0→1, 2→3, …): one-way transfer of the buffer.
                    Op::SendRecv if rank.is_multiple_of(2) => g.send(&buf, rank + 1)?,
                    Op::SendRecv => g.recv(&mut buf, rank - 1)?,
                }
                Ok(())
            };
            for _ in 0..2 {
                once(&mut g)?;
            }
            // Rank 0 decides how many timed iterations everyone runs.
            let mut plan = [0.0f32];
            if rank == 0 {
                let started = Instant::now();
                once(&mut g)?;
                let per = started.elapsed().as_secs_f64().max(1e-6);
                plan[0] = (o.seconds / per).clamp(3.0, 200.0).round() as f32;
            } else {
                once(&mut g)?;
            }
            g.all_reduce(&mut plan, ReduceOp::Max)?;
            let mut times = Vec::new();
            for _ in 0..plan[0] as usize {
                g.barrier()?;
                let started = Instant::now();
                once(&mut g)?;
                times.push(started.elapsed().as_secs_f64());
            }
            // The slowest rank's time is the operation's time.
            let mut slowest = times.iter().map(|t| *t as f32).collect::<Vec<_>>();
            g.all_reduce(&mut slowest, ReduceOp::Max)?;
            if rank == 0 {
                report(op, world, bytes, &mut slowest);
            }
        }
    }
    Ok(())
}

fn report(op: Op, world: u32, bytes: usize, times: &mut [f32]) {
    times.sort_by(f32::total_cmp);
    let median = f64::from(times[times.len() / 2]);
    let n = f64::from(world);
    // nccl-tests' conventions: the size is the full buffer, busbw corrects for the algorithm.
    let (size, factor) = match op {
        Op::AllReduce => (bytes as f64, 2.0 * (n - 1.0) / n),
        Op::ReduceScatter => (bytes as f64, (n - 1.0) / n),
        Op::AllGather => (bytes as f64 * n, (n - 1.0) / n),
        Op::SendRecv => (bytes as f64, 1.0),
    };
    let algbw = size / median / 1e9;
    let busbw = algbw * factor;
    let versus = BASELINES
        .iter()
        .find(|(b, w, _, _)| op == Op::AllReduce && *b == bytes && *w == world)
        .map_or(String::new(), |(_, _, mpi, gloo)| {
            format!(
                "{:.2}× OpenMPI-TCP ({mpi}), {:.2}× gloo ({gloo})",
                busbw / mpi,
                busbw / gloo
            )
        });
    let name = op
        .to_possible_value()
        .expect("named")
        .get_name()
        .to_string();
    println!(
        "{name:<15} {world:>3} {bytes:>12} {:>12.1} {algbw:>10.3} {busbw:>10.3}  {versus}",
        median * 1e6
    );
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_take_the_units_the_readme_shows() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("256M"), Ok(256 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        let bad = parse_bytes("1 parsec").unwrap_err();
        assert!(bad.contains("\"parsec\""), "{bad}");
        assert!(parse_bytes("MiB").unwrap_err().contains("not a size"));
    }
}
