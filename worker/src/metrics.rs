//! The worker daemon's Prometheus metrics, fed by its rank processes' events.

use gantry_ops::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use gantry_ops::{Collect, gauges, labels};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the progress-reporting rank of a job said last.
#[derive(Debug, Clone, Default)]
struct JobStats {
    step: u64,
    loss: f64,
    samples_per_sec: f64,
    step_seconds: f64,
    allreduce_gbps: Option<f64>,
}

struct Inner {
    running: usize,
    started: u64,
    exits: HashMap<&'static str, u64>,
    jobs: HashMap<String, JobStats>,
    checkpoints: Histogram,
    checkpoint_bytes: u64,
}

/// Shared between the agent (which records) and the metrics endpoint (which reads).
#[derive(Clone)]
pub struct WorkerMetrics(Arc<Mutex<Inner>>);

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Inner {
            running: 0,
            started: 0,
            exits: HashMap::new(),
            jobs: HashMap::new(),
            // 10 ms to ~5 min.
            checkpoints: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            checkpoint_bytes: 0,
        })))
    }
}

impl WorkerMetrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn rank_started(&self) {
        self.with(|m| {
            m.running += 1;
            m.started += 1;
        });
    }

    /// `outcome`: "succeeded", "failed" or "stopped".
    pub fn rank_exited(&self, outcome: &'static str) {
        self.with(|m| {
            m.running = m.running.saturating_sub(1);
            *m.exits.entry(outcome).or_default() += 1;
        });
    }

    pub fn progress(
        &self,
        job: &str,
        step: u64,
        loss: f64,
        samples_per_sec: f64,
        step_seconds: f64,
        allreduce_gbps: Option<f64>,
    ) {
        self.with(|m| {
            m.jobs.insert(
                job.to_string(),
                JobStats {
                    step,
                    loss,
                    samples_per_sec,
                    step_seconds,
                    allreduce_gbps,
                },
            );
        });
    }

    pub fn checkpoint(&self, seconds: f64, bytes: u64) {
        self.with(|m| {
            m.checkpoints.observe(seconds);
            m.checkpoint_bytes += bytes;
        });
    }

    /// What a scrape of this worker returns.
    pub fn collector(&self, slots: u32) -> Collect {
        let me = self.clone();
        Arc::new(move |registry| {
            let ranks = gauges(
                registry,
                "gantry_worker_ranks",
                "Rank processes running now.",
            );
            let slot_gauge = gauges(
                registry,
                "gantry_worker_slots",
                "Rank slots of this worker.",
            );
            let started = gauges(
                registry,
                "gantry_worker_ranks_started",
                "Rank processes started since the daemon began.",
            );
            let exits = gauges(
                registry,
                "gantry_worker_rank_exits",
                "Rank processes that exited, by outcome.",
            );
            let step = gauges(
                registry,
                "gantry_rank_step",
                "Last step a rank reported, by job.",
            );
            let loss = gauges(registry, "gantry_rank_loss", "Last training loss, by job.");
            let throughput = gauges(
                registry,
                "gantry_rank_samples_per_second",
                "Training samples per second of the last step, by job.",
            );
            let step_time = gauges(
                registry,
                "gantry_rank_step_seconds",
                "Wall time of the last training step, by job.",
            );
            let bandwidth = gauges(
                registry,
                "gantry_rank_allreduce_busbw_gbps",
                "Bus bandwidth of the last step's gradient all-reduce (GB/s), by job.",
            );
            let checkpoint_bytes = gauges(
                registry,
                "gantry_worker_checkpoint_bytes",
                "Bytes of the checkpoints committed by ranks of this worker.",
            );
            me.with(|m| {
                let none = labels(&[]);
                ranks.get_or_create(&none).set(m.running as f64);
                slot_gauge.get_or_create(&none).set(f64::from(slots));
                started.get_or_create(&none).set(m.started as f64);
                for outcome in ["succeeded", "failed", "stopped"] {
                    let n = m.exits.get(outcome).copied().unwrap_or(0);
                    exits
                        .get_or_create(&labels(&[("outcome", outcome)]))
                        .set(n as f64);
                }
                for (job, s) in &m.jobs {
                    let job = labels(&[("job", job)]);
                    step.get_or_create(&job).set(s.step as f64);
                    loss.get_or_create(&job).set(s.loss);
                    throughput.get_or_create(&job).set(s.samples_per_sec);
                    step_time.get_or_create(&job).set(s.step_seconds);
                    if let Some(g) = s.allreduce_gbps {
                        bandwidth.get_or_create(&job).set(g);
                    }
                }
                checkpoint_bytes
                    .get_or_create(&none)
                    .set(m.checkpoint_bytes as f64);
                registry.register(
                    "gantry_worker_checkpoint_seconds",
                    "Time from a rank's checkpoint save to its commit.",
                    m.checkpoints.clone(),
                );
            });
        })
    }
}
