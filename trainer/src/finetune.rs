//! Fine-tuning's parameter groups: which of a rank's parameters are frozen (the embeddings, the
//! first N layers) and which form the task head that may have a learning rate of its own. A
//! frozen parameter's gradient is dropped after the all-reduce (it counts in neither the norm
//! nor the update, and the optimizer keeps no state for it), as PyTorch's `requires_grad =
//! False` would have it.

use crate::layout::whole_name;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use gantry_core::{Coords, JobSpec, Mesh, Task};
use std::collections::HashSet;
use std::ops::Range;

#[derive(Debug, Default)]
pub struct ParamGroups {
    /// Parameters that keep their values.
    pub frozen: HashSet<ParamId>,
    /// Where the frozen parameters' gradients sit in the flat buffer (visiting order).
    pub frozen_ranges: Vec<Range<usize>>,
    /// The task head's parameters, when it has a learning rate of its own.
    pub head: HashSet<ParamId>,
}

impl ParamGroups {
    /// The groups of rank `at`'s part of the model, by whole-model name.
    pub fn of<M: Module>(model: &M, spec: &JobSpec, mesh: Mesh, at: Coords) -> Self {
        struct Walk<'a> {
            spec: &'a JobSpec,
            mesh: Mesh,
            at: Coords,
            path: Vec<String>,
            offset: usize,
            groups: ParamGroups,
        }
        impl ModuleVisitor for Walk<'_> {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let n = param.val().shape().num_elements();
                let (name, _) = whole_name(self.spec, self.mesh, self.at, &self.path.join("."));
                let t = &self.spec.train;
                let layer = name
                    .strip_prefix("layers.")
                    .and_then(|rest| rest.split_once('.'))
                    .and_then(|(i, _)| i.parse::<u32>().ok());
                let frozen = (t.freeze_embeddings && name.starts_with("embeddings."))
                    || layer.is_some_and(|l| l < t.freeze_layers);
                if frozen {
                    self.groups.frozen.insert(param.id);
                    self.groups.frozen_ranges.push(self.offset..self.offset + n);
                }
                if t.head_lr.is_some()
                    && self.spec.task() == Task::Classification
                    && crate::bert::Bert::is_head(&name)
                {
                    self.groups.head.insert(param.id);
                }
                self.offset += n;
            }
        }
        let mut walk = Walk {
            spec,
            mesh,
            at,
            path: Vec::new(),
            offset: 0,
            groups: ParamGroups::default(),
        };
        model.visit(&mut walk);
        walk.groups
    }

    /// Zeroes the frozen parameters' gradients in the flat buffer.
    pub fn drop_frozen(&self, flat: &mut [f32]) {
        for range in &self.frozen_ranges {
            flat[range.clone()].fill(0.0);
        }
    }
}
