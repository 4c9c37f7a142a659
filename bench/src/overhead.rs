//! What the orchestrator itself costs a training step: the same model, data and batch trained
//! by a bare burn loop in this process (forward, backward, Adam: nothing else) and as a dp = 1
//! Gantry job on a local cluster of real processes (coordinator, worker daemon, rank process:
//! the step loop's gradient flattening, the world-of-one all-reduce, the norm, the control
//! flags, progress reports). Printed figures, not a test.
//!
//! The bare loop runs before and after the job, so drift of this shared machine shows as the
//! difference between the two, and the job is compared with their mean.

use crate::faults::{Cluster, median};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use gantry_core::JobSpec;
use gantry_trainer::data::{Dataset, Split};
use gantry_trainer::job::learning_rate;
use gantry_trainer::model::{Gpt, Mlp, TrainModel};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Clone)]
pub struct OverheadOptions {
    /// The job whose model, data and batch are timed (run at dp = 1, without evaluation,
    /// clipping or periodic checkpoints).
    #[arg(long, default_value = "deploy/examples/gpt-dp2.toml")]
    spec: PathBuf,
    /// Steps compared (after the warm-up steps).
    #[arg(long, default_value_t = 150)]
    steps: u64,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
}

/// Step times of the bare loop on the CPU.
fn bare<M: TrainModel>(spec: &JobSpec) -> Vec<f64> {
    let device = Device::flex();
    device.seed(spec.train.seed);
    let model = M::init(spec, &device.clone().autodiff());
    bare_loop(spec, model, &device).1
}

/// The bare loop, what a user would write with burn alone: `model` trained on `device` for the
/// spec's steps. Returns each step's loss and wall time.
pub fn bare_loop<M: TrainModel>(spec: &JobSpec, model: M, device: &Device) -> (Vec<f64>, Vec<f64>) {
    let ad = device.clone().autodiff();
    let mut model = model.to_device(&ad);
    let mut optimizer = AdamConfig::new().init();
    let data = Dataset::for_spec(spec);
    let batch_size = spec.train.global_batch as usize;
    let (mut losses, mut times) = (Vec::new(), Vec::new());
    for step in 0..spec.train.steps {
        let started = Instant::now();
        let indices = data.global_batch_indices(step, batch_size);
        let batch = data.batch(Split::Train, &indices);
        let loss = model.loss(&batch, &ad);
        // Read the loss, as a training loop that logs it does (and as a rank does); on a GPU
        // this waits for the step's kernels.
        losses.push(f64::from(loss.clone().into_scalar::<f32>()));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(learning_rate(spec, step), model, grads);
        times.push(started.elapsed().as_secs_f64());
    }
    (losses, times)
}

/// Step times of the same training as a Gantry job, from its progress lines
/// (`samples/s` is the global batch over the step's wall time).
fn job(spec_path: &std::path::Path, set: &[String], batch: f64) -> anyhow::Result<Vec<f64>> {
    let cluster = Cluster::start(1)?;
    let url = format!(
        "checkpoint.url=\"file://{}\"",
        cluster.dir().join("ckpt").display()
    );
    let mut args = vec!["submit", spec_path.to_str().unwrap_or_default(), "--wait"];
    let sets: Vec<String> = set.iter().cloned().chain([url]).collect();
    for s in &sets {
        args.extend(["--set", s]);
    }
    let ended = cluster.gantry(&args)?;
    anyhow::ensure!(ended["state"] == "Succeeded", "the job ended {ended}");
    let id = ended["id"].as_str().unwrap_or_default();
    let logs = cluster.gantry_text(&["logs", id])?;
    let mut times: Vec<(u64, f64)> = logs
        .lines()
        .filter_map(|line| {
            let rest = line.split("] ").nth(1)?.strip_prefix("step ")?;
            let step: u64 = rest.split('/').next()?.parse().ok()?;
            let rate: f64 = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("samples/s="))?
                .parse()
                .ok()?;
            (rate > 0.0).then(|| (step, batch / rate))
        })
        .collect();
    times.sort_by_key(|(step, _)| *step);
    times.dedup_by_key(|(step, _)| *step);
    Ok(times.into_iter().map(|(_, t)| t).collect())
}

pub fn overhead(o: &OverheadOptions) -> anyhow::Result<()> {
    // The allocator settings a rank process runs with, so the two differ by Gantry's code
    // alone (without them, glibc hands each step's large buffers back and faults them in
    // again: about a tenth of this model's step).
    gantry_trainer::rank::keep_freed_memory();
    let total = o.warmup + o.steps;
    let set: Vec<String> = [
        "parallel.dp=1".to_string(),
        "parallel.tp=1".into(),
        "parallel.pp=1".into(),
        format!("train.steps={total}"),
        "train.micro_batches=1".into(),
        "train.eval_every=0".into(),
        "train.grad_clip=0.0".into(),
        "checkpoint.every_steps=0".into(),
    ]
    .into();
    let spec = JobSpec::load(&o.spec, &set)?;
    anyhow::ensure!(
        spec.model.kind != gantry_core::ModelKind::Bert,
        "{}: the overhead benchmark times a gpt, llama or mlp (the bert has no bare loop here)",
        o.spec.display()
    );
    let bare_run = || match spec.model.kind {
        gantry_core::ModelKind::Gpt => bare::<Gpt>(&spec),
        gantry_core::ModelKind::Mlp => bare::<Mlp>(&spec),
        gantry_core::ModelKind::Llama => bare::<gantry_trainer::llama::Llama>(&spec),
        gantry_core::ModelKind::Bert => unreachable!("refused above"),
    };
    let timed = |v: Vec<f64>| median(v.into_iter().skip(o.warmup as usize).collect());
    let before = timed(bare_run());
    let gantry = job(&o.spec, &set, f64::from(spec.train.global_batch))?;
    anyhow::ensure!(
        gantry.len() as u64 == total,
        "the job reported {} of {total} steps",
        gantry.len()
    );
    let gantry = timed(gantry);
    let after = timed(bare_run());
    let bare_mean = (before + after) / 2.0;
    println!(
        "{} ({:?}, {} layers, d_model {}), batch {}, seq_len {}: median step over steps {}..{}",
        spec.name,
        spec.model.kind,
        spec.model.layers,
        spec.model.d_model,
        spec.train.global_batch,
        spec.data.seq_len,
        o.warmup,
        total
    );
    println!(
        "  bare burn loop: {:.2} ms before, {:.2} ms after the job (drift {:+.1}%)",
        before * 1e3,
        after * 1e3,
        100.0 * (after - before) / before
    );
    println!("  Gantry dp=1 job: {:.2} ms", gantry * 1e3);
    println!(
        "  ratio: {:.3}x the bare loop (target <= 1.03)",
        gantry / bare_mean
    );
    Ok(())
}
