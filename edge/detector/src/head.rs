//! The detection part on top of the backbone: an FPN-style neck over the last three Swin
//! stages (strides 8, 16, 32) and an anchor-free, FCOS-style dense head whose class score is
//! trained as a localisation-quality score (GFL's quality focal loss), plus decoding to boxes.
//!
//! Why FCOS-class rather than CenterNet-class: steel defects range from a few-pixel pit to a
//! scratch across the whole strip, with extreme aspect ratios and heavily overlapping extents
//! (crazing, rolled-in scale). Per-level ltrb regression handles long thin boxes and nested
//! boxes directly; a single stride-4 centre heatmap merges overlapping centres and needs a
//! high-resolution map that costs most of an edge budget.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use super::int8::Int8Conv;

/// Size of the neck and head.
#[derive(Config, Debug, PartialEq)]
pub struct HeadConfig {
    /// Channels of every pyramid level and of the head towers. 64 keeps the head's cost under
    /// half the edge backbone's at 224 (`scripts/bench/detector`); 96 doubled it.
    #[config(default = 64)]
    pub dim: usize,
    /// 3x3 conv + GroupNorm + ReLU layers in each of the class and box towers.
    #[config(default = 2)]
    pub tower_convs: usize,
    #[config(default = 16)]
    pub norm_groups: usize,
    /// Prior probability of a defect at a location, sets the class bias at init (FCOS, RetinaNet).
    #[config(default = 0.01)]
    pub prior_prob: f64,
    /// Widths left by structured pruning (`trainer compress --head-keep`); none: every layer is
    /// `dim` wide. Else `[pyramid, neck, tower layer 1, .., tower layer n]`: the laterals' outputs
    /// (the top-down sums), the smoothing convolutions' outputs (the towers' input) and each
    /// tower layer's output (class and box towers alike). Tower widths are whole GroupNorm
    /// groups of `dim / norm_groups` channels: pruning keeps or drops a group, so a kept group
    /// normalises exactly as before.
    /// (An `Option` so that models saved before head pruning existed, without the field, load.)
    pub widths: Option<Vec<usize>>,
}

impl HeadConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.norm_groups == 0 || !self.dim.is_multiple_of(self.norm_groups) {
            return Err(format!(
                "head: `dim` {} must be a positive multiple of `norm_groups` {}",
                self.dim, self.norm_groups
            ));
        }
        if let Some(widths) = &self.widths {
            let group = self.group_size();
            let towers = widths.get(2..).unwrap_or_default();
            if widths.len() != 2 + self.tower_convs
                || widths.contains(&0)
                || towers.iter().any(|w| !w.is_multiple_of(group))
            {
                return Err(format!(
                    "head: `widths` {:?} must be [pyramid, neck] and {} tower widths, all \
                     positive, the tower widths multiples of the group size {group}",
                    widths, self.tower_convs
                ));
            }
        }
        Ok(())
    }

    fn width(&self, i: usize) -> usize {
        self.widths
            .as_ref()
            .and_then(|w| w.get(i).copied())
            .unwrap_or(self.dim)
    }

    /// Channels in one GroupNorm group of the towers.
    pub fn group_size(&self) -> usize {
        self.dim / self.norm_groups
    }

    /// Output channels of the laterals (the pyramid levels).
    pub fn pyramid_dim(&self) -> usize {
        self.width(0)
    }

    /// Output channels of the smoothing convolutions (the towers' input).
    pub fn neck_dim(&self) -> usize {
        self.width(1)
    }

    /// Output channels of tower layer `i`.
    pub fn tower_dim(&self, i: usize) -> usize {
        self.width(2 + i)
    }

    /// Input channels of tower layer `i` (`i == tower_convs`: of the output convolutions).
    pub fn tower_input_dim(&self, i: usize) -> usize {
        if i == 0 {
            self.neck_dim()
        } else {
            self.tower_dim(i - 1)
        }
    }

    /// Multiply-adds per output location of a level whose backbone stage has `c_in` channels.
    pub fn macs_per_position(&self, c_in: usize, num_classes: usize) -> usize {
        let k = 9; // 3x3
        let (p, n) = (self.pyramid_dim(), self.neck_dim());
        let towers: usize = (0..self.tower_convs)
            .map(|i| self.tower_input_dim(i) * self.tower_dim(i) * k)
            .sum();
        c_in * p
            + p * n * k
            + 2 * towers
            + self.tower_input_dim(self.tower_convs) * (num_classes + 4) * k
    }

    /// `in_dims`: channels of the backbone stages used, finest first.
    pub fn init(&self, in_dims: &[usize], num_classes: usize, device: &Device) -> DetectionHead {
        let conv = |cin: usize, cout: usize, k: usize| {
            Conv2dConfig::new([cin, cout], [k, k])
                .with_padding(if k == 3 {
                    PaddingConfig2d::Explicit(1, 1, 1, 1)
                } else {
                    PaddingConfig2d::Valid
                })
                .init(device)
        };
        let tower = || {
            (0..self.tower_convs)
                .map(|i| {
                    let width = self.tower_dim(i);
                    TowerLayer {
                        conv: conv(self.tower_input_dim(i), width, 3),
                        norm: GroupNormConfig::new(width / self.group_size(), width).init(device),
                    }
                })
                .collect::<Vec<_>>()
        };
        let last = self.tower_input_dim(self.tower_convs);
        let mut cls_out = conv(last, num_classes, 3);
        let prior_bias = -((1.0 - self.prior_prob) / self.prior_prob).ln();
        cls_out.bias = cls_out
            .bias
            .map(|b| b.map(|b| super::swin::trainable(Tensor::full(b.dims(), prior_bias, device))));
        DetectionHead {
            lateral: in_dims
                .iter()
                .map(|&c| conv(c, self.pyramid_dim(), 1))
                .collect(),
            smooth: in_dims
                .iter()
                .map(|_| conv(self.pyramid_dim(), self.neck_dim(), 3))
                .collect(),
            cls_tower: tower(),
            reg_tower: tower(),
            cls_out,
            reg_out: conv(last, 4, 3),
            scales: in_dims
                .iter()
                .map(|_| Param::from_tensor(Tensor::ones([1], device)))
                .collect(),
            int8: HashMap::new(),
        }
    }
}

#[derive(Module, Debug)]
pub struct TowerLayer {
    pub conv: Conv2d,
    pub norm: GroupNorm,
}

#[derive(Module, Debug)]
pub struct DetectionHead {
    /// 1x1 convs bringing each stage to the pyramid width.
    pub lateral: Vec<Conv2d>,
    /// 3x3 convs after the top-down sum.
    pub smooth: Vec<Conv2d>,
    pub cls_tower: Vec<TowerLayer>,
    pub reg_tower: Vec<TowerLayer>,
    pub cls_out: Conv2d,
    pub reg_out: Conv2d,
    /// One learnable scale per level on the box distances (FCOS).
    pub scales: Vec<Param<Tensor<1>>>,
    /// Convolutions that compute in INT8 (a quantized model on the CPU), by name.
    #[module(skip)]
    int8: HashMap<String, Arc<Int8Conv>>,
}

/// Raw head outputs for a batch, every level flattened and concatenated, finest first.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// `[batch, locations, classes]` logits.
    pub cls_logits: Tensor<3>,
    /// `[batch, locations, 4]` distances (left, top, right, bottom) in input pixels, > 0.
    pub box_ltrb: Tensor<3>,
    /// Feature map size of each level, finest first.
    pub level_sizes: Vec<[usize; 2]>,
}

impl DetectionHead {
    /// A convolution, in INT8 where [`DetectionHead::use_int8`] prepared it and the input is
    /// one the kernel takes, else burn's float convolution.
    fn conv(&self, name: &str, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        match self.int8.get(name) {
            Some(q) if q.applies(&x) => q.forward(x),
            _ => conv.forward(x),
        }
    }

    /// Runs the convolutions that `quantized` names (by their weight's tensor name inside the
    /// head, e.g. `cls_tower.0.conv.weight`) with the INT8 kernel on CPUs that have it; returns
    /// how many will. Call it after the weights are loaded.
    pub fn use_int8(&mut self, quantized: &dyn Fn(&str) -> bool) -> usize {
        let mut int8 = HashMap::new();
        if super::int8::Int8Linear::supported() {
            let mut convs: Vec<(String, &Conv2d)> = vec![];
            // The 1x1 laterals stay in float: they read the backbone's NHWC stages, and the
            // layout change to and from the kernel costs more than their multiply (bench
            // int8_gemm); the 3x3 convolutions are where the head's time is.
            for (i, c) in self.smooth.iter().enumerate() {
                convs.push((format!("smooth.{i}"), c));
            }
            for (i, t) in self.cls_tower.iter().enumerate() {
                convs.push((format!("cls_tower.{i}.conv"), &t.conv));
            }
            for (i, t) in self.reg_tower.iter().enumerate() {
                convs.push((format!("reg_tower.{i}.conv"), &t.conv));
            }
            convs.push(("cls_out".into(), &self.cls_out));
            convs.push(("reg_out".into(), &self.reg_out));
            for (name, conv) in convs {
                if quantized(&format!("{name}.weight"))
                    && let Some(q) = Int8Conv::from_conv(conv)
                {
                    int8.insert(name, Arc::new(q));
                }
            }
        }
        self.int8 = int8;
        self.int8.len()
    }

    /// `stages`: backbone stage outputs `[B, H, W, C]` used by the neck, finest first.
    pub fn forward(&self, stages: Vec<Tensor<4>>, strides: &[usize]) -> HeadOutput {
        // Neck: lateral 1x1, then top-down nearest upsample and add, then 3x3 smoothing.
        let laterals: Vec<Tensor<4>> = stages
            .into_iter()
            .zip(&self.lateral)
            .map(|(x, conv)| conv.forward(x.permute([0, 3, 1, 2]))) // [B, D, H, W]
            .collect();
        let mut pyramid: Vec<Tensor<4>> = Vec::with_capacity(laterals.len());
        let mut above: Option<Tensor<4>> = None;
        for lateral in laterals.into_iter().rev() {
            let [_, _, h, w] = lateral.dims();
            let merged = match above {
                Some(coarse) => {
                    let options = InterpolateOptions {
                        mode: InterpolateMode::Nearest,
                        align_corners: false,
                        output_size: Some([h, w]),
                        scale_factor: None,
                    };
                    lateral + interpolate(coarse, options)
                }
                None => lateral,
            };
            above = Some(merged.clone());
            pyramid.push(merged);
        }
        pyramid.reverse();

        let mut cls_levels = Vec::with_capacity(pyramid.len());
        let mut box_levels = Vec::with_capacity(pyramid.len());
        let mut level_sizes = Vec::with_capacity(pyramid.len());
        for (level, feature) in pyramid.into_iter().enumerate() {
            let feature = self.conv(&format!("smooth.{level}"), &self.smooth[level], feature);
            let [b, _, h, w] = feature.dims();
            level_sizes.push([h, w]);
            let mut c = feature.clone();
            for (i, layer) in self.cls_tower.iter().enumerate() {
                let name = format!("cls_tower.{i}.conv");
                c = relu(layer.norm.forward(self.conv(&name, &layer.conv, c)));
            }
            let mut r = feature;
            for (i, layer) in self.reg_tower.iter().enumerate() {
                let name = format!("reg_tower.{i}.conv");
                r = relu(layer.norm.forward(self.conv(&name, &layer.conv, r)));
            }
            let cls = self.conv("cls_out", &self.cls_out, c); // [B, K, H, W]
            let k = cls.dims()[1];
            let reg = self.conv("reg_out", &self.reg_out, r); // [B, 4, H, W]
            // Distances are exp(s * x) strides: positive from the first step, so every
            // predicted box has an area and GIoU has a gradient (a ReLU here starts half the
            // boxes at zero size, where IoU-quality targets and GIoU both go flat).
            let scale = self.scales[level].val().reshape([1, 1, 1, 1]);
            let reg = (reg * scale).clamp(-6.0, 6.0).exp() * (strides[level] as f64);
            cls_levels.push(cls.permute([0, 2, 3, 1]).reshape([b, h * w, k]));
            box_levels.push(reg.permute([0, 2, 3, 1]).reshape([b, h * w, 4]));
        }
        HeadOutput {
            cls_logits: Tensor::cat(cls_levels, 1),
            box_ltrb: Tensor::cat(box_levels, 1),
            level_sizes,
        }
    }
}

/// Centres of the head's locations in input pixels, `(x, y, stride)` per location, in the
/// order of [`HeadOutput`] (levels finest first, rows, then columns).
pub fn location_centres(level_sizes: &[[usize; 2]], strides: &[usize]) -> Vec<(f32, f32, f32)> {
    let mut points = Vec::new();
    for (&[h, w], &s) in level_sizes.iter().zip(strides) {
        let s = s as f32;
        for i in 0..h {
            for j in 0..w {
                points.push((j as f32 * s + s / 2.0, i as f32 * s + s / 2.0, s));
            }
        }
    }
    points
}

/// A box found by the detector, in the pixel coordinates of the image given to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub class_id: usize,
    pub score: f32,
}

impl Detection {
    pub fn area(&self) -> f32 {
        (self.x2 - self.x1).max(0.0) * (self.y2 - self.y1).max(0.0)
    }
}
