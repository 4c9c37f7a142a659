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
use gantry_worker::runtime::train::snapshot;
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
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Where to write (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn checkpoint(o: &CheckpointOptions) -> anyhow::Result<()> {
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
    let take = || snapshot(&model, &optimizer, 1, (1.0, None));
    let store = CheckpointStore::open(&url, "bench")?;
    let mut stall = Vec::new();
    let mut sync = Vec::new();
    let mut size = 0;
    for i in 0..o.repeats as u64 {
        // Asynchronous: training waits only for the snapshot (serialising and uploading happen
        // on the upload thread).
        let started = Instant::now();
        let taken = take();
        stall.push(started.elapsed().as_secs_f64());
        drop(taken);
        // Synchronous: snapshot, serialise, write every file, commit.
        let started = Instant::now();
        let shard = take().into_shard()?;
        size = shard.model.len() + shard.optimizer.len();
        io.block_on(store.write_shard(i + 1, 0, shard))?;
        io.block_on(store.commit(manifest(i + 1), 2))?;
        sync.push(started.elapsed().as_secs_f64());
    }
    // Training time lost to an asynchronous checkpoint: steps with the upload thread running
    // beside them (sharing this machine's cores and memory) against the same steps without.
    let mut trained = model.clone();
    let mut opt = optimizer.clone();
    let steps = |n: usize, trained: &mut Gpt, opt: &mut burn::optim::ModuleOptimizer| {
        let started = Instant::now();
        for _ in 0..n {
            let grads =
                GradientsParams::from_grads(trained.loss(&batch, &ad).backward(), &*trained);
            *trained = opt.step(1e-3, trained.clone(), grads);
        }
        started.elapsed().as_secs_f64()
    };
    let per_step = steps(2, &mut trained, &mut opt) / 2.0;
    // Enough steps to cover one synchronous save.
    let n = ((median(sync.clone()) / per_step).ceil() as usize).clamp(2, 200);
    let mut lost = Vec::new();
    for i in 0..o.repeats as u64 {
        let alone = steps(n, &mut trained, &mut opt);
        let taken = snapshot(&trained, &opt, 100 + i, (1.0, None));
        let uploader = {
            let store = store.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let io = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                io.block_on(store.write_shard(100 + i, 0, taken.into_shard()?))?;
                Ok(())
            })
        };
        let beside = steps(n, &mut trained, &mut opt);
        uploader.join().expect("upload thread")?;
        lost.push((beside - alone).max(0.0));
    }
    let lost = median(lost);
    let (stall, sync) = (median(stall), median(sync));
    println!(
        "checkpoint of a {}-layer d_model={} gpt with Adam state ({:.1} MiB), median of {}:",
        o.layers,
        o.d_model,
        size as f64 / (1 << 20) as f64,
        o.repeats
    );
    println!(
        "  synchronous save (snapshot + upload + commit): {:8.1} ms",
        sync * 1e3
    );
    println!(
        "  asynchronous: training waits for the snapshot:  {:8.1} ms",
        stall * 1e3
    );
    println!(
        "  asynchronous: {n} training steps slow down by    {:8.1} ms while the upload runs beside them",
        lost * 1e3
    );
    println!(
        "  stall ratio: {:.1}% of the synchronous save (target <= 5%)",
        100.0 * (stall + lost) / sync
    );

    // Throughput: a shard of `bytes` through the checkpoint store against a plain file copy.
    let payload: Vec<u8> = (0..o.bytes).map(|i| (i * 2_654_435_761) as u8).collect();
    let source = tmp.path().join("source.bin");
    std::fs::write(&source, &payload)?;
    let mut ours = Vec::new();
    let mut copy = Vec::new();
    let mut write = Vec::new();
    for i in 0..o.repeats {
        let target = tmp.path().join(format!("copy-{i}.bin"));
        let started = Instant::now();
        std::fs::copy(&source, &target)?;
        copy.push(started.elapsed().as_secs_f64());
        std::fs::remove_file(&target)?;
        let started = Instant::now();
        std::fs::write(&target, &payload)?;
        write.push(started.elapsed().as_secs_f64());
        std::fs::remove_file(&target)?;
        let shard = Shard {
            model: payload.clone(),
            optimizer: Vec::new(),
            data_cursor: 0,
            loss: None,
            eval_loss: None,
        };
        let started = Instant::now();
        io.block_on(store.write_shard(1000 + i as u64, 0, shard))?;
        ours.push(started.elapsed().as_secs_f64());
    }
    let mib = o.bytes as f64 / (1 << 20) as f64;
    let (ours, copy, write) = (mib / median(ours), mib / median(copy), mib / median(write));
    println!(
        "write throughput to the local filesystem, {mib:.0} MiB, median of {}:",
        o.repeats
    );
    println!("  checkpoint store (CRC-32C, staged file, rename): {ours:8.0} MiB/s");
    println!("  the same bytes from memory with std::fs::write:   {write:8.0} MiB/s");
    println!("  plain file copy (std::fs::copy, in the kernel):   {copy:8.0} MiB/s");
    println!(
        "  ratio: {:.0}% of writing the bytes, {:.0}% of a kernel file copy (target >= 80%)",
        100.0 * ours / write,
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
