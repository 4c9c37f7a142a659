//! Checkpoint and recovery benchmarks: printed figures, not tests.
//!
//! - `checkpoint`: the training time an asynchronous checkpoint costs (the in-memory
//!   snapshot) against a synchronous save of the same state (snapshot, upload and commit), and
//!   the checkpoint write throughput to the local filesystem against a plain copy of the bytes.
//! - `recovery`: time from `kill -9` of a worker daemon to the next completed training step of
//!   the example job, on a cluster of real processes on loopback.

use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use gantry_core::JobSpec;
use gantry_worker::runtime::checkpoint::{CheckpointStore, Manifest, Shard};
use gantry_worker::runtime::data::{Dataset, Split};
use gantry_worker::runtime::model::{Gpt, TrainModel, materialize};
use gantry_worker::runtime::train::{Upload, snapshot};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(clap::Args, Clone)]
pub struct CheckpointOptions {
    /// Width of the gpt whose state is saved.
    #[arg(long, default_value_t = 384)]
    d_model: u32,
    #[arg(long, default_value_t = 6)]
    layers: u32,
    /// Bytes of the file written in the throughput comparison.
    #[arg(long, default_value_t = 256 << 20)]
    bytes: usize,
    #[arg(long, default_value_t = 9)]
    repeats: usize,
    /// Where to write (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn checkpoint(o: &CheckpointOptions) -> anyhow::Result<()> {
    // As in a rank process.
    gantry_worker::runtime::rank::keep_freed_memory();
    let tmp = tempfile::tempdir_in(o.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let url = format!("file://{}", tmp.path().display());
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // A model with Adam state after one real step: what a rank saves.
    let spec = JobSpec::from_json(&format!(
        r#"{{"name":"bench","model":{{"kind":"gpt","layers":{},"d_model":{},"heads":8}},
            "data":{{"seq_len":64,"examples":2000}},"train":{{"steps":10,"global_batch":8,"lr":0.001}}}}"#,
        o.layers, o.d_model
    ))?;
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let model = Gpt::init(&spec, &ad);
    materialize(&model);
    let data = Dataset::for_spec(&spec);
    let batch = data.batch(Split::Train, &(0..8).collect::<Vec<_>>());
    let grads = GradientsParams::from_grads(model.loss(&batch, &ad).backward(), &model);
    let mut optimizer = AdamConfig::new().init();
    let model = optimizer.step(1e-3, model, grads);
    let store = CheckpointStore::open(&url, "bench")?;

    // Synchronous: snapshot, serialise, write every file durably, commit.
    let mut sync = Vec::new();
    let mut phases = Vec::new();
    let mut size = 0;
    for i in 0..o.repeats as u64 {
        let started = Instant::now();
        let shard = snapshot(&model, &optimizer, i + 1, (1.0, None)).into_shard()?;
        let serialised = started.elapsed().as_secs_f64();
        size = shard.model.len() + shard.optimizer.len();
        io.block_on(store.write_shard(i + 1, 0, shard))?;
        let written = started.elapsed().as_secs_f64();
        io.block_on(store.commit(manifest(i + 1), 2))?;
        sync.push(started.elapsed().as_secs_f64());
        phases.push((serialised, written - serialised));
    }

    // Asynchronous, as a rank does it: the snapshot (handles, no copy), then training steps
    // with the upload thread beside them. The training time it costs is what those steps took
    // beyond steps without an upload, measured just before. Short steps (two sequences) let
    // many steps cover one upload, which averages out this machine's noise.
    let short = data.batch(Split::Train, &[0, 1]);
    let mut trained = model.clone();
    let mut opt = optimizer.clone();
    let step = |trained: &mut Gpt, opt: &mut burn::optim::ModuleOptimizer| {
        let started = Instant::now();
        let grads = GradientsParams::from_grads(trained.loss(&short, &ad).backward(), &*trained);
        *trained = opt.step(1e-3, trained.clone(), grads);
        started.elapsed().as_secs_f64()
    };
    step(&mut trained, &mut opt);
    let mut snap = Vec::new();
    let mut lost = Vec::new();
    let mut overlapped = Vec::new();
    let mut base = Vec::new();
    for i in 0..o.repeats as u64 {
        let alone = median((0..5).map(|_| step(&mut trained, &mut opt)).collect());
        let started = Instant::now();
        let taken = snapshot(&trained, &opt, 100 + i, (1.0, None));
        snap.push(started.elapsed().as_secs_f64());
        let upload = Upload::start(store.clone(), 100 + i, 0, taken, started);
        let (mut beside, mut steps) = (0.0, 0);
        while !upload.ended() {
            beside += step(&mut trained, &mut opt);
            steps += 1;
        }
        upload.wait().map_err(anyhow::Error::msg)?;
        lost.push(beside - steps as f64 * alone);
        overlapped.push(steps as f64);
        base.push(alone);
    }
    let sync = median(sync);
    let (serialise, write) = (
        median(phases.iter().map(|p| p.0).collect()),
        median(phases.iter().map(|p| p.1).collect()),
    );
    let (snap, lost) = (median(snap), median(lost).max(0.0));
    println!(
        "checkpoint of a {}-layer d_model={} gpt with Adam state ({:.1} MiB), median of {}:",
        o.layers,
        o.d_model,
        size as f64 / (1 << 20) as f64,
        o.repeats
    );
    println!(
        "  synchronous save: {:.1} ms (serialise {:.1} ms, durable write {:.1} ms, commit)",
        sync * 1e3,
        serialise * 1e3,
        write * 1e3
    );
    println!(
        "  asynchronous: training waits {:.1} ms for the snapshot, then {:.0} steps of {:.0} ms \
         run beside the upload",
        snap * 1e3,
        median(overlapped),
        median(base) * 1e3
    );
    println!(
        "  asynchronous: those steps take {:.1} ms longer than without it",
        lost * 1e3
    );
    println!(
        "  stall ratio: {:.1}% of the synchronous save (target <= 5%)",
        100.0 * (snap + lost) / sync
    );

    // Throughput: a shard of `bytes` through the checkpoint store against a plain file copy of
    // the same bytes. The store makes its files durable before a put returns (a committed
    // checkpoint must survive a power loss), so each copy is synced too: both are measured to
    // the disk, not to the page cache.
    let payload: Vec<u8> = (0..o.bytes).map(|i| (i * 2_654_435_761) as u8).collect();
    let source = tmp.path().join("source.bin");
    std::fs::write(&source, &payload)?;
    std::fs::File::open(&source)?.sync_all()?;
    let payload = bytes::Bytes::from(payload);
    let mut ours = Vec::new();
    let mut copy = Vec::new();
    for i in 0..o.repeats {
        let target = tmp.path().join(format!("copy-{i}.bin"));
        let started = Instant::now();
        std::fs::copy(&source, &target)?;
        std::fs::File::open(&target)?.sync_all()?;
        std::fs::File::open(tmp.path())?.sync_all()?;
        copy.push(started.elapsed().as_secs_f64());
        let shard = Shard {
            model: payload.clone(),
            optimizer: Default::default(),
            data_cursor: 0,
            loss: None,
            eval_loss: None,
        };
        let started = Instant::now();
        io.block_on(store.write_shard(1000 + i as u64, 0, shard))?;
        ours.push(started.elapsed().as_secs_f64());
    }
    let mib = o.bytes as f64 / (1 << 20) as f64;
    let (ours, copy) = (mib / median(ours), mib / median(copy));
    println!(
        "durable write throughput to the local filesystem, {mib:.0} MiB, median of {}:",
        o.repeats
    );
    println!("  checkpoint store (CRC-32C, staged file, fsync, rename): {ours:8.0} MiB/s");
    println!("  plain file copy (std::fs::copy, fsync file and dir):    {copy:8.0} MiB/s");
    println!(
        "  ratio: {:.0}% of a plain file copy (target >= 80%)",
        100.0 * ours / copy
    );
    Ok(())
}

fn manifest(step: u64) -> Manifest {
    Manifest {
        format: 2,
        job_id: "bench".into(),
        step,
        attempt: 1,
        world_size: 1,
        dp: 1,
        tp: 1,
        pp: 1,
        files: Vec::new(),
        total_bytes: 0,
    }
}

#[derive(clap::Args, Clone)]
pub struct RecoveryOptions {
    /// The job to run (any example spec).
    #[arg(long, default_value = "deploy/examples/mlp-dp2.toml")]
    spec: PathBuf,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Real daemons next to this executable, killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    children: Vec<Child>,
    bin: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn gantry(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(self.bin.join("gantry"))
            .args(["--coordinator", &self.url])
            .args(args)
            .args(["-o", "json"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "gantry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn worker(&mut self) -> anyhow::Result<()> {
        let i = self.children.len();
        let child = Command::new(self.bin.join("gantry-worker"))
            .args(["--coordinator", &self.url, "--slots", "1"])
            .arg("--work-dir")
            .arg(self.dir.path().join(format!("worker-{i}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.children.push(child);
        Ok(())
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            status
                .lines()
                .any(|l| l == format!("PPid:\t{pid}"))
                .then(|| e.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
        .collect()
}

pub fn recovery(o: &RecoveryOptions) -> anyhow::Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    anyhow::ensure!(
        bin.join("gantry").exists() && bin.join("gantry-coordinator").exists(),
        "build the binaries first: cargo build --release --bins"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let coordinator = Command::new(bin.join("gantry-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--lease-ttl-ms", "3000", "--heartbeat-interval-ms", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut cluster = Cluster {
        dir,
        url: format!("http://127.0.0.1:{port}"),
        children: vec![coordinator],
        bin,
    };
    // Two workers for the dp=2 job and a spare per kill.
    for _ in 0..2 + o.repeats {
        cluster.worker()?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let spec = o.spec.to_str().unwrap_or_default();
    let job = cluster.gantry(&[
        "submit",
        spec,
        "--set",
        "train.steps=100000000",
        "--set",
        "checkpoint.every_steps=200",
        "--set",
        &format!("fault_tolerance.max_restarts={}", o.repeats + 1),
    ])?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let mut times = Vec::new();
    for _ in 0..o.repeats {
        // Wait until the job trains, past a checkpoint.
        let before = loop {
            let s = cluster.gantry(&["status", &id])?;
            if s["state"] == "Running" && s["last_checkpoint"].is_object() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let attempt = before["attempt"].as_u64().unwrap_or(0);
        let victim = cluster.children[1..]
            .iter_mut()
            .find(|c| !children_of(c.id()).is_empty())
            .ok_or_else(|| anyhow::anyhow!("no worker runs a rank"))?;
        let killed = Instant::now();
        victim.kill()?; // SIGKILL
        victim.wait()?;
        // The next completed step: the new attempt reports a step past its resume point.
        let mut resumed_at = None;
        loop {
            let s = cluster.gantry(&["status", &id])?;
            let step = s["step"].as_u64().unwrap_or(0);
            if s["attempt"].as_u64().unwrap_or(0) > attempt && s["state"] == "Running" {
                let from = *resumed_at.get_or_insert(step);
                if step > from {
                    break;
                }
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "no recovery in 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let seconds = killed.elapsed().as_secs_f64();
        println!("  worker kill -9 -> next completed step: {seconds:.2} s");
        times.push(seconds);
    }
    println!(
        "recovery time, median of {}: {:.2} s (target <= 5 s; includes the default 1 s restart backoff)",
        o.repeats,
        median(times)
    );
    Ok(())
}
