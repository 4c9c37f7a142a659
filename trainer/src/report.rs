//! How a rank process talks to its worker daemon: plain lines on stdout are logs; lines that
//! start with [`EVENT_PREFIX`] carry a JSON [`RankEvent`] (progress, checkpoint commits).

use gantry_core::{ClassMetrics, JobSpec};
pub use gantry_core::{EVENT_PREFIX, RankEvent};
use std::io::Write;

/// What a rank reports after a training step.
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub eval_loss: Option<f64>,
    /// The global norm of the step's gradient, before clipping.
    pub grad_norm: Option<f64>,
    pub lr: f64,
    pub samples_per_sec: f64,
    pub step_seconds: f64,
    pub allreduce_gbps: Option<f64>,
    /// A classifier's metrics on the validation split, when it was evaluated at this step.
    pub eval_metrics: Option<ClassMetrics>,
}

/// Writes events and log lines for the worker daemon. One rank reports progress: the first
/// data-parallel replica of the last pipeline stage, where the loss (already averaged over the
/// data-parallel group) is known.
#[derive(Clone)]
pub struct Reporter {
    pub reports_progress: bool,
    /// Writes nothing at all (a benchmark driving the checkpoint pipeline).
    quiet: bool,
}

impl Reporter {
    pub fn for_rank(spec: &JobSpec, rank: u32) -> Self {
        Self {
            reports_progress: rank == spec.progress_rank(),
            quiet: false,
        }
    }

    /// A reporter that writes nothing.
    pub fn quiet() -> Self {
        Self {
            reports_progress: false,
            quiet: true,
        }
    }

    fn emit(&self, event: &RankEvent) {
        if self.quiet {
            return;
        }
        let line = event.to_line();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    pub fn log(&self, line: &str) {
        if self.quiet {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    pub fn progress(&self, p: &StepReport) {
        if !self.reports_progress {
            return;
        }
        // Full precision: runs are compared step by step from these lines.
        let eval = p
            .eval_loss
            .map_or(String::new(), |e| format!(" eval_loss={e}"));
        let norm = p
            .grad_norm
            .map_or(String::new(), |n| format!(" grad_norm={n}"));
        self.log(&format!(
            "step {}/{} loss={}{eval}{norm} lr={:.3e} samples/s={:.1}",
            p.step, p.total, p.loss, p.lr, p.samples_per_sec
        ));
        self.emit(&RankEvent::Progress {
            step: p.step,
            loss: p.loss,
            eval_loss: p.eval_loss,
            samples_per_sec: p.samples_per_sec,
            step_seconds: p.step_seconds,
            allreduce_gbps: p.allreduce_gbps,
            eval_metrics: p.eval_metrics,
        });
        if let Some(m) = p.eval_metrics {
            self.log(&format!("validation at step {}: {m}", p.step));
        }
    }

    /// The test-split evaluation at the end of training.
    pub fn test(&self, loss: f64, accuracy: Option<f64>, metrics: Option<ClassMetrics>) {
        if !self.reports_progress {
            return;
        }
        let accuracy_text = accuracy.map_or(String::new(), |a| {
            format!(", exact-match accuracy {:.1}%", a * 100.0)
        });
        match metrics {
            // A classifier's loss has no perplexity.
            Some(m) => self.log(&format!("test loss {loss:.6}, {m}")),
            None => self.log(&format!(
                "test loss {loss:.6}, perplexity {:.3}{accuracy_text}",
                loss.exp()
            )),
        }
        self.emit(&RankEvent::Test {
            loss,
            accuracy,
            metrics,
        });
    }

    pub fn checkpoint(
        &self,
        step: u64,
        url: &str,
        size_bytes: u64,
        deleted_steps: Vec<u64>,
        seconds: f64,
    ) {
        self.log(&format!(
            "checkpoint committed at step {step}: {url} ({size_bytes} bytes)"
        ));
        self.emit(&RankEvent::Checkpoint {
            step,
            url: url.to_string(),
            size_bytes,
            deleted_steps,
            seconds,
        });
    }
}
