//! Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler` does it.
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

/// PyTorch's defaults: 2^16, doubled after 2000 clean steps, halved on overflow.
pub const INITIAL_SCALE: f64 = 65536.0;
pub const GROWTH_INTERVAL: u32 = 2000;
/// The scale never falls below this: a model whose gradients overflow even unscaled is broken,
/// and halving forever would hide it behind skipped steps.
pub const MIN_SCALE: f64 = 1.0;

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(INITIAL_SCALE, GROWTH_INTERVAL)
    }
}

impl LossScaler {
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
