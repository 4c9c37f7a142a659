//! Mixed precision: the bf16 or fp16 compute copy of a model, and dynamic loss scaling for fp16.
//!
//! bf16 (`train.precision = "bf16"`): each step runs its forward and backward passes on a copy of
//! the model whose parameters are cast to bf16, as new leaves with the master parameters' ids.
//! Their gradients are flattened into the step's f32 buffer like any others, so the all-reduce,
//! clipping and the Adam update run on the f32 master weights and f32 optimizer state. burn has
//! no autocast; the models cast their own inputs to their parameters' precision and compute the
//! loss in f32.
//!
//! fp16 (`train.precision = "fp16"`): the same compute copy in fp16, with dynamic loss scaling
//! as PyTorch's `GradScaler` (`train.loss_scaling`):
//!
//! fp16 has five exponent bits: small gradients underflow to zero unless the loss is multiplied by
//! a large factor before the backward pass (and the gradients divided by it after). Too large a
//! factor overflows instead. The scaler starts high, halves the factor and skips the step whenever
//! a gradient is not finite, and doubles it again after a run of clean steps. bf16 has f32's
//! exponent range and needs none of this.
//!
//! Every rank must take the same decision, or the replicas' weights part: the verdict is taken
//! from the global gradient norm, which is all-reduced over the whole world before clipping, so
//! one rank's overflow is every rank's.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;
use gantry_checkpoint::LossScale;
use gantry_core::JobSpec;
use gantry_core::spec::Precision;

/// Casts every float parameter to a precision, as a fresh leaf with the same parameter id.
struct CastTo(FloatDType);

impl ModuleMapper for CastTo {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.cast(self.0).detach().require_grad())
    }
}

/// The copy of `model` a step's forward and backward passes run on, when `precision` computes
/// in something other than f32; `None` for f32 (the model itself is used).
pub fn compute_copy<M: Module + Clone>(model: &M, precision: Precision) -> Option<M> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(model.clone().map(&mut CastTo(FloatDType::BF16))),
        Precision::Fp16 => Some(model.clone().map(&mut CastTo(FloatDType::F16))),
    }
}

/// What the scaler decided for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The gradients are finite: unscale them and step the optimizer.
    Apply,
    /// A gradient overflowed: leave weights and optimizer state as they are.
    Skip,
}

/// The loss scale and its history.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    scale: f64,
    /// Clean steps needed before the scale doubles.
    growth_interval: u32,
    clean: u32,
    skipped: u64,
}

/// The scale never falls below this: a model whose gradients overflow even unscaled is broken,
/// and halving forever would hide it behind skipped steps.
pub const MIN_SCALE: f64 = 1.0;

impl LossScaler {
    /// The scaler of an fp16 job (`train.loss_scaling`); `None` for the other precisions.
    pub fn for_spec(spec: &JobSpec) -> Option<Self> {
        let t = &spec.train;
        (t.precision == Precision::Fp16)
            .then(|| Self::new(t.loss_scaling.initial, t.loss_scaling.growth_interval))
    }

    /// What a checkpoint keeps of it.
    pub fn state(&self) -> LossScale {
        LossScale {
            scale: self.scale,
            clean_steps: self.clean,
            skipped_steps: self.skipped,
        }
    }

    /// Goes on from a checkpoint's state.
    pub fn restore(&mut self, state: LossScale) {
        self.scale = state.scale;
        self.clean = state.clean_steps;
        self.skipped = state.skipped_steps;
    }

    pub fn new(scale: f64, growth_interval: u32) -> Self {
        Self {
            scale,
            growth_interval: growth_interval.max(1),
            clean: 0,
            skipped: 0,
        }
    }

    /// The factor the loss is multiplied by before the backward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped so far because a gradient overflowed.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Takes the step's global gradient norm (of the scaled gradients) and decides: a
    /// non-finite norm halves the scale and skips the step; `growth_interval` clean steps in a
    /// row double it.
    pub fn update(&mut self, scaled_grad_norm: f64) -> Verdict {
        if !scaled_grad_norm.is_finite() {
            self.scale = (self.scale / 2.0).max(MIN_SCALE);
            self.clean = 0;
            self.skipped += 1;
            return Verdict::Skip;
        }
        self.clean += 1;
        if self.clean == self.growth_interval {
            self.scale *= 2.0;
            self.clean = 0;
        }
        Verdict::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Split};
    use crate::gradients::accumulate_gradients;
    use crate::model::{Gpt, Mlp, TrainModel};
    use burn::optim::AdamConfig;
    use gantry_core::JobSpec;

    fn spec(kind: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"p","model":{{"kind":"{kind}","layers":2,"d_model":32,"heads":2}},
                "train":{{"steps":40,"global_batch":16,"lr":0.01}}}}"#
        ))
        .unwrap()
    }

    fn flat_grads<M: TrainModel + Module>(
        model: &M,
        spec: &JobSpec,
        device: &Device,
    ) -> (f32, Vec<f32>) {
        let data = Dataset::for_spec(spec);
        let batch = data.batch(Split::Train, &data.global_batch_indices(0, 16));
        let loss = model.loss(&batch, device);
        let value = loss.clone().into_scalar::<f32>();
        let mut flat = Vec::new();
        accumulate_gradients(loss.backward(), model, &mut flat);
        (value, flat)
    }

    /// bf16 or fp16 against f32 from the same weights: the loss within the half precision's
    /// rounding, the gradient pointing the same way; then half-precision gradients applied to
    /// f32 master weights train. (The step's loss scaling is tested through the step loop, in
    /// the system tests; at these sizes fp16 gradients neither overflow nor vanish unscaled.)
    fn half_matches_f32_and_trains<M: TrainModel + Module + Clone>(kind: &str, half: Precision) {
        let spec = spec(kind);
        let device = Device::flex().autodiff();
        let master = M::init(&spec, &device);
        let (loss32, grads32) = flat_grads(&master, &spec, &device);
        let copy = compute_copy(&master, half).unwrap();
        let (loss16, grads16) = flat_grads(&copy, &spec, &device);
        assert!(
            (loss32 - loss16).abs() < 0.02 * loss32.abs().max(1.0),
            "{kind} {half:?}: {loss32} {loss16}"
        );
        assert_eq!(grads32.len(), grads16.len());
        assert_ne!(
            grads32, grads16,
            "{kind} {half:?}: the copy computed in f32"
        );
        let dot: f64 = grads32
            .iter()
            .zip(&grads16)
            .map(|(a, b)| f64::from(a * b))
            .sum();
        let norm = |g: &[f32]| g.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
        let cosine = dot / (norm(&grads32) * norm(&grads16));
        assert!(cosine > 0.99, "{kind} {half:?}: gradient cosine {cosine}");

        // Trained side by side from the same weights on the same batches, half follows f32.
        let trained = train(master.clone(), &spec, half, &device);
        let f32 = train(master, &spec, Precision::F32, &device);
        let tail = |l: &[f32]| l[l.len() - 5..].iter().sum::<f32>() / 5.0;
        let head = |l: &[f32]| l[..5].iter().sum::<f32>() / 5.0;
        assert!(
            tail(&trained) < 0.9 * head(&trained),
            "{kind} {half:?}: training did not lower the loss: {trained:?}"
        );
        // Within 5% of the loss the training started from: rounding, not a drift.
        assert!(
            (tail(&trained) - tail(&f32)).abs() < 0.05 * head(&f32),
            "{kind} {half:?}: {trained:?} drifted from f32 {f32:?}"
        );
    }

    /// The step loop's path: passes on the compute copy, its gradients in the f32 buffer, Adam on
    /// the master. Returns each step's loss.
    fn train<M: TrainModel + Module + Clone>(
        mut model: M,
        spec: &JobSpec,
        precision: Precision,
        device: &Device,
    ) -> Vec<f32> {
        let data = Dataset::for_spec(spec);
        let mut optimizer = AdamConfig::new().init();
        let mut losses = Vec::new();
        for step in 0..spec.train.steps {
            let copy = compute_copy(&model, precision);
            let compute = copy.as_ref().unwrap_or(&model);
            let batch = data.batch(Split::Train, &data.global_batch_indices(step, 16));
            let loss = compute.loss(&batch, device);
            losses.push(loss.clone().into_scalar::<f32>());
            let mut flat = Vec::new();
            accumulate_gradients(loss.backward(), compute, &mut flat);
            let grads =
                crate::gradients::unflatten(&model, &flat, &device.clone().without_autodiff());
            model = optimizer.step(0.01, model, grads);
        }
        losses
    }

    #[test]
    fn bf16_compute_with_f32_master_weights_trains_the_mlp_and_the_gpt() {
        let _rng = crate::rng_lock();
        half_matches_f32_and_trains::<Mlp>("mlp", Precision::Bf16);
        half_matches_f32_and_trains::<Gpt>("gpt", Precision::Bf16);
    }

    #[test]
    fn fp16_compute_with_f32_master_weights_trains_the_mlp_and_the_gpt() {
        let _rng = crate::rng_lock();
        half_matches_f32_and_trains::<Mlp>("mlp", Precision::Fp16);
        half_matches_f32_and_trains::<Gpt>("gpt", Precision::Fp16);
    }

    #[test]
    fn a_restored_scaler_goes_on_where_it_was() {
        let mut s = LossScaler::new(64.0, 2);
        s.update(f64::INFINITY);
        s.update(1.0);
        let mut resumed = LossScaler::new(64.0, 2);
        resumed.restore(s.state());
        assert_eq!(resumed, s);
        // One more clean step completes the run of two on both.
        assert_eq!(
            (s.update(1.0), resumed.update(1.0)),
            (Verdict::Apply, Verdict::Apply)
        );
        assert_eq!((s.scale(), resumed.scale()), (64.0, 64.0));
    }

    #[test]
    fn overflow_halves_the_scale_and_skips_the_step() {
        let mut s = LossScaler::new(1024.0, 3);
        assert_eq!(s.update(f64::INFINITY), Verdict::Skip);
        assert_eq!(s.update(f64::NAN), Verdict::Skip);
        assert_eq!((s.scale(), s.skipped()), (256.0, 2));
    }

    #[test]
    fn a_run_of_clean_steps_doubles_the_scale() {
        let mut s = LossScaler::new(8.0, 3);
        for _ in 0..2 {
            assert_eq!(s.update(1.5), Verdict::Apply);
        }
        assert_eq!(s.scale(), 8.0, "not yet: two clean steps of three");
        assert_eq!(s.update(1.5), Verdict::Apply);
        assert_eq!(s.scale(), 16.0);
        // An overflow resets the run: three more clean steps are needed after it.
        s.update(1.0);
        s.update(1.0);
        assert_eq!(s.update(f64::INFINITY), Verdict::Skip);
        assert_eq!(s.scale(), 8.0);
        s.update(1.0);
        s.update(1.0);
        assert_eq!(s.scale(), 8.0);
        s.update(1.0);
        assert_eq!((s.scale(), s.skipped()), (16.0, 1));
    }

    #[test]
    fn the_scale_stops_at_its_floor() {
        let mut s = LossScaler::new(2.0, 10);
        for _ in 0..5 {
            assert_eq!(s.update(f64::INFINITY), Verdict::Skip);
        }
        assert_eq!((s.scale(), s.skipped()), (MIN_SCALE, 5));
    }
}
