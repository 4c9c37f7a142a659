//! `gantry-bench gpu`: the device check `scripts/gpu-check` runs on a GPU machine, in one short
//! call, with one summary line per check (JSON, so the script can put it next to PyTorch's):
//!
//! - `equivalence`: the same gpt, initialised once on the CPU and copied to CUDA, trained the
//!   same steps on the same batches on both; the largest per-step loss difference (f32);
//! - `nccl`: an in-place all-reduce of a device buffer through `NcclComm` (world size 1 on one
//!   GPU), checked against its input, and its time and bandwidth;
//! - `step`: the step time, tokens/s and model FLOPs utilisation of a ~100 M-parameter decoder
//!   in f32, for `scripts/gpu-check.py` to compare with the same model in PyTorch eager.
//!
//! Mixed precision is not in it: `train.precision = "bf16"`/`"fp16"` is still refused.

#[derive(clap::Args, Clone)]
pub struct GpuOptions {
    /// Steps of the CPU-against-CUDA comparison.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Bytes of the NCCL all-reduce buffer.
    #[arg(long, default_value = "64MiB", value_parser = crate::parse_bytes)]
    pub nccl_bytes: usize,
    /// The timed decoder: blocks, width, heads, batch and sequence length.
    #[arg(long, default_value_t = 12)]
    pub layers: u32,
    #[arg(long, default_value_t = 768)]
    pub d_model: u32,
    #[arg(long, default_value_t = 12)]
    pub heads: u32,
    #[arg(long, default_value_t = 16)]
    pub batch: u32,
    #[arg(long, default_value_t = 256)]
    pub seq_len: u32,
    /// Timed steps of the decoder, after 3 warm-up steps.
    #[arg(long, default_value_t = 10)]
    pub timed_steps: u64,
    /// The GPU's dense f32 peak in TFLOP/s, for the utilisation figure (H200: 67).
    #[arg(long, default_value_t = 67.0)]
    pub peak_tflops: f64,
}

#[cfg(not(feature = "cuda"))]
pub fn gpu(_options: &GpuOptions) -> anyhow::Result<()> {
    anyhow::bail!(
        "gantry-bench was built without CUDA; build it with `cargo build --release --bins \
         --features gantry-bench/cuda`"
    )
}

#[cfg(feature = "cuda")]
pub use on_device::gpu;

#[cfg(feature = "cuda")]
mod on_device {
    use super::GpuOptions;
    use crate::faults::median;
    use crate::overhead::bare_loop;
    use burn::module::Module;
    use burn::tensor::Device;
    use gantry_collective::ReduceOp;
    use gantry_collective::nccl::NcclComm;
    use gantry_core::JobSpec;
    use gantry_trainer::model::{Gpt, TrainModel};
    use serde_json::json;
    use std::time::{Duration, Instant};

    pub fn gpu(options: &GpuOptions) -> anyhow::Result<()> {
        let cuda = gantry_trainer::device::cuda()?;
        println!("{}", equivalence(options, &cuda)?);
        println!("{}", nccl(options)?);
        println!("{}", step_time(options, &cuda)?);
        Ok(())
    }

    /// A gpt job spec of this shape on the built-in arithmetic corpus.
    fn spec(
        layers: u32,
        d_model: u32,
        heads: u32,
        steps: u64,
        batch: u32,
        seq_len: u32,
    ) -> anyhow::Result<JobSpec> {
        Ok(JobSpec::from_json(&format!(
            r#"{{"name":"gpu-check","model":{{"kind":"gpt","layers":{layers},"d_model":{d_model},"heads":{heads}}},
                "data":{{"seq_len":{seq_len}}},
                "train":{{"steps":{steps},"global_batch":{batch},"lr":1e-3,"warmup_steps":0}}}}"#
        ))?)
    }

    fn equivalence(options: &GpuOptions, cuda: &Device) -> anyhow::Result<serde_json::Value> {
        let spec = spec(2, 96, 4, options.steps, 32, 32)?;
        let cpu = Device::flex();
        cpu.seed(spec.train.seed);
        let model = Gpt::init(&spec, &cpu.clone().autodiff());
        let (on_cpu, _) = bare_loop(&spec, model.clone(), &cpu);
        let (on_cuda, _) = bare_loop(&spec, model, cuda);
        let worst = on_cpu
            .iter()
            .zip(&on_cuda)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        Ok(json!({
            "check": "equivalence", "steps": options.steps,
            "cpu_losses": on_cpu, "cuda_losses": on_cuda, "max_abs_diff": worst,
            "loss_falls": on_cuda.last() < on_cuda.first(),
        }))
    }

    fn nccl(options: &GpuOptions) -> anyhow::Result<serde_json::Value> {
        let id = NcclComm::unique_id()?;
        let comm = NcclComm::new(0, 0, 1, id, Duration::from_secs(60))?;
        let len = (options.nccl_bytes / 4).max(1);
        let host: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 * 0.5).collect();
        let stream = comm.stream().clone();
        let mut buf = stream
            .clone_htod(&host)
            .map_err(|e| anyhow::anyhow!("copy to the device: {e:?}"))?;
        let mut times = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            comm.all_reduce_device(&mut buf, ReduceOp::Sum)?;
            stream
                .synchronize()
                .map_err(|e| anyhow::anyhow!("synchronize: {e:?}"))?;
            times.push(started.elapsed().as_secs_f64());
        }
        let back = stream
            .clone_dtoh(&buf)
            .map_err(|e| anyhow::anyhow!("copy to the host: {e:?}"))?;
        let t = median(times);
        Ok(json!({
            "check": "nccl", "world_size": 1, "bytes": len * 4,
            // The sum over a world of one is the input itself, however often it is applied.
            "correct": back == host,
            "median_s": t, "algbw_gb_s": (len * 4) as f64 / t / 1e9,
        }))
    }

    fn step_time(options: &GpuOptions, cuda: &Device) -> anyhow::Result<serde_json::Value> {
        let o = options;
        let spec = spec(
            o.layers,
            o.d_model,
            o.heads,
            3 + o.timed_steps,
            o.batch,
            o.seq_len,
        )?;
        cuda.seed(spec.train.seed);
        let model = Gpt::init(&spec, &cuda.clone().autodiff());
        let params = model.num_params();
        let (losses, times) = bare_loop(&spec, model, cuda);
        let step = median(times[3..].to_vec());
        let tokens = f64::from(o.batch) * f64::from(o.seq_len);
        // 6 · parameters · tokens: forward and backward of the matrix multiplications, the usual
        // model-FLOPs estimate (attention scores left out, as in PaLM's MFU without them).
        let flops = 6.0 * params as f64 * tokens;
        Ok(json!({
            "check": "step", "framework": "gantry", "precision": "f32",
            "params": params, "batch": o.batch, "seq_len": o.seq_len,
            "layers": o.layers, "d_model": o.d_model, "heads": o.heads,
            "step_s": step, "tokens_per_s": tokens / step,
            "mfu": flops / step / (o.peak_tflops * 1e12),
            "loss_first": losses.first(), "loss_last": losses.last(),
        }))
    }
}
