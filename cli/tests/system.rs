//! The whole system with real processes: `gantry-coordinator`, `gantry-worker` daemons and
//! their rank processes, driven through the `gantry` CLI as a user would, with real faults
//! (`kill -9` of a rank, a worker daemon, the coordinator).
//!
//! The binaries are the ones `cargo build --workspace --bins` put next to `gantry`
//! (`scripts/test` builds them first).

use gantry_testkit::{Moto, free_port};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    let gantry = PathBuf::from(env!("CARGO_BIN_EXE_gantry"));
    let path = gantry.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// A cluster of separate processes; everything is killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    coordinator: Option<Child>,
    workers: Vec<Child>,
    /// Environment of the worker daemons (and so of their ranks), e.g. object-store settings.
    env: Vec<(String, String)>,
    /// Rank slots of each worker daemon.
    slots: usize,
    /// The metrics ports of the coordinator and of each worker, when asked for.
    metrics: Option<(u16, Vec<u16>)>,
    /// More flags for the coordinator.
    coordinator_args: Vec<String>,
}

impl Cluster {
    fn start(workers: usize) -> Self {
        Self::start_with_env(workers, Vec::new())
    }

    fn start_with_env(workers: usize, env: Vec<(String, String)>) -> Self {
        Self::start_with(workers, 1, env)
    }

    fn start_with(workers: usize, slots: usize, env: Vec<(String, String)>) -> Self {
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            coordinator: None,
            workers: Vec::new(),
            env,
            slots,
            metrics: None,
            coordinator_args: Vec::new(),
        };
        cluster.start_coordinator();
        for _ in 0..workers {
            cluster.add_worker();
        }
        cluster.wait_for(|c| c.alive_workers() == workers, "workers to register");
        cluster
    }

    /// A daemon's log file in the cluster's directory (appended to across restarts), which a
    /// test that times out prints.
    fn log_file(&self, daemon: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{daemon}.log")))
            .unwrap()
    }

    /// The last lines of every daemon's log.
    fn daemon_logs(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!("--- {}\n{}\n", path.display(), tail.join("\n")));
        }
        out
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate the coordinator made, which the CLI and workers verify it with.
    fn ca(&self) -> PathBuf {
        self.dir.path().join("state/tls/ca.pem")
    }

    fn start_coordinator(&mut self) {
        let child = Command::new(bin("gantry-coordinator"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(
                if self.coordinator_args.iter().any(|a| a == "--lease-ttl-ms") {
                    &[][..]
                } else {
                    &["--lease-ttl-ms", "3000", "--heartbeat-interval-ms", "300"][..]
                },
            )
            .args(&self.coordinator_args)
            .args(
                self.metrics
                    .as_ref()
                    .map(|(port, _)| vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(self.log_file("coordinator"))
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
        // Secure by default: the coordinator writes the admin and join tokens the CLI and the
        // workers present, and the CA they verify it with, into its state directory (on its
        // first start; they stay).
        self.wait_for(
            |c| c.dir.path().join("state/join.token").exists() && c.ca().exists(),
            "the coordinator's join token and CA certificate",
        );
    }

    fn stop_coordinator(&mut self) {
        let mut coordinator = self.coordinator.take().unwrap();
        coordinator.kill().unwrap();
        coordinator.wait().unwrap();
    }

    fn add_worker(&mut self) {
        let i = self.workers.len();
        let child = Command::new(bin("gantry-worker"))
            .args(["--coordinator", &self.url()])
            .arg("--join-token-file")
            .arg(self.dir.path().join("state/join.token"))
            .arg("--ca-cert")
            .arg(self.ca())
            .args(["--slots", &self.slots.to_string()])
            .args(
                self.metrics
                    .as_ref()
                    .and_then(|(_, ports)| ports.get(i))
                    .map(|port| vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")])
                    .unwrap_or_default(),
            )
            .arg("--work-dir")
            .arg(self.dir.path().join(format!("worker-{i}")))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(self.log_file(&format!("worker-{i}")))
            .spawn()
            .unwrap();
        self.workers.push(child);
    }

    fn gantry(&self, args: &[&str]) -> Output {
        Command::new(bin("gantry"))
            .args(["--coordinator", &self.url()])
            .arg("--token-file")
            .arg(self.dir.path().join("state/admin.token"))
            .arg("--ca-cert")
            .arg(self.ca())
            .args(args)
            .output()
            .unwrap()
    }

    /// `gantry resume JOB --from-step STEP --set ...`, which must succeed.
    fn resume_from(&self, job: &str, step: u64, set: &[&str]) {
        let step = step.to_string();
        let mut args = vec!["resume", job, "--from-step", &step];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = self.gantry(&args);
        assert!(
            out.status.success(),
            "gantry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.gantry(&[args, &["-o", "json"]].concat());
        assert!(
            out.status.success(),
            "gantry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn alive_workers(&self) -> usize {
        let out = self.gantry(&["workers", "-o", "json"]);
        if !out.status.success() {
            return 0;
        }
        let workers: Value = serde_json::from_slice(&out.stdout).unwrap();
        workers
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "Alive")
            .count()
    }

    fn wait_for(&self, mut done: impl FnMut(&Self) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `job` has committed a checkpoint at `step` or later, then cancels it.
    fn cancel_after_checkpoint(&self, job: &str, step: u64) {
        self.wait_for(
            |c| {
                c.status(job)["last_checkpoint"]["step"]
                    .as_u64()
                    .unwrap_or(0)
                    >= step
            },
            &format!("a checkpoint at step {step} or later"),
        );
        assert_eq!(self.gantry(&["cancel", job]).status.code(), Some(0));
    }

    /// Submits an example spec with overrides and returns the job id.
    fn submit(&self, example: &str, set: &[&str]) -> String {
        let spec = examples().join(example);
        let mut args = vec!["submit", spec.to_str().unwrap()];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = self.gantry(&args);
        assert!(
            out.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn status(&self, job: &str) -> Value {
        self.json(&["status", job])
    }

    fn wait_until_ended(&self, job: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status(job);
            if matches!(
                status["state"].as_str(),
                Some("Succeeded" | "Failed" | "Cancelled")
            ) {
                return status;
            }
            if Instant::now() > deadline {
                let logs = String::from_utf8(self.gantry(&["logs", job]).stdout).unwrap();
                let tail: Vec<&str> = logs.lines().rev().take(60).collect();
                panic!(
                    "timed out waiting for {job} to end: {status}\n…\n{}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                    self.daemon_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every step's training loss, from the job's logs.
    fn losses(&self, job: &str) -> Vec<(u64, f64)> {
        self.step_values(job, "loss=")
    }

    /// Every step's value of `key` (`loss=`, `grad_norm=`), from the job's logs.
    fn step_values(&self, job: &str, key: &str) -> Vec<(u64, f64)> {
        let out = self.gantry(&["logs", job]);
        assert!(out.status.success());
        let mut losses: Vec<(u64, f64)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let line = l.split_once("] ")?.1;
                let rest = line.strip_prefix("step ")?;
                let (step, rest) = rest.split_once('/')?;
                let loss = rest.split_whitespace().find_map(|w| w.strip_prefix(key))?;
                Some((step.parse().ok()?, loss.parse().ok()?))
            })
            .collect();
        // After a restart, replayed steps appear twice: keep the last report of each.
        losses.reverse();
        let mut seen = std::collections::HashSet::new();
        losses.retain(|(s, _)| seen.insert(*s));
        losses.sort_by_key(|(s, _)| *s);
        losses
    }

    /// Indices (in `workers`) of the worker daemons that are parents of any of `ranks`.
    fn hosts_of(&self, ranks: &[u32]) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&w| {
                let pid = self.workers[w].id();
                ranks.iter().any(|rank| {
                    std::fs::read_to_string(format!("/proc/{rank}/status"))
                        .is_ok_and(|s| s.lines().any(|l| l == format!("PPid:\t{pid}")))
                })
            })
            .collect()
    }

    /// `gantry export` of a job (its newest checkpoint, or `step`), read back.
    fn export(
        &self,
        job: &str,
        step: Option<u64>,
    ) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let path = self.dir.path().join(format!("{job}-{step:?}.safetensors"));
        let mut args = vec!["export".to_string(), job.to_string()];
        args.extend(
            step.map(|s| ["--step".to_string(), s.to_string()])
                .into_iter()
                .flatten(),
        );
        args.extend(["--out".to_string(), path.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.gantry(&args);
        assert!(
            out.status.success(),
            "export {job}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        read_safetensors(&path)
    }

    fn rank_pids(&self, job: &str) -> Vec<u32> {
        self.rank_pids_matching(job)
    }

    /// The rank processes of one attempt of a job.
    fn attempt_pids(&self, job: &str, attempt: u64) -> Vec<u32> {
        self.rank_pids_matching(&format!("{job}/attempt-{attempt}/"))
    }

    fn rank_pids_matching(&self, job: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("--assignment") && cmdline.contains(job) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.workers.iter_mut().chain(self.coordinator.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test shows what the daemons logged.
        if std::thread::panicking() {
            eprintln!("{}", self.daemon_logs());
        }
    }
}

fn kill9(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn data_parallel_matches_one_process_and_is_deterministic() {
    let cluster = Cluster::start(2);
    let steps = "train.steps=30";
    let dp1 = cluster.submit("mlp-dp1.toml", &[steps]);
    let dp2 = cluster.submit("mlp-dp2.toml", &[steps]);
    let dp2_again = cluster.submit("mlp-dp2.toml", &[steps]);
    for job in [&dp1, &dp2, &dp2_again] {
        let end = cluster.wait_until_ended(job);
        assert_eq!(end["state"], "Succeeded", "{end}");
    }
    let (a, b, c) = (
        cluster.losses(&dp1),
        cluster.losses(&dp2),
        cluster.losses(&dp2_again),
    );
    assert_eq!(a.len(), 30);
    assert_eq!(b.len(), 30);
    for ((step, l1), (_, l2)) in a.iter().zip(&b) {
        let rel = (l1 - l2).abs() / l1.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "step {step}: dp=1 loss {l1} vs dp=2 loss {l2} (relative {rel:e})"
        );
    }
    assert_eq!(b, c, "the same spec twice gives bit-identical losses");
    assert!(a.last().unwrap().1 < a[0].1, "training reduces the loss");
}

#[test]
fn submit_wait_status_and_invalid_specs() {
    let cluster = Cluster::start(2);
    let spec = examples().join("mlp-dp2.toml");
    let out = cluster.gantry(&["submit", spec.to_str().unwrap(), "--wait", "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = cluster.status(job["id"].as_str().unwrap());
    assert_eq!(status["state"], "Succeeded");
    assert_eq!(status["step"], status["total_steps"]);
    assert_eq!(status["last_checkpoint"]["step"], status["total_steps"]);
    assert_eq!(status["parallel"]["dp"], 2);
    // The example keeps the last 2 of 5 checkpoints; the listing follows retention.
    let checkpoints = cluster.json(&["checkpoints", job["id"].as_str().unwrap()]);
    let steps: Vec<u64> = checkpoints
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [80, 100], "{checkpoints}");
    // The listing reads the store itself: a torn step and a damaged shard show as such.
    let id = job["id"].as_str().unwrap();
    let store = cluster.dir.path().join("state/checkpoints").join(id);
    std::fs::create_dir_all(store.join("step-00000120")).unwrap();
    std::fs::write(store.join("step-00000120/rank-0.model.bpk"), b"torn").unwrap();
    std::fs::write(store.join("step-00000080/rank-0.model.bpk"), b"bit rot").unwrap();
    let listed = cluster.json(&["checkpoints", id]);
    let states: Vec<(u64, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["step"].as_u64().unwrap(), c["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [(80, "corrupt"), (100, "committed"), (120, "partial")],
        "{listed}"
    );

    // Invalid input: exit 2, the field named, nothing stored.
    let bad_for = |spec: &Path, set: &str, field: &str| {
        let out = cluster.gantry(&["submit", spec.to_str().unwrap(), "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {stderr}");
        assert!(
            stderr.contains(field),
            "{set}: {stderr:?} should name {field}"
        );
    };
    let bad = |set: &str, field: &str| bad_for(&spec, set, field);
    bad("model.colour=red", "model.colour");
    bad("parallel.dp=0", "parallel.dp");
    bad("train.lr=-0.1", "train.lr");
    bad("train.steps=-3", "train.steps");
    // Layouts the model cannot take.
    bad("parallel.tp=2", "parallel.tp");
    let gpt_3d = examples().join("gpt-3d.toml");
    bad_for(&gpt_3d, "parallel.tp=3", "parallel.tp");
    bad_for(&gpt_3d, "parallel.pp=5", "parallel.pp");
    bad_for(&gpt_3d, "train.global_batch=36", "train.global_batch");
    let out = cluster.gantry(&["submit", "/nonexistent/spec.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/spec.toml"));
    assert_eq!(
        cluster.json(&["jobs"]).as_array().unwrap().len(),
        1,
        "nothing stored"
    );

    // A job too big for the cluster waits with a reason.
    let big = cluster.submit("mlp-dp2.toml", &["parallel.dp=4", "train.global_batch=64"]);
    cluster.wait_for(
        |c| {
            c.status(&big)["pending_reason"]
                .as_str()
                .is_some_and(|r| r.contains("needs 4 slots"))
        },
        "a pending reason",
    );
    assert_eq!(cluster.status(&big)["state"], "Pending");
    assert_eq!(cluster.gantry(&["cancel", &big]).status.code(), Some(0));
    assert_eq!(cluster.status(&big)["state"], "Cancelled");

    // An unreachable coordinator is exit code 3.
    let out = Command::new(bin("gantry"))
        .args([
            "--coordinator",
            &format!("http://127.0.0.1:{}", free_port()),
            "jobs",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn killed_rank_and_killed_worker_resume_from_checkpoint_with_the_same_result() {
    // Three single-slot workers for a dp=2 job: one spare to re-plan onto.
    let mut cluster = Cluster::start(3);
    // Long enough that the kills land mid-run even on a loaded machine.
    let set = ["train.steps=1500", "checkpoint.every_steps=25"];
    let reference = cluster.submit("mlp-dp2.toml", &set);
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded");

    // kill -9 of a rank process mid-run.
    let job = cluster.submit("mlp-dp2.toml", &set);
    cluster.wait_for(
        |c| c.status(&job)["last_checkpoint"].is_object(),
        "a first checkpoint",
    );
    let pids = cluster.rank_pids(&job);
    assert_eq!(pids.len(), 2, "two rank processes");
    kill9(pids[1]);
    let end = cluster.wait_until_ended(&job);
    assert_eq!(end["state"], "Succeeded", "{end}");
    assert!(end["restarts"].as_u64().unwrap() >= 1, "{end}");
    assert_eq!(
        end["loss"], reference_end["loss"],
        "resumed run ends with the uninterrupted loss"
    );
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert!(logs.contains("resumed from checkpoint"), "{logs}");
    assert!(logs.contains("killed by signal 9"), "{logs}");

    // kill -9 of a worker daemon that hosts a rank: its lease expires, the job moves on.
    let job = cluster.submit("mlp-dp2.toml", &set);
    cluster.wait_for(
        |c| c.status(&job)["last_checkpoint"].is_object(),
        "a first checkpoint",
    );
    // The victim is a daemon that has a rank process as its child.
    let host = cluster.hosts_of(&cluster.rank_pids(&job))[0];
    let victim = &mut cluster.workers[host];
    victim.kill().unwrap();
    victim.wait().unwrap();
    cluster.add_worker();
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}");
    assert!(end["restarts"].as_u64().unwrap() >= 1);
    assert_eq!(end["loss"], reference_end["loss"], "{logs}");
    assert!(
        logs.contains("lost (lease expired)") || logs.contains("exited"),
        "{logs}"
    );
}

#[test]
fn coordinator_kill_and_restart_keeps_everything() {
    let mut cluster = Cluster::start(2);
    let done = cluster.submit("mlp-dp2.toml", &["train.steps=20"]);
    assert_eq!(cluster.wait_until_ended(&done)["state"], "Succeeded");
    let running = cluster.submit(
        "mlp-dp2.toml",
        &["train.steps=3000", "checkpoint.every_steps=500"],
    );
    cluster.wait_for(
        |c| c.status(&running)["step"].as_u64().unwrap_or(0) > 5,
        "training to start",
    );
    let before = cluster.json(&["jobs"]);
    let attempts_before = cluster.status(&done)["attempts"].clone();
    let history_before = String::from_utf8(cluster.gantry(&["logs", &done]).stdout).unwrap();

    let coordinator = cluster.coordinator.as_mut().unwrap();
    coordinator.kill().unwrap(); // SIGKILL
    coordinator.wait().unwrap();
    cluster.start_coordinator();
    cluster.wait_for(|c| c.alive_workers() == 2, "workers to reconnect");

    let after = cluster.json(&["jobs"]);
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
    assert_eq!(cluster.status(&done)["state"], "Succeeded");
    assert_eq!(attempts_before.as_array().map(Vec::len), Some(1));
    assert_eq!(
        cluster.status(&done)["attempts"],
        attempts_before,
        "attempts survive the restart"
    );
    assert_eq!(attempts_before[0]["outcome"], "succeeded");
    let history_after = String::from_utf8(cluster.gantry(&["logs", &done]).stdout).unwrap();
    assert_eq!(history_before, history_after);

    // The running job was not restarted by the coordinator's restart, and keeps going.
    let end = cluster.wait_until_ended(&running);
    assert_eq!(end["state"], "Succeeded", "{end}");
    assert_eq!(end["restarts"], 0, "{end}");
    assert_eq!(end["attempt"], 1);
}

#[test]
fn pipeline_layouts_train_like_one_process() {
    let cluster = Cluster::start(4);
    // 3 hidden layers + the output layer = 4 blocks: pp = 4 puts one block on each stage.
    // A tiny grad_clip clips every step, so the layouts only agree if each stage clips by the
    // norm of the whole model's gradient (summed over stages), not by its own shard's.
    let base = [
        "model.layers=3",
        "train.micro_batches=4",
        "train.steps=20",
        "train.grad_clip=0.01",
        "checkpoint.every_steps=10",
    ];
    let layouts: [&[&str]; 5] = [
        &["parallel.pp=1"],
        &["parallel.pp=2", "parallel.schedule=\"1f1b\""],
        &["parallel.pp=2", "parallel.schedule=\"gpipe\""],
        &["parallel.pp=4"],
        &["parallel.pp=2", "parallel.dp=2"],
    ];
    assert_layouts_match(&cluster, "mlp-dp1.toml", &base, &layouts);
}

/// A gpt small enough for the tests: two layers, width 32, sequences of 16 tokens.
const TINY_GPT: [&str; 6] = [
    "model.layers=2",
    "model.d_model=32",
    "data.seq_len=16",
    "data.examples=2000",
    "train.global_batch=8",
    "train.micro_batches=2",
];

#[test]
fn every_3d_layout_of_the_gpt_trains_like_one_process() {
    // 4 workers with 2 slots each: room for the 8 ranks of dp = tp = pp = 2.
    let cluster = Cluster::start_with(4, 2, Vec::new());
    // grad_clip 0.05 clips every step of this run (its gradient norm starts near 1), so the
    // layouts only agree if the norm covers the whole model: tensor-parallel shards summed,
    // replicated parameters counted once, pipeline stages summed.
    let gpt = [
        TINY_GPT.as_slice(),
        &[
            "train.steps=8",
            "train.warmup_steps=2",
            "train.grad_clip=0.05",
            "checkpoint.every_steps=4",
        ],
    ]
    .concat();
    let mut layouts: Vec<Vec<String>> = Vec::new();
    for pp in [1, 2] {
        for tp in [1, 2] {
            for dp in [1, 2] {
                let layout = vec![
                    format!("parallel.dp={dp}"),
                    format!("parallel.tp={tp}"),
                    format!("parallel.pp={pp}"),
                ];
                if pp == 2 {
                    for schedule in ["1f1b", "gpipe"] {
                        let mut l = layout.clone();
                        l.push(format!("parallel.schedule=\"{schedule}\""));
                        layouts.push(l);
                    }
                } else {
                    layouts.push(layout);
                }
            }
        }
    }
    // Recomputing activations in backward must not change the training either.
    layouts.push(vec![
        "parallel.tp=2".into(),
        "train.activation_checkpointing=true".into(),
    ]);
    let layouts: Vec<Vec<&str>> = layouts
        .iter()
        .map(|l| l.iter().map(String::as_str).collect())
        .collect();
    let layouts: Vec<&[&str]> = layouts.iter().map(Vec::as_slice).collect();
    assert_layouts_match(&cluster, "gpt-dp1.toml", &gpt, &layouts);
}

/// A Llama-family decoder with grouped-query attention (4 query heads on 2 key/value heads) on
/// real text (the Bible, prepared by `gantry data prepare`) trains like one process at dp·tp·pp
/// = 2·2·2 and the layouts between (losses, norms, evaluation and final parameters within
/// 1e-4), and a run stopped at 2·2·2 resumes at one process with the one-process run's losses.
#[test]
fn a_llama_with_grouped_query_attention_trains_on_real_text_like_one_process() {
    let corpora = std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    );
    let cluster = Cluster::start_with(4, 2, Vec::new());
    let dataset = cluster.dir.path().join("kjv");
    let kjv = format!("{corpora}/kjv.txt");
    let out = cluster.gantry(&[
        "data",
        "prepare",
        &kjv,
        "--out",
        dataset.to_str().unwrap(),
        "--vocab-size",
        "384",
        "--documents",
        "line",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = format!("data.source=\"dataset:{}\"", dataset.display());
    let llama = [
        source.as_str(),
        "model.layers=2",
        "model.d_model=32",
        "model.heads=4",
        "model.num_key_value_heads=2",
        "model.intermediate_size=64",
        "data.seq_len=16",
        "train.global_batch=8",
        "train.micro_batches=2",
        "train.steps=8",
        "train.warmup_steps=2",
        "train.grad_clip=0.05",
        "checkpoint.every_steps=4",
        // One process unless a layout says otherwise (the example runs at dp 2 × tp 2).
        "parallel.dp=1",
        "parallel.tp=1",
    ];
    let layouts: [&[&str]; 4] = [
        &[],
        &["parallel.tp=2"],
        &["parallel.pp=2", "parallel.schedule=\"gpipe\""],
        &["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"],
    ];
    assert_layouts_match(&cluster, "llama-kjv.toml", &llama, &layouts);
    // Multi-query attention at tp 2: one key/value head for two ranks, replicated over the tp
    // group (each rank's part of its gradient summed), still trains like one process.
    let mqa = [&llama[..], &["model.num_key_value_heads=1"]].concat();
    let layouts: [&[&str]; 3] = [
        &[],
        &["parallel.tp=2"],
        &["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"],
    ];
    assert_layouts_match(&cluster, "llama-kjv.toml", &mqa, &layouts);

    let reference = assert_resumes_at_one_process(&cluster, "llama-kjv.toml", &llama);

    // Exported in Hugging Face's format, the model opens in the NumPy reference, which checks
    // every tensor's name and shape against `LlamaForCausalLM`'s; the tokenizer comes along.
    let hf = export_hf_read_by_reference(&cluster, &reference, "llama", "[[5, 17, 300, 2]]");

    // `gantry generate` continues a prompt from the trained checkpoint, greedily: the same
    // text twice.
    let generate = || {
        let out = cluster.gantry(&[
            "generate",
            &reference,
            "--prompt",
            "And God said",
            "--max-tokens",
            "12",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = generate();
    assert!(
        text.starts_with("And God said") && text.trim_end().len() > "And God said".len(),
        "{text:?}"
    );
    assert_eq!(generate(), text);

    // A new job starts from that folder (`model.init_from`), each of its tp = 2 ranks cutting its
    // slice: its first loss is the trained model's, far below a fresh start's.
    let init = format!("model.init_from=\"{}\"", hf.display());
    let tuned = [
        &llama[..],
        &[init.as_str(), "parallel.tp=2", "train.steps=2"],
    ]
    .concat();
    let tuned = cluster.submit("llama-kjv.toml", &tuned);
    let tuned_end = cluster.wait_until_ended(&tuned);
    let logs = String::from_utf8(cluster.gantry(&["logs", &tuned]).stdout).unwrap();
    assert_eq!(tuned_end["state"], "Succeeded", "{tuned_end}\n{logs}");
    assert!(
        logs.contains(&format!("initialised from {}", hf.display())),
        "{logs}"
    );
    let (first, fresh) = (cluster.losses(&tuned)[0].1, cluster.losses(&reference)[0].1);
    assert!(
        first < 0.9 * fresh,
        "from the pretrained folder {first}, fresh {fresh}"
    );
    // A folder whose config disagrees with the spec is refused, naming both.
    let wider = [
        &llama[..],
        &[
            init.as_str(),
            "model.d_model=64",
            "fault_tolerance.max_restarts=0",
        ],
    ]
    .concat();
    let wider = cluster.submit("llama-kjv.toml", &wider);
    let end = cluster.wait_until_ended(&wider);
    let logs = String::from_utf8(cluster.gantry(&["logs", &wider]).stdout).unwrap();
    assert_eq!(end["state"], "Failed", "{end}");
    assert!(
        logs.contains("hidden_size is 32, but model.d_model is 64"),
        "{logs}"
    );
}

/// Prepares `inputs` with MiniLM's WordPiece tokenizer (end-of-text "[SEP]") into `name`
/// under the cluster's folder, with `extra` arguments; returns the dataset's path.
fn prepare_wordpiece(cluster: &Cluster, corpora: &str, name: &str, extra: &[&str]) -> PathBuf {
    let dataset = cluster.dir.path().join(name);
    let tokenizer = format!("{corpora}/minilm/tokenizer.json");
    let base = [
        "data",
        "prepare",
        "--out",
        dataset.to_str().unwrap(),
        "--tokenizer",
        &tokenizer,
        "--end-of-text",
        "[SEP]",
    ];
    let out = cluster.gantry(&[&base[..], extra].concat());
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dataset
}

/// A bert pre-trains with masked-LM on the Bible (MiniLM's WordPiece vocabulary) like one
/// process at tp 2, pp 2 and dp·tp·pp 2·2·2 (losses, norms, evaluations, final parameters), and
/// its `--format hf` export opens in the NumPy reference, which checks every name and shape
/// against `BertForMaskedLM`'s.
#[test]
fn a_bert_pretrains_with_masked_lm_like_one_process_and_exports_for_hugging_face() {
    let corpora = std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    );
    let cluster = Cluster::start_with(4, 2, Vec::new());
    let kjv = format!("{corpora}/kjv.txt");
    let dataset = prepare_wordpiece(&cluster, &corpora, "kjv", &[&kjv, "--documents", "line"]);
    let source = format!("data.source=\"dataset:{}\"", dataset.display());
    let bert = [
        source.as_str(),
        "model.layers=2",
        "model.d_model=32",
        "model.heads=4",
        "model.intermediate_size=64",
        "data.seq_len=16",
        "train.global_batch=8",
        "train.micro_batches=2",
        "train.steps=8",
        "train.warmup_steps=2",
        "train.grad_clip=0.05",
        "checkpoint.every_steps=4",
    ];
    let layouts: [&[&str]; 4] = [
        &["parallel.dp=1", "parallel.pp=1"],
        &["parallel.dp=1", "parallel.pp=1", "parallel.tp=2"],
        &[
            "parallel.dp=1",
            "parallel.pp=2",
            "parallel.schedule=\"gpipe\"",
        ],
        &["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"],
    ];
    assert_layouts_match(&cluster, "bert-kjv.toml", &bert, &layouts);

    let job = assert_resumes_at_one_process(&cluster, "bert-kjv.toml", &bert);
    let hf = export_hf_read_by_reference(&cluster, &job, "bert", "[[101, 1998, 2643, 2056, 102]]");
    let config: Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    assert_eq!(config["vocab_size"], 30522);
}

/// MiniLM (a real pretrained BERT from PyPI) fine-tunes into a spam classifier on the
/// SpamAssassin corpus, data-parallel: a new classifier from the seed, frozen embeddings, a
/// learning rate of its own for the head. Its accuracy on the test split beats always saying
/// the majority label, and `gantry status` reports precision, recall and F1 with it.
#[test]
fn minilm_fine_tunes_into_a_spam_classifier_that_beats_the_majority_label() {
    let corpora = std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    );
    let cluster = Cluster::start(2);
    let spam = format!("{corpora}/spam/spam.jsonl");
    let dataset = prepare_wordpiece(
        &cluster,
        &corpora,
        "spam",
        &[&spam, "--label-field", "label"],
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dataset.join("manifest.json")).unwrap()).unwrap();
    let labels: Vec<&str> = manifest["test"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let spams = labels.iter().filter(|l| **l == "spam").count();
    // The test split evaluated (its first 512 documents at most): what always saying the more
    // common label scores there.
    let evaluated = &labels[..labels.len().min(512)];
    let spam_share =
        evaluated.iter().filter(|l| **l == "spam").count() as f64 / evaluated.len() as f64;
    let majority = spam_share.max(1.0 - spam_share);
    assert!(
        spams > 0 && spams < labels.len(),
        "both labels in the test split"
    );

    let source = format!("data.source=\"dataset:{}\"", dataset.display());
    let minilm = format!("model.init_from=\"{corpora}/minilm\"");
    let job = cluster.submit(
        "minilm-spam.toml",
        &[
            source.as_str(),
            minilm.as_str(),
            "data.seq_len=64",
            "train.steps=24",
            "train.warmup_steps=4",
            "train.global_batch=16",
            "train.eval_every=0",
            "checkpoint.every_steps=0",
        ],
    );
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    assert!(
        logs.contains("new head, initialised from the seed: classifier.bias, classifier.weight"),
        "{logs}"
    );
    let test = &end["test_metrics"];
    let accuracy = test["accuracy"].as_f64().unwrap_or_else(|| panic!("{end}"));
    eprintln!("test split: {test}; always the majority label: accuracy {majority}");
    assert!(
        accuracy > majority + 0.03,
        "test accuracy {accuracy} vs the majority label's {majority}\n{logs}"
    );
    for metric in ["precision", "recall", "f1"] {
        let m = test[metric].as_f64().unwrap();
        assert!(m > 0.0 && m <= 1.0, "{metric} {m}");
    }
    assert!(end["eval_metrics"]["f1"].as_f64().is_some(), "{end}");
    assert!(logs.contains("test loss") && logs.contains("F1"), "{logs}");
    let status = String::from_utf8(cluster.gantry(&["status", &job]).stdout).unwrap();
    assert!(status.contains("test split:  accuracy"), "{status}");
}

/// `gantry export JOB --format hf` into a folder of the cluster's, which must hold the config,
/// the weights and the tokenizer, and which the NumPy reference of `family`
/// (`trainer/tests/reference/{family}.py`) reads, checking every tensor's name and shape against
/// Hugging Face's, and runs on `ids`. Returns the folder.
fn export_hf_read_by_reference(cluster: &Cluster, job: &str, family: &str, ids: &str) -> PathBuf {
    let hf = cluster.dir.path().join(format!("{job}-hf"));
    let out = cluster.gantry(&[
        "export",
        job,
        "--format",
        "hf",
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(hf.join(file).exists(), "{file}");
    }
    let script = format!(
        "{}/../trainer/tests/reference/{family}.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = Command::new("python3")
        .args([&script, hf.to_str().unwrap(), ids])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    hf
}

/// Runs `example` with `base` (at one process) for 200 steps, and again at dp·tp·pp 2·2·2
/// stopped after a checkpoint and resumed at one process: the 20 steps after the resume are
/// those of the one-process run (its state resharded from eight shards into one). Returns the
/// one-process job.
fn assert_resumes_at_one_process(cluster: &Cluster, example: &str, base: &[&str]) -> String {
    let longer = [base, &["train.steps=200"]].concat();
    let one = ["parallel.dp=1", "parallel.tp=1", "parallel.pp=1"];
    let reference = cluster.submit(example, &[&longer[..], &one].concat());
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded", "{reference_end}");
    let layout_3d = ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"];
    let job = cluster.submit(example, &[&longer[..], &layout_3d].concat());
    cluster.cancel_after_checkpoint(&job, 8);
    cluster.wait_for(|c| c.rank_pids(&job).is_empty(), "the ranks to stop");
    let from = newest_committed(cluster, &job);
    cluster.resume_from(&job, from, &one);
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{example}: {end}\n{logs}");
    assert!(logs.contains("resharded from dp=2 tp=2 pp=2"), "{logs}");
    let want: std::collections::HashMap<u64, f64> =
        cluster.losses(&reference).into_iter().collect();
    let resumed: Vec<(u64, f64)> = cluster
        .losses(&job)
        .into_iter()
        .filter(|(s, _)| (from + 1..=from + 20).contains(s))
        .collect();
    assert_eq!(resumed.len(), 20, "{logs}");
    for (step, loss) in resumed {
        let want = want[&step];
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs(),
            "{example} step {step}: resumed at one process {loss}, one process throughout {want}"
        );
    }
    reference
}

/// Runs `example` under every layout and checks each trains like the first (one process):
/// per-step losses and the final evaluation loss within a relative 1e-4.
fn assert_layouts_match(cluster: &Cluster, example: &str, base: &[&str], layouts: &[&[&str]]) {
    let jobs: Vec<String> = layouts
        .iter()
        .map(|layout| cluster.submit(example, &[base, layout].concat()))
        .collect();
    let ends: Vec<Value> = jobs.iter().map(|j| cluster.wait_until_ended(j)).collect();
    for (end, layout) in ends.iter().zip(layouts) {
        assert_eq!(end["state"], "Succeeded", "{example} {layout:?}: {end}");
    }
    let reference = cluster.losses(&jobs[0]);
    assert!(!reference.is_empty());
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1e-12);
    for (job, layout) in jobs.iter().zip(layouts).skip(1) {
        let losses = cluster.losses(job);
        assert_eq!(losses.len(), reference.len(), "{example} {layout:?}");
        for ((step, a), (_, b)) in reference.iter().zip(&losses) {
            assert!(
                close(*a, *b),
                "{example} {layout:?} step {step}: {b} vs one process {a}"
            );
        }
    }
    // Clipping uses the global gradient norm: under every layout it must be the one process's
    // (whole model) norm, step by step.
    let norms = cluster.step_values(&jobs[0], "grad_norm=");
    assert_eq!(norms.len(), reference.len(), "{example}: a norm every step");
    for (job, layout) in jobs.iter().zip(layouts).skip(1) {
        for ((step, a), (_, b)) in norms.iter().zip(&cluster.step_values(job, "grad_norm=")) {
            assert!(
                close(*a, *b),
                "{example} {layout:?} step {step}: gradient norm {b} vs one process {a}"
            );
        }
    }
    let eval0 = ends[0]["eval_loss"].as_f64().unwrap();
    let test0 = ends[0]["test_loss"].as_f64().unwrap();
    for (end, layout) in ends.iter().zip(layouts).skip(1) {
        let eval = end["eval_loss"].as_f64().unwrap();
        assert!(
            close(eval0, eval),
            "{example} {layout:?}: eval loss {eval} vs {eval0}"
        );
        let test = end["test_loss"].as_f64().unwrap();
        assert!(
            close(test0, test),
            "{example} {layout:?}: test loss {test} vs {test0}"
        );
        // Exact-match accuracy (gpt only) can move by a near-tie's argmax, not more.
        assert_eq!(
            end["test_accuracy"].is_null(),
            ends[0]["test_accuracy"].is_null()
        );
        if let (Some(a), Some(b)) = (
            end["test_accuracy"].as_f64(),
            ends[0]["test_accuracy"].as_f64(),
        ) {
            assert!(
                (a - b).abs() <= 0.02,
                "{example} {layout:?}: accuracy {a} vs {b}"
            );
        }
    }
    if example.starts_with("gpt") {
        assert!(
            ends[0]["test_accuracy"].as_f64().is_some(),
            "gpt jobs report answer accuracy"
        );
    }
    // The final parameters, every layout's shards joined into the whole model by
    // `gantry export`, match the one-process run's: each tensor within a relative 1e-4.
    let whole = |job: &str| cluster.export(job, None);
    let reference = whole(&jobs[0]);
    assert!(
        reference.len() > 4,
        "{example}: {} tensors",
        reference.len()
    );
    assert_python_reads(
        &cluster
            .dir
            .path()
            .join(format!("{}-None.safetensors", jobs[0])),
        &reference,
    );
    for (job, layout) in jobs.iter().zip(layouts).skip(1) {
        let params = whole(job);
        assert_eq!(
            params.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{example} {layout:?}"
        );
        for (name, (shape, a)) in &reference {
            let (other_shape, b) = &params[name];
            assert_eq!(shape, other_shape, "{example} {layout:?} {name}");
            let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
            let diff = norm(&mut a.iter().zip(b).map(|(x, y)| f64::from(x - y)));
            let size = norm(&mut a.iter().map(|x| f64::from(*x)));
            assert!(
                diff <= 1e-4 * size,
                "{example} {layout:?} {name}: |difference| {diff:e} vs |parameter| {size:e}"
            );
        }
    }
}

/// Python's `safetensors` package opens an exported file and sees the same tensors: names,
/// shapes, dtype, and values (a middle element exactly, the sum to float64 rounding).
fn assert_python_reads(
    path: &Path,
    expected: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) {
    let script = r#"
import json, sys
from safetensors.numpy import load_file
tensors = load_file(sys.argv[1])
print(json.dumps({
    name: {"dtype": str(t.dtype), "shape": list(t.shape), "sum": float(t.astype("float64").sum()),
           "middle": float(t.flat[t.size // 2])}
    for name, t in tensors.items()
}))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python could not read {}: {} (scripts/test installs safetensors and numpy)",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen.as_object().unwrap().len(), expected.len());
    for (name, (shape, values)) in expected {
        let t = &seen[name];
        assert_eq!(t["dtype"], "float32", "{name}");
        let py_shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(&py_shape, shape, "{name}");
        // Exactly the same f32 (JSON carries it as a decimal double).
        assert_eq!(
            t["middle"].as_f64().unwrap() as f32,
            values[values.len() / 2],
            "{name}"
        );
        let sum: f64 = values.iter().map(|v| f64::from(*v)).sum();
        let py_sum = t["sum"].as_f64().unwrap();
        assert!(
            (sum - py_sum).abs() <= 1e-9 * values.len() as f64,
            "{name}: {sum} vs {py_sum}"
        );
    }
}

/// Every tensor of a safetensors file of f32 tensors: name to (shape, values).
fn read_safetensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

#[test]
fn a_damaged_shard_makes_every_rank_resume_from_the_checkpoint_before() {
    let cluster = Cluster::start(2);
    // Two pipeline stages: each rank has a shard of its own. (Data-parallel replicas would
    // both read the first one's.)
    let set = [
        "train.steps=600",
        "parallel.dp=1",
        "parallel.pp=2",
        "checkpoint.every_steps=50",
        "checkpoint.keep_last=100",
    ];
    let (reference, job) = reference_and_cancelled_run(&cluster, "mlp-dp2.toml", &set, 100);
    // Damage one byte of rank 1's optimizer state in the checkpoint a resume starts from,
    // keeping its size: only rank 1 reads that file, and only its checksum can tell. That is
    // the step the store's pointer names, not the coordinator's `last_checkpoint`: a commit
    // racing the cancel can move the pointer after the coordinator stopped listening.
    let pointer = cluster
        .dir
        .path()
        .join(format!("state/checkpoints/{job}/pointer.json"));
    let pointer: Value = serde_json::from_slice(&std::fs::read(pointer).unwrap()).unwrap();
    let newest = pointer["latest"].as_u64().unwrap();
    let recorded = cluster.status(&job)["last_checkpoint"]["step"]
        .as_u64()
        .unwrap();
    assert!(
        newest >= recorded,
        "{pointer} behind the coordinator's {recorded}"
    );
    let shard = cluster.dir.path().join(format!(
        "state/checkpoints/{job}/step-{newest:08}/rank-1.optim.bpk"
    ));
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();

    assert_eq!(cluster.gantry(&["resume", &job]).status.code(), Some(0));
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    let skipped = format!("skipping checkpoint at step {newest}: ");
    assert!(
        logs.contains(&format!(
            "{skipped}rank-1.optim.bpk does not match its checksum"
        )) && logs.contains(&format!("{skipped}another rank's shard is damaged")),
        "rank 1 finds the damage, rank 0 learns it: {logs}"
    );
    let previous = newest - 50;
    let resumed = format!("resumed from checkpoint at step {previous} ");
    assert_eq!(
        logs.matches(&resumed).count(),
        2,
        "both ranks resume from step {previous}: {logs}"
    );
    // Passing step {newest} again, the run leaves the damaged checkpoint as it is.
    assert!(
        logs.contains(&format!(
            "checkpoint at step {newest} not committed: an earlier commit of it is damaged"
        )),
        "{logs}"
    );
    assert_eq!(end["loss"], reference["loss"], "{logs}");
}

/// Runs the mlp example with `set` to the end (the reference), then again until it has a
/// checkpoint at `step` or later, cancelled there once its ranks are gone: (the reference's
/// final status, the cancelled job).
fn reference_and_cancelled_run(
    cluster: &Cluster,
    example: &str,
    set: &[&str],
    step: u64,
) -> (Value, String) {
    let reference = cluster.submit(example, set);
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded");
    let job = cluster.submit(example, set);
    cluster.cancel_after_checkpoint(&job, step);
    assert_eq!(cluster.status(&job)["state"], "Cancelled");
    cluster.wait_for(|c| c.rank_pids(&job).is_empty(), "the ranks to stop");
    (reference_end, job)
}

/// bf16 and fp16 (f32 master weights, data-parallel over two ranks) train like f32 from the same
/// start. fp16's loss scale starts far too high here: the steps whose gradients overflow are
/// skipped (logged, weights untouched) while the scale halves. A run resumed from a checkpoint
/// goes on with the scale it had, so it reports the very losses of the run never stopped.
#[test]
fn mixed_precision_trains_and_fp16_resumes_with_its_loss_scale() {
    let cluster = Cluster::start(2);
    let base = [
        "train.steps=1500",
        "checkpoint.every_steps=50",
        "checkpoint.keep_last=100",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { [&base[..], extra].concat() };
    let fp16 = with(&[
        "train.precision=\"fp16\"",
        "train.loss_scaling.initial=1048576.0",
        "train.loss_scaling.growth_interval=200",
    ]);
    let f32_job = cluster.submit("mlp-dp2.toml", &base);
    let bf16_job = cluster.submit("mlp-dp2.toml", &with(&["train.precision=\"bf16\""]));
    let (fp16_end, stopped) = reference_and_cancelled_run(&cluster, "mlp-dp2.toml", &fp16, 100);
    for job in [&f32_job, &bf16_job] {
        let end = cluster.wait_until_ended(job);
        assert_eq!(end["state"], "Succeeded", "{end}");
    }
    let reference = fp16_end["id"].as_str().unwrap().to_string();
    let mean = |l: &[(u64, f64)]| l.iter().map(|(_, v)| v).sum::<f64>() / l.len() as f64;
    let f32_losses = cluster.losses(&f32_job);
    assert_eq!(f32_losses.len(), 1500);
    let (f32_head, f32_tail) = (mean(&f32_losses[..20]), mean(&f32_losses[1480..]));
    for job in [&bf16_job, &reference] {
        let losses = cluster.losses(job);
        assert_eq!(losses.len(), 1500);
        let (h, t) = (mean(&losses[..20]), mean(&losses[1480..]));
        assert!(t < 0.5 * h, "{job}: the loss did not fall: {h} → {t}");
        assert!(
            (t - f32_tail).abs() < 0.05 * f32_head,
            "{job}: ends at {t}, f32 at {f32_tail} (from {f32_head})"
        );
    }
    let logs = String::from_utf8(cluster.gantry(&["logs", &reference]).stdout).unwrap();
    let skipped: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("fp16 gradients overflowed, step skipped"))
        .collect();
    assert!(
        skipped.first().is_some_and(|l| l.contains("step 1: ")),
        "the first step did not overflow at a scale of 2^20:\n{logs}"
    );
    assert!(
        skipped.len() < 40,
        "{} steps skipped:\n{logs}",
        skipped.len()
    );

    let from = newest_committed(&cluster, &stopped);
    cluster.resume_from(&stopped, from, &[]);
    let end = cluster.wait_until_ended(&stopped);
    assert_eq!(end["state"], "Succeeded", "{end}");
    let want: std::collections::HashMap<u64, f64> =
        cluster.losses(&reference).into_iter().collect();
    let resumed = cluster.losses(&stopped);
    let after: Vec<&(u64, f64)> = resumed.iter().filter(|(s, _)| *s > from).collect();
    assert_eq!(after.len() as u64, 1500 - from);
    for (step, loss) in after {
        assert_eq!(*loss, want[step], "step {step} after resuming from {from}");
    }
}

/// Real text end to end: `gantry data prepare` cleans, splits and tokenizes the King James Bible
/// (a byte-level BPE trained on it), a GPT trains on the dataset data-parallel and its
/// validation loss falls; cancelled, it will not resume on a dataset that changed, and resumed
/// at dp = 1 on its own, it takes the very samples the dp = 2 run took, so its losses follow
/// that run's.
#[test]
fn a_prepared_corpus_trains_and_resumes_at_another_data_parallel_degree() {
    let corpora = std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    );
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("kjv");
    let cluster = Cluster::start(2);
    // The Bible, a verse per document, a byte-level BPE of 512 tokens, into `dataset`.
    let prepare = |extra: &[&str]| {
        let kjv = format!("{corpora}/kjv.txt");
        let base = ["data", "prepare", &kjv, "--out", dataset.to_str().unwrap()];
        let args = ["--vocab-size", "512", "--documents", "line"];
        cluster.gantry(&[&base[..], &args, extra].concat())
    };
    let out = prepare(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("exact duplicates") && stdout.contains("MB/s"),
        "{stdout}"
    );
    let source = format!("data.source=\"dataset:{}\"", dataset.display());
    let set = [
        source.as_str(),
        "model.d_model=64",
        "train.steps=600",
        "train.eval_every=50",
        "train.global_batch=16",
        "checkpoint.every_steps=50",
        "checkpoint.keep_last=100",
        "fault_tolerance.max_restarts=1",
        "fault_tolerance.restart_backoff_secs=0.0",
    ];
    let (reference_end, job) = reference_and_cancelled_run(&cluster, "gpt-dp2.toml", &set, 100);
    let reference = reference_end["id"].as_str().unwrap().to_string();
    let evals = cluster.step_values(&reference, "eval_loss=");
    assert!(evals.len() >= 10, "{evals:?}");
    let (first, last) = (evals[0].1, evals[evals.len() - 1].1);
    assert!(last < 0.8 * first, "validation loss {first} → {last}");
    let logs = String::from_utf8(cluster.gantry(&["logs", &reference]).stdout).unwrap();
    assert!(
        logs.contains("sample at step 50: ") && logs.contains("read and verified in"),
        "{logs}"
    );

    let from = newest_committed(&cluster, &job);
    // A different dataset where the job's was (other cleaning, the same vocabulary size): the
    // resume is refused, naming the field and both manifests, and nothing trains on it.
    let original = dir.path().join("kjv-original");
    std::fs::rename(&dataset, &original).unwrap();
    assert!(prepare(&["--min-chars", "40"]).status.success());
    cluster.resume_from(&job, from, &["parallel.dp=1"]);
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Failed", "{end}");
    assert!(
        logs.contains("data.source: dataset") && logs.contains("changed since the checkpoint"),
        "{logs}"
    );
    std::fs::remove_dir_all(&dataset).unwrap();
    std::fs::rename(&original, &dataset).unwrap();

    cluster.resume_from(&job, from, &["parallel.dp=1"]);
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    assert_losses_follow(&cluster, &reference, &job, from, 50, &logs);
}

/// A dataset in S3 (moto): `gantry data prepare` writes it there, ranks read it by ranged reads
/// through their machine's cache, and a rank killed mid-run restarts from the checkpoint and
/// takes the samples it would have taken, so the job ends with the uninterrupted run's loss.
#[test]
fn a_dataset_in_s3_trains_and_a_killed_rank_resumes_on_the_same_samples() {
    let corpora = std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    );
    let moto = Moto::start("corpora");
    let cache = tempfile::tempdir().unwrap();
    let cache_env = (
        "GANTRY_DATA_CACHE".to_string(),
        cache.path().display().to_string(),
    );
    let cluster = Cluster::start_with_env(2, [moto.env(), vec![cache_env]].concat());
    let kjv = format!("{corpora}/kjv.txt");
    let mut prepare = vec![
        "data",
        "prepare",
        &kjv,
        "--out",
        "s3://corpora/kjv",
        "--vocab-size",
        "512",
        "--documents",
        "line",
    ];
    let store_options: Vec<String> = moto
        .options()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for option in &store_options {
        prepare.extend(["--store-option", option]);
    }
    let out = cluster.gantry(&prepare);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(moto.list("corpora", "kjv/").contains("kjv/manifest.json"));
    let endpoint = format!("data.options.aws_endpoint=\"{}\"", moto.url);
    let set = [
        "data.source=\"dataset:s3://corpora/kjv\"",
        endpoint.as_str(),
        "data.options.aws_allow_http=true",
        "model.d_model=64",
        "train.steps=150",
        "train.eval_every=50",
        "train.global_batch=16",
        "checkpoint.every_steps=25",
    ];
    let reference = cluster.submit("gpt-dp2.toml", &set);
    let reference_end = cluster.wait_until_ended(&reference);
    let logs = String::from_utf8(cluster.gantry(&["logs", &reference]).stdout).unwrap();
    assert_eq!(
        reference_end["state"], "Succeeded",
        "{reference_end}\n{logs}"
    );
    assert!(logs.contains("fetched by ranged reads"), "{logs}");

    let job = cluster.submit("gpt-dp2.toml", &set);
    let (end, logs) = kill_a_rank_after_a_checkpoint(&cluster, &job);
    // The restarted ranks found every block they read in the machine's cache.
    assert!(
        logs.contains("dataset reads (rank 0): 0 blocks (0.0 MB) fetched by ranged reads"),
        "{logs}"
    );
    assert_eq!(end["loss"], reference_end["loss"], "{logs}");
    let want: std::collections::HashMap<u64, f64> =
        cluster.losses(&reference).into_iter().collect();
    for (step, loss) in cluster.losses(&job) {
        assert_eq!(loss, want[&step], "step {step}");
    }
}

/// The 50 losses after step `from` of `job`, resumed at dp = 1, are those of the dp = 2
/// `reference` within a relative 1e-5 (the same samples and state; only the summation order of
/// the gradient average differs).
fn assert_losses_follow(
    cluster: &Cluster,
    reference: &str,
    job: &str,
    from: u64,
    steps: u64,
    logs: &str,
) {
    let want: std::collections::HashMap<u64, f64> = cluster.losses(reference).into_iter().collect();
    let resumed = cluster.losses(job);
    let after: Vec<&(u64, f64)> = resumed
        .iter()
        .filter(|(s, _)| (from + 1..=from + steps).contains(s))
        .collect();
    assert_eq!(after.len() as u64, steps, "{logs}");
    for (step, loss) in after {
        let want = want[step];
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "step {step}: dp=1 after resume {loss}, dp=2 {want}"
        );
    }
}

#[test]
fn resume_by_hand_at_another_data_parallel_degree() {
    let cluster = Cluster::start(2);
    let set = [
        "train.steps=2000",
        "checkpoint.every_steps=50",
        "checkpoint.keep_last=100",
    ];
    let (reference_end, job) = reference_and_cancelled_run(&cluster, "mlp-dp2.toml", &set, 100);
    let reference = reference_end["id"].as_str().unwrap().to_string();

    // The model cannot change under a checkpoint: refused, nothing changed.
    let out = cluster.gantry(&["resume", &job, "--set", "model.d_model=8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("only parallel.* (the layout)"), "{stderr}");
    // Nor can it resume from a step the store does not hold.
    let out = cluster.gantry(&["resume", &job, "--from-step", "12345"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("from_step") && stderr.contains("no manifest"),
        "{stderr}"
    );
    assert_eq!(cluster.status(&job)["state"], "Cancelled");

    // Resume from the newest step in the store (the cancelled ranks are gone: the checkpoint
    // 50 steps later is then certainly the dp=1 run's own).
    let from = newest_committed(&cluster, &job);
    cluster.resume_from(&job, from, &["parallel.dp=1"]);
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    assert_eq!(end["parallel"]["dp"], 1);
    assert!(logs.contains("saved at world size 2"), "{logs}");
    // Same data, same optimizer state; only the summation order of the gradient differs. The
    // 50 steps after the resume have the dp=2 run's losses within a relative 1e-5. (Not the
    // final loss: over the ~1800 steps to the end the difference grows, by an amount that
    // depends on where the cancel landed, past 1e-4 of a loss this small.)
    assert_losses_follow(&cluster, &reference, &job, from, 50, &logs);
    // And the parameters 50 steps after the resume (both runs keep every checkpoint): every
    // tensor within a relative 1e-6 of the dp=2 run's. (Over thousands of steps the different
    // summation order of the gradient average grows past that.)
    let compare_at = Some(from + 50);
    let (dp2, dp1) = (
        cluster.export(&reference, compare_at),
        cluster.export(&job, compare_at),
    );
    assert_parameters_close(&dp2, &dp1, 1e-6);
}

type Exported = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The same tensors, each within a relative `tolerance` of `want`'s (in the L2 norm).
fn assert_parameters_close(want: &Exported, got: &Exported, tolerance: f64) {
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (name, (shape, x)) in want {
        let (other, y) = &got[name];
        assert_eq!(shape, other, "{name}");
        let diff: f64 = x
            .iter()
            .zip(y)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let size: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        assert!(diff <= tolerance * size, "{name}: {diff:e} vs {size:e}");
    }
}

/// The newest committed checkpoint of `job` in its store.
fn newest_committed(cluster: &Cluster, job: &str) -> u64 {
    let listed = cluster.json(&["checkpoints", job]);
    listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "committed")
        .filter_map(|c| c["step"].as_u64())
        .max()
        .unwrap()
}

#[test]
fn resume_by_hand_at_another_tensor_and_pipeline_layout() {
    // 2 workers with 2 slots each: room for tp = pp = 2.
    let cluster = Cluster::start_with(2, 2, Vec::new());
    let set = [
        TINY_GPT.as_slice(),
        &[
            "train.steps=3000",
            "train.warmup_steps=2",
            "checkpoint.every_steps=20",
            "checkpoint.keep_last=200",
        ],
    ]
    .concat();
    // Saved by one process, resumed by four: every parameter and its Adam moments cut into
    // tensor-parallel slices and pipeline stages. Then resumed by two.
    let (reference_end, job) = reference_and_cancelled_run(&cluster, "gpt-dp1.toml", &set, 40);
    let reference = reference_end["id"].as_str().unwrap().to_string();
    let from = newest_committed(&cluster, &job);
    cluster.resume_from(
        &job,
        from,
        &[
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.schedule=\"gpipe\"",
        ],
    );
    // Its first checkpoint after the resume, then it is stopped: the rest adds nothing.
    let compare_at = from + 20;
    cluster.cancel_after_checkpoint(&job, compare_at);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert!(
        logs.contains(&format!("resumed from checkpoint at step {from}"))
            && logs.contains("resharded from dp=1 tp=1 pp=1"),
        "{logs}"
    );
    assert_eq!(cluster.status(&job)["parallel"]["tp"], 2, "{logs}");
    // The same state, computed in another order: the 20 steps after the resume have the
    // one-process run's losses within a relative 1e-4, as every layout trained from scratch
    // does (every_3d_layout_of_the_gpt_trains_like_one_process).
    let reference_losses: std::collections::HashMap<u64, f64> =
        cluster.losses(&reference).into_iter().collect();
    let after: Vec<(u64, f64)> = cluster
        .losses(&job)
        .into_iter()
        .filter(|(s, _)| (from + 1..=compare_at).contains(s))
        .collect();
    assert_eq!(after.len(), 20, "{logs}");
    for (step, loss) in after {
        let want = reference_losses[&step];
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs(),
            "step {step}: tp=2 pp=2 after resume {loss}, one process {want}"
        );
    }
    // And every whole tensor at that checkpoint (slices and stages joined by export).
    let (one, four) = (
        cluster.export(&reference, Some(compare_at)),
        cluster.export(&job, Some(compare_at)),
    );
    assert_parameters_close(&one, &four, 1e-4);

    // From four processes to two (tp = 1, pp = 2): each stage reads only the two
    // tensor-parallel shards of its own saved stage.
    cluster.wait_for(|c| c.rank_pids(&job).is_empty(), "the ranks to stop");
    let from = newest_committed(&cluster, &job);
    cluster.resume_from(&job, from, &["parallel.tp=1"]);
    let compare_at = from + 20;
    cluster.cancel_after_checkpoint(&job, compare_at);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert!(logs.contains("resharded from dp=1 tp=2 pp=2"), "{logs}");
    let (one, two) = (
        cluster.export(&reference, Some(compare_at)),
        cluster.export(&job, Some(compare_at)),
    );
    assert_parameters_close(&one, &two, 1e-4);

    // A store this machine does not see (a file:// store on another machine's disk looks
    // empty): the CLI falls back to the coordinator's records, for listing and for resume.
    // (Once the ranks are gone: a rank in its stop grace may still write a checkpoint.)
    cluster.wait_for(|c| c.rank_pids(&job).is_empty(), "the ranks to stop");
    let store = cluster.dir.path().join("state/checkpoints").join(&job);
    std::fs::rename(&store, store.with_extension("elsewhere")).unwrap();
    let out = cluster.gantry(&["checkpoints", &job]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("showing the coordinator's records"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&compare_at.to_string()),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cluster.gantry(&["resume", &job, "--from-step", "12345"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("has no checkpoint at step 12345"),
        "the coordinator's refusal: {stderr}"
    );
}

/// The job spec's store options that point at `moto` (its credentials go in the workers'
/// environment, [`Moto::env`]).
fn moto_options(moto: &Moto) -> Vec<String> {
    vec![
        format!("checkpoint.options.aws_endpoint=\"{}\"", moto.url),
        "checkpoint.options.aws_allow_http=true".into(),
    ]
}

/// Azurite, Azure Blob Storage's emulator, on loopback; stopped on drop.
struct Azurite {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

/// The emulator's well-known account and key (public; they sign requests to Azurite only).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    fn start(container: &str) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let bin = std::env::var("GANTRY_AZURITE").unwrap_or_else(|_| "azurite-blob".into());
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--silent"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/test installs Azurite)"));
        let azurite = Azurite {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "Azurite did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        azurite.request("PUT", container, &[("restype", "container")]);
        azurite
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", self.url.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A request to `{account}/{path}`, signed with the account key (Shared Key), as the
    /// object store client signs its own; the body of the answer.
    fn request(&self, method: &str, path: &str, query: &[(&str, &str)]) -> String {
        use base64::Engine;
        let base64 = base64::engine::general_purpose::STANDARD;
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let mut resource = format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{path}");
        let mut sorted = query.to_vec();
        sorted.sort();
        for (k, v) in &sorted {
            resource.push_str(&format!("\n{k}:{v}"));
        }
        // The verb, eleven empty standard headers, the x-ms headers, the resource.
        let to_sign = format!(
            "{method}\n{}x-ms-date:{date}\nx-ms-version:{version}\n{resource}",
            "\n".repeat(11)
        );
        let key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &base64.decode(AZURITE_KEY).unwrap(),
        );
        let signature = base64.encode(aws_lc_rs::hmac::sign(&key, to_sign.as_bytes()));
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "-X", method])
            .args(["-H", &format!("x-ms-date: {date}")])
            .args(["-H", &format!("x-ms-version: {version}")])
            .args([
                "-H",
                &format!("Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}"),
            ])
            .args(["-H", "Content-Length: 0"])
            .arg(format!(
                "{}/{AZURITE_ACCOUNT}/{path}?{}",
                self.url,
                query.join("&")
            ))
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{method} {path}: {body}");
        body
    }

    /// The blob names under `prefix` in `container`, from the server's own listing.
    fn keys(&self, container: &str, prefix: &str) -> String {
        self.request(
            "GET",
            container,
            &[
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix),
            ],
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -9` of one of `job`'s ranks once it has a checkpoint: the job restarts from it and
/// succeeds. Its end and its logs.
fn kill_a_rank_after_a_checkpoint(cluster: &Cluster, job: &str) -> (Value, String) {
    cluster.wait_for(
        |c| c.status(job)["last_checkpoint"].is_object(),
        "a first checkpoint",
    );
    kill9(cluster.rank_pids(job)[0]);
    let end = cluster.wait_until_ended(job);
    let logs = String::from_utf8(cluster.gantry(&["logs", job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    assert!(end["restarts"].as_u64().unwrap() >= 1, "{end}");
    assert!(logs.contains("resumed from checkpoint"), "{logs}");
    (end, logs)
}

/// Trains the mlp example with checkpoints at `url`, kills a rank once one is committed, and
/// checks that the job resumed from the store and ended with `reference`'s exact loss; returns
/// the job.
fn resume_a_killed_rank_from(
    cluster: &Cluster,
    url: &str,
    options: &[String],
    reference: &Value,
) -> String {
    let mut set = vec![
        "train.steps=1500".to_string(),
        "checkpoint.every_steps=25".into(),
        format!("checkpoint.url=\"{url}\""),
    ];
    set.extend_from_slice(options);
    let set: Vec<&str> = set.iter().map(String::as_str).collect();
    let job = cluster.submit("mlp-dp2.toml", &set);
    let (end, logs) = kill_a_rank_after_a_checkpoint(cluster, &job);
    assert_eq!(end["loss"], reference["loss"], "{logs}");
    let last = end["last_checkpoint"]["url"].as_str().unwrap();
    assert!(last.starts_with(&format!("{url}/{job}/step-")), "{last}");
    job
}

#[test]
fn checkpoints_on_s3_and_azure_resume_a_killed_rank_exactly() {
    let moto = Moto::start("gantry-test");
    let azurite = Azurite::start("gantry");
    let cluster = Cluster::start_with_env(3, [moto.env(), azurite.env()].concat());
    let reference = cluster.submit(
        "mlp-dp2.toml",
        &["train.steps=1500", "checkpoint.every_steps=25"],
    );
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded");

    // The servers themselves hold the committed checkpoints. The S3 endpoint comes from the
    // job spec's store options, Azurite's from the workers' environment.
    let job = resume_a_killed_rank_from(
        &cluster,
        "s3://gantry-test/checkpoints",
        &moto_options(&moto),
        &reference_end,
    );
    // The first replica's shards only: the second holds the same state.
    let one_replica = |keys: &str| {
        keys.contains("manifest.json")
            && keys.contains("rank-0.optim.bpk")
            && !keys.contains("rank-1")
    };
    let keys = moto.list("gantry-test", &format!("checkpoints/{job}/step-00001500/"));
    assert!(one_replica(&keys), "{keys}");
    let job = resume_a_killed_rank_from(&cluster, "az://gantry/checkpoints", &[], &reference_end);
    let keys = azurite.keys("gantry", &format!("checkpoints/{job}/step-00001500/"));
    assert!(one_replica(&keys), "{keys}");
}

/// A small xorshift generator: the chaos test's moments and victims, reproducible from the seed
/// it prints (set `GANTRY_CHAOS_SEED` to replay one).
struct Chaos(u64);

impl Chaos {
    fn from_env() -> Self {
        let seed = std::env::var("GANTRY_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("chaos seed {seed} (GANTRY_CHAOS_SEED={seed} replays it)");
        Self(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `kill -9` of one rank process.
    KillRank,
    /// `kill -9` of a worker daemon that runs ranks (its lease expires; a new worker joins).
    KillWorker,
    /// `kill -STOP` of one rank: it hangs, and its peers' collectives time out.
    StopRank,
    /// `kill -9` of the coordinator, restarted on the same state.
    KillCoordinator,
}

#[test]
fn chaos_faults_leave_a_3d_job_bit_identical() {
    // 6 workers × 2 slots for an 8-rank job: room to re-plan while a killed worker's lease runs
    // out; each killed worker is replaced, so the layout never shrinks.
    let mut cluster = Cluster::start_with(6, 2, Vec::new());
    let set = [
        "model.layers=2",
        "model.d_model=32",
        "data.seq_len=16",
        "data.examples=2000",
        "train.global_batch=16",
        "train.micro_batches=2",
        "train.steps=1200",
        "train.warmup_steps=10",
        "train.eval_every=400",
        "checkpoint.every_steps=10",
        "fault_tolerance.max_restarts=20",
        "fault_tolerance.collective_timeout_secs=4",
        "fault_tolerance.restart_backoff_secs=0.1",
    ];
    let reference = cluster.submit("gpt-3d.toml", &set);
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded", "{reference_end}");

    let mut chaos = Chaos::from_env();
    let mut faults = vec![
        Fault::KillRank,
        Fault::KillRank,
        Fault::KillWorker,
        Fault::KillWorker,
        Fault::StopRank,
        Fault::KillCoordinator,
    ];
    for i in (1..faults.len()).rev() {
        faults.swap(i, chaos.below(i as u64 + 1) as usize);
    }
    let job = cluster.submit("gpt-3d.toml", &set);
    let (mut attempt, mut step, mut ended) = (0, 0, true);
    for fault in &faults {
        // Each fault lands at a random moment in a running attempt with all 8 ranks up that has
        // trained past the previous fault (a new attempt, unless the coordinator was killed).
        cluster.wait_for(
            |c| {
                let s = c.status(&job);
                let a = s["attempt"].as_u64().unwrap_or(0);
                s["state"] == "Running"
                    && (a > attempt || !ended)
                    && s["step"].as_u64().unwrap_or(0) >= step + 3
                    && c.attempt_pids(&job, a).len() == 8
            },
            "the job to train again",
        );
        std::thread::sleep(Duration::from_millis(chaos.below(1000)));
        let s = cluster.status(&job);
        (attempt, step) = (s["attempt"].as_u64().unwrap(), s["step"].as_u64().unwrap());
        ended = !matches!(fault, Fault::KillCoordinator);
        let pids = cluster.attempt_pids(&job, attempt);
        assert!(
            !pids.is_empty(),
            "{fault:?}: no rank of {job} attempt {attempt} is running\n{}",
            String::from_utf8_lossy(&cluster.gantry(&["logs", &job]).stdout)
        );
        eprintln!("step {step}: {fault:?}");
        match fault {
            Fault::KillRank => kill9(pids[chaos.below(pids.len() as u64) as usize]),
            Fault::StopRank => {
                let pid = pids[chaos.below(pids.len() as u64) as usize];
                let ok = Command::new("kill")
                    .args(["-STOP", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
            Fault::KillWorker => {
                let hosts = cluster.hosts_of(&pids);
                assert!(!hosts.is_empty(), "a worker runs a rank of {job}");
                let victim = hosts[chaos.below(hosts.len() as u64) as usize];
                let mut dead = cluster.workers.remove(victim);
                dead.kill().unwrap();
                dead.wait().unwrap();
                cluster.add_worker();
            }
            Fault::KillCoordinator => {
                let coordinator = cluster.coordinator.as_mut().unwrap();
                coordinator.kill().unwrap();
                coordinator.wait().unwrap();
                std::thread::sleep(Duration::from_millis(chaos.below(2000)));
                cluster.start_coordinator();
                cluster.wait_for(
                    |c| c.alive_workers() == c.workers.len(),
                    "workers to reconnect",
                );
            }
        }
    }
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    // Every fault but the coordinator's ends an attempt; two may land in one attempt's end.
    assert!(end["restarts"].as_u64().unwrap() >= 3, "{end}\n{logs}");
    assert!(logs.contains("killed by signal 9"), "{logs}");
    assert_eq!(end["loss"], reference_end["loss"], "{logs}");
    assert_eq!(end["test_loss"], reference_end["test_loss"], "{logs}");

    // Bit-identical final parameters: nothing torn or stale was resumed from.
    let (a, b) = (cluster.export(&reference, None), cluster.export(&job, None));
    assert_eq!(a.len(), b.len());
    for (name, (shape, values)) in &a {
        let (other_shape, other) = &b[name];
        assert_eq!(shape, other_shape, "{name}");
        let same = values
            .iter()
            .zip(other)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs after {faults:?}\n{logs}");
    }
}

/// A `GET` of `path` on a local HTTP port, with curl.
fn http_get(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}{path}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET :{port}{path} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_and_health_endpoints_show_live_values() {
    let mut cluster = Cluster {
        dir: tempfile::tempdir().unwrap(),
        port: free_port(),
        coordinator: None,
        workers: Vec::new(),
        env: Vec::new(),
        slots: 1,
        metrics: Some((free_port(), vec![free_port(), free_port()])),
        coordinator_args: Vec::new(),
    };
    cluster.start_coordinator();
    cluster.add_worker();
    cluster.add_worker();
    cluster.wait_for(|c| c.alive_workers() == 2, "workers to register");
    let (coordinator, workers) = cluster.metrics.clone().unwrap();
    assert_eq!(http_get(coordinator, "/healthz"), "ok\n");
    assert_eq!(http_get(workers[0], "/readyz"), "ready\n");

    let job = cluster.submit(
        "mlp-dp2.toml",
        &["train.steps=100000", "checkpoint.every_steps=200"],
    );
    cluster.wait_for(
        |c| c.status(&job)["last_checkpoint"].is_object(),
        "a checkpoint",
    );
    let text = http_get(coordinator, "/metrics");
    assert_eq!(
        sample(&text, "gantry_jobs{state=\"Running\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "gantry_workers{state=\"alive\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "gantry_worker_slots{state=\"used\"}"),
        Some(2.0),
        "{text}"
    );
    let step = sample(&text, &format!("gantry_job_step{{job=\"{job}\"}}")).unwrap();
    assert!(step > 0.0, "{text}");
    assert!(
        text.contains(
            "gantry_rpc_duration_seconds_count{method=\"/gantry.v1.JobService/SubmitJob\"} 1"
        ),
        "{text}"
    );
    // Workers: the ranks they run now; the reporting rank's step, throughput, step time and
    // all-reduce bandwidth, and the checkpoints it committed.
    let scraped: Vec<String> = workers.iter().map(|p| http_get(*p, "/metrics")).collect();
    for text in &scraped {
        assert_eq!(sample(text, "gantry_worker_ranks{}"), Some(1.0), "{text}");
    }
    let reporting = scraped
        .iter()
        .find(|t| t.contains("gantry_rank_step{"))
        .expect("one worker hosts the reporting rank");
    let job_series = |name: &str| sample(reporting, &format!("{name}{{job=\"{job}\"}}"));
    for name in [
        "gantry_rank_step",
        "gantry_rank_samples_per_second",
        "gantry_rank_step_seconds",
        "gantry_rank_allreduce_busbw_gbps",
    ] {
        assert!(
            job_series(name).is_some_and(|v| v > 0.0),
            "{name}: {reporting}"
        );
    }
    assert!(
        sample(reporting, "gantry_worker_checkpoint_seconds_count").is_some_and(|n| n >= 1.0),
        "{reporting}"
    );
    // Open, and nothing secret in them: neither token, nor the CA's key material.
    for (name, file) in [("admin", "admin.token"), ("join", "join.token")] {
        let token = std::fs::read_to_string(cluster.dir.path().join("state").join(file)).unwrap();
        let token = token.trim();
        for scrape in scraped.iter().chain([&text]) {
            assert!(!scrape.contains(token), "the {name} token is in a scrape");
        }
    }
    assert!(!text.contains("PRIVATE KEY"));
    assert_eq!(cluster.gantry(&["cancel", &job]).status.code(), Some(0));
}

#[test]
fn sigterm_drains_a_worker_without_losing_a_step() {
    // Three single-slot workers for a dp=2 job: one spare to move to.
    let mut cluster = Cluster::start(3);
    // Periodic checkpoints are far apart: the resume point can only be the drain's own.
    let set = ["train.steps=4000", "checkpoint.every_steps=3000"];
    let reference = cluster.submit("mlp-dp2.toml", &set);
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded");

    let job = cluster.submit("mlp-dp2.toml", &set);
    cluster.wait_for(
        |c| c.status(&job)["step"].as_u64().unwrap_or(0) > 100,
        "training to start",
    );
    let pids = cluster.rank_pids(&job);
    let host = *cluster
        .hosts_of(&pids)
        .first()
        .expect("a worker runs a rank");
    let mut drained = cluster.workers.remove(host);
    let ok = Command::new("kill")
        .args(["-TERM", &drained.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    // The worker stops once its ranks have checkpointed, well within its 60 s drain timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = drained.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the drained worker did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "drained worker exit: {status}");

    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    assert_eq!(end["restarts"], 0, "a drain uses no restart: {logs}");
    assert!(logs.contains("a worker is draining"), "{logs}");
    // The next attempt resumed exactly where the drain checkpointed: no step was lost.
    let drain_step = logs
        .lines()
        .find_map(|l| {
            l.split("checkpointed at step ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .expect("a drain checkpoint");
    assert!(drain_step > 100 && drain_step % 3000 != 0, "{logs}");
    assert!(
        logs.contains(&format!("resumed from checkpoint at step {drain_step} ")),
        "{logs}"
    );
    assert_eq!(end["loss"], reference_end["loss"], "{logs}");
}

#[test]
fn a_failed_checkpoint_upload_is_retried_reported_and_never_committed() {
    let cluster = Cluster::start(2);
    // Periodic checkpoints upload in the background (checkpoint.async_upload, the default).
    let set = [
        "train.steps=6000",
        "checkpoint.every_steps=2000",
        "checkpoint.keep_last=5",
    ];
    let job = cluster.submit("mlp-dp2.toml", &set);
    // A file where step 2000's directory must go: every upload of that step fails (even as
    // root), while training goes on.
    let store = cluster.dir.path().join("state/checkpoints").join(&job);
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("step-00002000"), b"in the way").unwrap();
    let end = cluster.wait_until_ended(&job);
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert_eq!(end["state"], "Succeeded", "{end}\n{logs}");
    assert_eq!(end["restarts"], 0, "{logs}");
    assert!(
        logs.contains("checkpoint upload of step 2000 failed"),
        "{logs}"
    );
    assert!(logs.contains("retrying"), "{logs}");
    assert!(
        logs.contains("checkpoint at step 2000 not committed"),
        "{logs}"
    );
    let listed = cluster.json(&["checkpoints", &job]);
    let committed: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "committed")
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(committed, [4000, 6000], "{listed}");
}

/// Secure by default, end to end through the real binaries: a worker daemon without the join
/// token cannot register; the CLI without a token, with a wrong or a revoked one is refused
/// (exit 2, naming the cause) and changes nothing; a viewer cannot submit; a submitter's job
/// records who submitted and cancelled it, and `gantry logs` shows it.
#[test]
fn without_a_valid_token_nothing_registers_submits_or_changes() {
    let cluster = Cluster::start(1);
    let intruder = Command::new(bin("gantry-worker"))
        .args(["--coordinator", &cluster.url()])
        .arg("--work-dir")
        .arg(cluster.dir.path().join("intruder"))
        .arg("--ca-cert")
        .arg(cluster.ca())
        .env("GANTRY_JOIN_TOKEN", "gantry_not-the-join-token")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&intruder.stderr);
    assert!(!intruder.status.success(), "{stderr}");
    assert!(
        stderr.contains("registration refused") && stderr.contains("Unauthenticated"),
        "{stderr}"
    );
    assert_eq!(cluster.json(&["workers"]).as_array().unwrap().len(), 1);

    let as_holder = |token: Option<&str>, args: &[&str]| -> Output {
        let mut command = Command::new(bin("gantry"));
        command.args(["--coordinator", &cluster.url()]);
        command.arg("--ca-cert").arg(cluster.ca());
        if let Some(token) = token {
            command.env("GANTRY_TOKEN", token);
        }
        // From a directory without a .gantry/admin.token to fall back on.
        command
            .current_dir(cluster.dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let created = |name: &str, role: &str| -> (String, String) {
        let v = cluster.json(&["token", "create", name, "--role", role]);
        (
            v["token"].as_str().unwrap().to_string(),
            v["id"].as_str().unwrap().to_string(),
        )
    };
    let (viewer, _) = created("vera", "viewer");
    let (submitter, _) = created("sam", "submitter");
    let (revoked, revoked_id) = created("gone", "submitter");
    assert_eq!(
        cluster
            .gantry(&["token", "revoke", &revoked_id])
            .status
            .code(),
        Some(0)
    );
    let spec = examples().join("mlp-dp2.toml");
    let submit = [
        "submit",
        spec.to_str().unwrap(),
        "--set",
        "parallel.dp=1",
        "--set",
        "train.steps=100000",
    ];
    for (token, why) in [
        (None, "no bearer token"),
        (Some("gantry_wrong"), "unknown or revoked"),
        (Some(revoked.as_str()), "unknown or revoked"),
        (Some(viewer.as_str()), "vera holds the role viewer"),
    ] {
        let out = as_holder(token, &submit);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{why}: {stderr}");
        assert!(stderr.contains(why), "{why}: {stderr}");
    }
    assert_eq!(cluster.json(&["jobs"]).as_array().unwrap().len(), 0);
    // A viewer reads; a submitter submits and cancels its own job.
    assert_eq!(as_holder(Some(&viewer), &["jobs"]).status.code(), Some(0));
    let out = as_holder(Some(&submitter), &submit);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(cluster.status(&job)["submitted_by"], "sam");
    let out = as_holder(Some(&viewer), &["cancel", &job]);
    assert_eq!(out.status.code(), Some(2));
    let out = as_holder(Some(&submitter), &["cancel", &job]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
    assert!(
        logs.contains("job submitted by sam") && logs.contains("job cancelled by sam"),
        "{logs}"
    );
    let tokens = cluster.json(&["token", "list"]);
    let listed = tokens.to_string();
    for secret in [&viewer, &submitter, &revoked] {
        assert!(!listed.contains(secret.as_str()), "a listing shows a token");
    }
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == revoked_id.as_str() && t["revoked_at"].is_string()),
        "{tokens}"
    );
}

/// A coordinator with an allow-list of stores refuses, naming the field, a spec whose
/// checkpoint store or endpoint lies outside it (and, with or without one, the cloud metadata
/// address); nothing is stored.
#[test]
fn stores_outside_the_allow_list_are_refused_by_field() {
    let mut cluster = Cluster::start(0);
    cluster.stop_coordinator();
    let allowed = format!("file://{}", cluster.dir.path().join("allowed").display());
    cluster.coordinator_args = [
        "--allowed-store",
        &allowed,
        "--allowed-store",
        "s3://bucket",
    ]
    .map(String::from)
    .to_vec();
    cluster.start_coordinator();
    cluster.wait_for(|c| c.gantry(&["jobs"]).status.success(), "the coordinator");
    let spec = examples().join("mlp-dp2.toml");
    let inside = format!("checkpoint.url=\"{allowed}/run\"");
    for (set, field) in [
        (
            vec!["checkpoint.url=\"file:///etc/gantry\""],
            "checkpoint.url",
        ),
        (
            vec![
                "checkpoint.url=\"s3://bucket/x\"",
                "checkpoint.options.aws_endpoint=\"http://169.254.169.254\"",
            ],
            "checkpoint.options.aws_endpoint",
        ),
        (
            vec![inside.as_str(), "data.source=\"dataset:/srv/other\""],
            "data.source",
        ),
    ] {
        let mut args = vec!["submit", spec.to_str().unwrap()];
        for s in &set {
            args.extend(["--set", s]);
        }
        let out = cluster.gantry(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set:?}: {stderr}");
        assert!(stderr.contains(field), "{set:?}: {stderr}");
    }
    assert_eq!(cluster.json(&["jobs"]).as_array().unwrap().len(), 0);
    let out = cluster.gantry(&["submit", spec.to_str().unwrap(), "--set", &inside]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The listening TCP ports of process `pid` (from its socket inodes and /proc/net/tcp).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A: LISTEN), …, inode (the 10th field).
            (f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9])).then(|| {
                let port = f[1].rsplit(':').next().unwrap();
                u16::from_str_radix(port, 16).unwrap()
            })
        })
        .collect()
}

/// The rank a rank process runs, from its assignment's file name.
fn rank_of(pid: u32) -> Option<u32> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let file = cmdline.split('\0').find(|a| a.ends_with(".json"))?;
    file.rsplit("rank-")
        .next()?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// A process that knows a job's id, its attempt and a rank number, but not the attempt's
/// secret, connects to rank 0's data-plane port while rank 0 waits for its peer, and claims to
/// be rank 1: rank 0 answers its challenge, refuses its proof and drops it, then links the real
/// rank 1, and the job trains on to the very loss of a run nobody disturbed.
#[test]
fn a_process_without_the_attempts_secret_cannot_join_a_ring() {
    use std::io::{Read, Write};
    let mut cluster = Cluster::start(0);
    // Long leases: a worker frozen for a moment (below) is not declared lost.
    cluster.stop_coordinator();
    cluster.coordinator_args = ["--lease-ttl-ms", "30000", "--heartbeat-interval-ms", "300"]
        .map(String::from)
        .to_vec();
    cluster.start_coordinator();
    cluster.add_worker();
    cluster.add_worker();
    cluster.wait_for(|c| c.alive_workers() == 2, "workers to register");
    let set = ["train.steps=300", "checkpoint.every_steps=100"];
    let reference = cluster.submit("mlp-dp2.toml", &set);
    let reference_end = cluster.wait_until_ended(&reference);
    assert_eq!(reference_end["state"], "Succeeded");
    let signal = |pid: u32, sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    // One worker is frozen, so the other's rank starts alone: bound, waiting at rendezvous.
    // Its connections queue until it accepts, and rank 0 accepts first what came first. Which
    // worker gets rank 0 is the scheduler's choice: freeze the other one, until rank 0 is the
    // one that runs.
    for tries in 0.. {
        assert!(tries < 6, "rank 0 never ran on the worker left running");
        let frozen = cluster.workers[tries % 2].id();
        signal(frozen, "-STOP");
        let job = cluster.submit("mlp-dp2.toml", &set);
        let mut live = None;
        cluster.wait_for(
            |c| {
                live = c.rank_pids(&job).first().and_then(|&pid| {
                    let port = listening_ports(pid).first().copied()?;
                    Some((rank_of(pid)?, port))
                });
                live.is_some()
            },
            "the running rank to listen",
        );
        let (rank, port) = live.unwrap();
        if rank != 0 {
            signal(frozen, "-CONT");
            assert_eq!(cluster.wait_until_ended(&job)["state"], "Succeeded");
            continue;
        }
        let attempt = cluster.status(&job)["attempt"].as_u64().unwrap();
        let mut intruder = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        intruder
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        // Rank 1's hello, right in every field the intruder can know, and a nonce.
        let hello = gantry_collective::tcp::Identity::new(&job, attempt, [0; 32]).hello(1);
        intruder.write_all(&hello).unwrap();
        intruder.write_all(&[7; 16]).unwrap();
        signal(frozen, "-CONT");
        let mut answer = [0u8; 48];
        intruder.read_exact(&mut answer).unwrap();
        intruder.write_all(&[0; 32]).unwrap(); // a proof it cannot make
        let mut ack = [0u8; 1];
        assert!(
            !matches!(intruder.read(&mut ack), Ok(1)),
            "rank 0 acknowledged a process without the secret"
        );
        let end = cluster.wait_until_ended(&job);
        assert_eq!(end["state"], "Succeeded", "{end}");
        assert_eq!(end["attempt"], 1, "the intruder cost an attempt: {end}");
        assert_eq!(end["loss"], reference_end["loss"], "{end}");
        let logs = String::from_utf8(cluster.gantry(&["logs", &job]).stdout).unwrap();
        assert!(
            logs.contains("refused a connection that is not a rank of this attempt"),
            "{logs}"
        );
        break;
    }
}
