//! Mixed-precision training: the forward and backward passes compute in bf16 while the weights,
//! the optimizer's moments and the checkpoints stay f32 (the "master weights" of mixed
//! precision), and the loss is computed in f32.
//!
//! Each step casts the f32 model to bf16 with a cast that autodiff records, so the backward pass
//! runs in bf16 and each gradient is cast back to f32 on its way to the f32 parameter the
//! optimizer updates. bf16 keeps f32's exponent range, so gradients do not underflow and no loss
//! scaling is needed (f16 would need it, and is not offered). GPUs with bf16 arithmetic: NVIDIA
//! from Ampere on (Jetson Orin, A100, H100) through CUDA. Burn's CPU backend also computes in
//! bf16 (slower than f32 there: the CPU converts each value), which is how the tests check it.

use anyhow::{Result, bail};
use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// The dtype a training step computes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Forward and backward in bf16; weights, optimizer state, loss and checkpoints in f32.
    Bf16,
}

impl Precision {
    fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// Refuses a precision the device cannot compute in (bf16 on most Vulkan devices, whose
    /// bf16 is storage only).
    pub fn check(self, device: &Device) -> Result<()> {
        if self != Precision::F32 && !device.supports_dtype(self.dtype()) {
            bail!(
                "--precision {}: device {device:?} has no {:?} arithmetic; use --precision f32",
                self.name(),
                self.dtype()
            );
        }
        if self != Precision::F32 && *device == Device::flex() {
            tracing::warn!(
                "--precision {} on the CPU backend trains at about 0.6x the f32 rate (the CPU \
                 converts every value); it pays on GPUs",
                self.name()
            );
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The copy of `model` a step computes with: `model` itself in f32, otherwise its float
    /// parameters cast (differentiably) to the compute dtype.
    pub fn compute_copy<M: Module>(self, model: &M) -> M {
        match self {
            Precision::F32 => model.clone(),
            _ => model.clone().map(&mut CastParams(self.dtype())),
        }
    }

    /// A batch in the compute dtype.
    pub fn input<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        x.cast(self.dtype())
    }
}

/// Back to f32 for the loss (sums over many terms lose too much in bf16).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32)
}

struct CastParams(FloatDType);

impl ModuleMapper for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}
