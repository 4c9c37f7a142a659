//! What a rank is asked to do: the job, its attempt, its place, and where its checkpoints go.

use gantry_core::{Attempt, JobId, JobSpec, Rank};

/// Everything a rank needs to train.
pub struct RankJob {
    pub job_id: JobId,
    pub attempt: Attempt,
    pub rank: Rank,
    pub spec: JobSpec,
    /// Resume from exactly this step instead of the newest verified checkpoint.
    pub resume_step: Option<u64>,
    /// The worker's checkpoint store options (the spec's own go over them).
    pub store_options: gantry_checkpoint::Options,
    /// SHA-256 of the manifest of the dataset it trains on (a `dataset:` source), as read when
    /// the rank started: its checkpoints keep it, and the data it loads must match it.
    pub dataset_sha256: Option<String>,
}

/// Linear warm-up to `lr`, then cosine decay to 10% of it at the last step.
pub fn learning_rate(spec: &JobSpec, step: u64) -> f64 {
    let t = &spec.train;
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let decay_steps = (t.steps - t.warmup_steps).max(1) as f64;
    let progress = ((step - t.warmup_steps) as f64 / decay_steps).min(1.0);
    let min_lr = 0.1 * t.lr;
    min_lr + 0.5 * (t.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let spec = JobSpec::from_json(
            r#"{"name":"t","model":{"kind":"mlp"},"train":{"steps":100,"global_batch":4,"lr":1.0,"warmup_steps":10}}"#,
        )
        .unwrap();
        assert!((learning_rate(&spec, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&spec, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&spec, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&spec, 100) - 0.1).abs() < 1e-12);
        let mid = learning_rate(&spec, 55);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
    }
}
