//! A rank's gradients as one flat buffer: flattened in the order a `ModuleVisitor` walks the
//! parameters (the same on every replica), so a step all-reduces one buffer in buckets;
//! accumulated over micro-batches; their squared norm for global-norm clipping; and turned back
//! into per-parameter gradients for the optimizer.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use std::collections::HashSet;

/// Adds each parameter's gradient into a flat buffer, in visiting order (the same on every replica).
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    out: &'a mut Vec<f32>,
    offset: usize,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.val().shape().num_elements();
        if self.out.len() < self.offset + n {
            self.out.resize(self.offset + n, 0.0);
        }
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let values = grad.into_data().convert::<f32>();
            let values = values.as_slice::<f32>().expect("f32 gradients");
            for (dst, src) in self.out[self.offset..self.offset + n]
                .iter_mut()
                .zip(values)
            {
                *dst += src;
            }
        }
        self.offset += n;
    }
}

/// Rebuilds per-parameter gradients from the flat, averaged buffer (of the parameters `keep`
/// accepts).
struct Unflatten<'a> {
    flat: &'a [f32],
    offset: usize,
    device: Device,
    grads: GradientsParams,
    keep: &'a dyn Fn(ParamId) -> bool,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        let range = self.offset..self.offset + n;
        self.offset += n;
        if !(self.keep)(param.id) {
            return;
        }
        let values = self.flat[range].to_vec();
        let grad = Tensor::<D>::from_data(TensorData::new(values, shape), &self.device);
        self.grads.register(param.id, grad);
    }
}

/// The squared norm of this rank's gradients in `flat` (in visiting order): of the parameters in
/// `sharded`, and of the others (replicated over the tp group) only with `count_replicated`.
pub fn squared_norm<M: Module>(
    model: &M,
    flat: &[f32],
    sharded: &HashSet<ParamId>,
    count_replicated: bool,
) -> f32 {
    struct Norm<'a> {
        flat: &'a [f32],
        sharded: &'a HashSet<ParamId>,
        count_replicated: bool,
        offset: usize,
        sum: f64,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().shape().num_elements();
            if self.count_replicated || self.sharded.contains(&param.id) {
                self.sum += self.flat[self.offset..self.offset + n]
                    .iter()
                    .map(|g| f64::from(*g) * f64::from(*g))
                    .sum::<f64>();
            }
            self.offset += n;
        }
    }
    let mut norm = Norm {
        flat,
        sharded,
        count_replicated,
        offset: 0,
        sum: 0.0,
    };
    model.visit(&mut norm);
    norm.sum as f32
}

/// Adds the gradients of one backward pass into `flat`, parameter by parameter in visiting order.
pub fn accumulate_gradients<M: Module>(
    grads: burn::tensor::Gradients,
    model: &M,
    flat: &mut Vec<f32>,
) {
    let mut grads = GradientsParams::from_grads(grads, model);
    model.visit(&mut Flatten {
        grads: &mut grads,
        out: flat,
        offset: 0,
    });
}

/// The per-parameter gradients of `model` held in `flat` (in visiting order), on `device`.
pub fn unflatten<M: Module>(model: &M, flat: &[f32], device: &Device) -> GradientsParams {
    unflatten_where(model, flat, device, &|_| true)
}

/// [`unflatten`] of the parameters `keep` accepts only (the others get no gradient, so the
/// optimizer leaves them alone).
pub fn unflatten_where<M: Module>(
    model: &M,
    flat: &[f32],
    device: &Device,
    keep: &dyn Fn(ParamId) -> bool,
) -> GradientsParams {
    let mut unflatten = Unflatten {
        flat,
        offset: 0,
        device: device.clone(),
        grads: GradientsParams::new(),
        keep,
    };
    model.visit(&mut unflatten);
    unflatten.grads
}

/// Where the parameters `ids` sit in the flat buffer (visiting order).
pub fn ranges_of<M: Module>(model: &M, ids: &HashSet<ParamId>) -> Vec<std::ops::Range<usize>> {
    struct Find<'a> {
        ids: &'a HashSet<ParamId>,
        offset: usize,
        found: Vec<std::ops::Range<usize>>,
    }
    impl ModuleVisitor for Find<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().shape().num_elements();
            if self.ids.contains(&param.id) {
                self.found.push(self.offset..self.offset + n);
            }
            self.offset += n;
        }
    }
    let mut find = Find {
        ids,
        offset: 0,
        found: Vec::new(),
    };
    model.visit(&mut find);
    find.found
}
