//! Checkpoint and recovery benchmarks: printed figures, not tests.
//!
//! - `checkpoint`: the training time an asynchronous checkpoint costs (the in-memory
//!   snapshot) against a synchronous save of the same state (snapshot, upload and commit), and
//!   the checkpoint write throughput to the local filesystem against a plain copy of the bytes.
//! - `recovery`: time from `kill -9` of a worker daemon to the next completed training step of
//!   the example job, on a cluster of real processes on loopback.

use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use gantry_checkpoint::{CheckpointStore, Shard};
use gantry_core::{Attempt, JobSpec, Rank};
use gantry_trainer::data::{Dataset, Split};
use gantry_trainer::job::RankJob;
use gantry_trainer::model::{Gpt, TrainModel, materialize};
use gantry_trainer::report::Reporter;
use gantry_trainer::upload::{self, Commit, Upload, snapshot};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The first and third quartiles.
fn quartiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 4], v[v.len() * 3 / 4])
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
    /// Checkpoints of each kind measured (each async one is a triple of training windows).
    #[arg(long, default_value_t = 30)]
    repeats: usize,
    /// Where to write (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn checkpoint(o: &CheckpointOptions) -> anyhow::Result<()> {
    // As in a rank process.
    gantry_trainer::rank::keep_freed_memory();
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
    // The trainer's own pipeline drives every save below: snapshot, upload, commit.
    let job = RankJob {
        job_id: "bench".into(),
        attempt: Attempt::FIRST,
        rank: Rank::LEADER,
        spec: spec.clone(),
        resume_step: None,
        store_options: Default::default(),
        dataset_sha256: None,
    };
    let reporter = Reporter::quiet();
    let manifest = |step| upload::manifest(&job, 1, step);

    // Synchronous: snapshot, serialise, write every file durably, commit.
    let mut sync = Vec::new();
    let mut phases = Vec::new();
    let mut size = 0;
    for i in 0..o.repeats as u64 {
        let started = Instant::now();
        let shard = snapshot(&model, &optimizer, i + 1, (1.0, None)).into_shard()?;
        let serialised = started.elapsed().as_secs_f64();
        size = shard.model.len() + shard.optimizer.len();
        io.block_on(store.write_shard(i + 1, Rank::LEADER, shard))?;
        let written = started.elapsed().as_secs_f64();
        upload::commit(&store, manifest(i + 1), 2, started, &reporter, &io)?;
        sync.push(started.elapsed().as_secs_f64());
        phases.push((serialised, written - serialised));
    }

    // Asynchronous, as a rank does it: the snapshot (handles, no copy), then training steps
    // with the upload thread beside them. The training is blocked only for the snapshot. What
    // the upload beside it costs the steps is measured in windows of equal length, a window
    // that starts with a checkpoint against a window without one, in sums (this machine's
    // noise is right-skewed, so sums are compared with sums, not with a typical step). Each
    // repeat takes three windows next to each other, one with a checkpoint and two without,
    // in rotating order so that drift cancels. The two without give a control: how much two
    // windows differ when nothing differs, which is what this machine can resolve. Short
    // steps (two sequences) let several steps cover one upload.
    let short = data.batch(Split::Train, &[0, 1]);
    let mut trained = model.clone();
    let mut opt = optimizer.clone();
    let step = |trained: &mut Gpt, opt: &mut burn::optim::ModuleOptimizer| {
        let started = Instant::now();
        let grads = GradientsParams::from_grads(trained.loss(&short, &ad).backward(), &*trained);
        *trained = opt.step(1e-3, trained.clone(), grads);
        started.elapsed().as_secs_f64()
    };
    // Rank 0 commits on a thread of its own once the upload ended, as a rank does (with
    // retention, which keeps the disk's cache from growing with every window).
    let start_commit = |at: u64| Commit::start(&store, manifest(at), 2, Instant::now(), &reporter);
    // (time spent in steps, time blocked for the snapshot, steps the checkpoint overlapped).
    // A checkpoint still in flight at the end of the window counts its wait as time spent.
    let window = |trained: &mut Gpt,
                  opt: &mut burn::optim::ModuleOptimizer,
                  checkpoint: Option<u64>,
                  steps: usize|
     -> anyhow::Result<(f64, f64, usize)> {
        let started = Instant::now();
        let mut upload = checkpoint.map(|at| {
            let taken = snapshot(trained, opt, at, (1.0, None));
            Upload::start(store.clone(), at, Rank::LEADER, taken, started)
        });
        let blocked = started.elapsed().as_secs_f64();
        let (mut spent, mut covered, mut commit) = (0.0, 0, None);
        for n in 0..steps {
            spent += step(trained, opt);
            if let (Some(at), Some(done)) = (checkpoint, upload.take_if(|u| u.ended())) {
                done.wait().map_err(anyhow::Error::msg)?;
                commit = Some(start_commit(at));
            }
            if upload.is_some() || commit.as_ref().is_some_and(|c| !c.ended()) {
                covered = n + 1;
            }
        }
        let Some(at) = checkpoint else {
            return Ok((spent, 0.0, 0));
        };
        let waited = Instant::now();
        if let Some(upload) = upload {
            upload.wait().map_err(anyhow::Error::msg)?;
            commit = Some(start_commit(at));
        }
        if let Some(commit) = commit {
            commit.wait()?;
        }
        Ok((spent + waited.elapsed().as_secs_f64(), blocked, covered))
    };
    // Warm-up: the first steps and the first checkpoint grow the heap; how many steps an
    // upload spans sets the window, with room to spare.
    for _ in 0..3 {
        step(&mut trained, &mut opt);
    }
    let (_, _, spanned) = window(&mut trained, &mut opt, Some(100), 20)?;
    let steps = spanned + 2;
    let (mut blocked, mut lost, mut control) = (Vec::new(), Vec::new(), Vec::new());
    let (mut overlapped, mut base) = (Vec::new(), Vec::new());
    for i in 0..o.repeats {
        let mut spent = [0.0; 3];
        for (position, spent) in spent.iter_mut().enumerate() {
            let at = (position == i % 3).then_some(101 + i as u64);
            let (taken, snap, covered) = window(&mut trained, &mut opt, at, steps)?;
            *spent = taken;
            if at.is_some() {
                blocked.push(snap);
                overlapped.push(covered as f64);
            }
        }
        let with = spent[i % 3];
        let (a, b) = (spent[(i + 1) % 3], spent[(i + 2) % 3]);
        lost.push(with - a);
        control.push(b - a);
        base.push(a / steps as f64);
    }
    let sync = median(sync);
    let (serialise, write) = (
        median(phases.iter().map(|p| p.0).collect()),
        median(phases.iter().map(|p| p.1).collect()),
    );
    let (lost_spread, control_spread) = (quartiles(lost.clone()), quartiles(control.clone()));
    let (blocked, lost, control) = (median(blocked), median(lost), median(control));
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
        "  asynchronous: training is blocked {:.1} ms for the snapshot, then {:.0} steps of \
         {:.0} ms run beside the upload",
        blocked * 1e3,
        median(overlapped),
        median(base) * 1e3
    );
    println!(
        "  stall ratio (training blocked): {:.1}% of the synchronous save (target <= 5%)",
        100.0 * blocked / sync
    );
    println!(
        "  {steps} steps beside the upload take {:+.1} ms (quartiles {:+.1}, {:+.1}) against \
         steps without one;",
        lost * 1e3,
        lost_spread.0 * 1e3,
        lost_spread.1 * 1e3
    );
    println!(
        "  two windows without a checkpoint differ by {:+.1} ms (quartiles {:+.1}, {:+.1}): \
         this machine's noise",
        control * 1e3,
        control_spread.0 * 1e3,
        control_spread.1 * 1e3
    );
    println!(
        "  stall ratio counting the slower steps too: {:.1}% of the synchronous save",
        100.0 * (blocked + lost.max(0.0)) / sync
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
            loss_scale: None,
        };
        let started = Instant::now();
        io.block_on(store.write_shard(1000 + i as u64, Rank::LEADER, shard))?;
        ours.push(started.elapsed().as_secs_f64());
        // Both files go again, as retention deletes old checkpoints: the disk's cache then
        // reuses the pages it freed, instead of taking fresh ones for every write, which this
        // virtual machine makes slower with each one.
        std::fs::remove_file(&target)?;
        std::fs::remove_dir_all(tmp.path().join(format!("bench/step-{:08}", 1000 + i)))?;
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

#[derive(clap::Args, Clone)]
pub struct RecoveryOptions {
    /// The job to run (any example spec).
    #[arg(long, default_value = "deploy/examples/mlp-dp2.toml")]
    spec: PathBuf,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Real daemons next to this executable, killed on drop.
pub struct Cluster {
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
    /// A coordinator (short leases, so a lost worker is noticed fast) and `workers` worker
    /// daemons of one slot each, all real processes of the binaries next to this one.
    pub fn start(workers: usize) -> anyhow::Result<Self> {
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
        // The coordinator writes its admin and join tokens into its state directory.
        let state = dir.path().join("state");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !(state.join("join.token").exists() && state.join("tls/ca.pem").exists()) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the coordinator wrote no join.token and tls/ca.pem in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut cluster = Cluster {
            dir,
            url: format!("https://127.0.0.1:{port}"),
            children: vec![coordinator],
            bin,
        };
        for _ in 0..workers {
            cluster.worker()?;
        }
        std::thread::sleep(Duration::from_secs(2));
        Ok(cluster)
    }

    /// A scratch directory that lives as long as the cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `gantry ARGS` against this cluster and returns what it printed on stdout.
    pub fn gantry_text(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("gantry"))
            .args(["--coordinator", &self.url])
            .arg("--token-file")
            .arg(self.dir.path().join("state/admin.token"))
            .arg("--ca-cert")
            .arg(self.dir.path().join("state/tls/ca.pem"))
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "gantry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn gantry(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(self.bin.join("gantry"))
            .args(["--coordinator", &self.url])
            .arg("--token-file")
            .arg(self.dir.path().join("state/admin.token"))
            .arg("--ca-cert")
            .arg(self.dir.path().join("state/tls/ca.pem"))
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
            .arg("--join-token-file")
            .arg(self.dir.path().join("state/join.token"))
            .arg("--ca-cert")
            .arg(self.dir.path().join("state/tls/ca.pem"))
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
    // Two workers for the dp=2 job and a spare per kill.
    let mut cluster = Cluster::start(2 + o.repeats)?;
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
