//! An exponential moving average of a model's weights: a smoother model than the last step's,
//! evaluated beside the raw weights during training (and usable as a teacher).
//!
//! The average lives on the inner (non-autodiff) device and is updated after every optimizer
//! step: `avg = d * avg + (1 - d) * w`, with `d` ramped up from 0 over the first few thousand
//! updates (as YOLOX/timm do) so that the average does not remember the random start.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

/// The decay schedule of a weight average.
#[derive(Debug, Clone, Copy)]
pub struct WeightAverage {
    /// Decay once warmed up (e.g. 0.9995: a horizon of about 2,000 steps).
    pub decay: f64,
    /// Updates over which the decay ramps up (`d = decay * (1 - exp(-n / ramp))`).
    pub ramp: f64,
}

impl WeightAverage {
    pub fn new(decay: f64) -> Self {
        Self {
            decay,
            ramp: 2000.0,
        }
    }

    /// The decay applied at update number `updates` (counted from 1).
    pub fn decay_at(&self, updates: usize) -> f64 {
        self.decay * (1.0 - (-(updates as f64) / self.ramp).exp())
    }

    /// Moves `average` toward `model` (same architecture; `model` may live on an autodiff
    /// device): returns the new average.
    pub fn update<M: Module>(&self, average: M, model: &M, updates: usize) -> M {
        let mut weights = Collect::default();
        model.visit(&mut weights);
        let decay = self.decay_at(updates);
        let mut blend = Blend {
            weights: weights.tensors.into_iter(),
            decay,
        };
        average.map(&mut blend)
    }
}

/// Every float parameter, flattened, in visiting order, off the autodiff graph.
#[derive(Default)]
struct Collect {
    tensors: Vec<Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        self.tensors.push(value.reshape([n]));
    }
}

/// Blends each float parameter with the next collected weight (same visiting order).
struct Blend {
    weights: std::vec::IntoIter<Tensor<1>>,
    decay: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(weight) = self.weights.next() else {
            return param;
        };
        let decay = self.decay;
        param.map(|average| {
            let shape = average.shape();
            let weight = weight.to_device(&average.device()).reshape(shape);
            average.mul_scalar(decay) + weight.mul_scalar(1.0 - decay)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    #[test]
    fn the_average_moves_toward_the_model_by_one_minus_decay() {
        let device = Device::flex();
        device.seed(1);
        let model: Linear = LinearConfig::new(3, 2).init(&device);
        let average: Linear = LinearConfig::new(3, 2).init(&device);
        let schedule = WeightAverage {
            decay: 0.9,
            ramp: 1e-9,
        };
        let before = average.weight.val();
        let after = schedule.update(average, &model, 10);
        let expected = before.mul_scalar(0.9) + model.weight.val().mul_scalar(0.1);
        after
            .weight
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Default::default());
    }

    #[test]
    fn the_first_updates_follow_the_model_closely() {
        let schedule = WeightAverage::new(0.9995);
        assert!(schedule.decay_at(1) < 0.001);
        assert!(schedule.decay_at(20_000) > 0.999);
    }
}
