//! Swin Transformer backbone: a port of timm 1.0.x `SwinTransformer` (NHWC layout, same
//! One model, one file (as candle-transformers keeps them): config, window helpers, attention,
//! blocks and stages read top to bottom beside timm's `swin_transformer.py`.
//!
//! Windows and shifts are fixed when the network is built, from `SwinConfig::img_size`, with
//! timm's rule: a stage whose resolution is not larger than the window uses the whole stage as
//! one window and does not shift. Any other input size is padded up to whole windows at run
//! time, and the shift mask is computed for the padded grid, as timm does with a dynamic mask.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use burn::tensor::{Distribution, TensorCreationOptions};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::int8::{Int8Linear, Int8Weights};

/// Shape and size of a Swin backbone. Named constructors copy the reference configurations.
#[derive(Config, Debug, PartialEq)]
pub struct SwinConfig {
    /// Input size the windows and shifts are planned for (height, width).
    #[config(default = "[224, 224]")]
    pub img_size: [usize; 2],
    #[config(default = 4)]
    pub patch_size: usize,
    #[config(default = 3)]
    pub in_chans: usize,
    #[config(default = 96)]
    pub embed_dim: usize,
    #[config(default = "vec![2, 2, 6, 2]")]
    pub depths: Vec<usize>,
    #[config(default = "vec![3, 6, 12, 24]")]
    pub num_heads: Vec<usize>,
    #[config(default = 7)]
    pub window_size: usize,
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Stochastic depth rate at the last block (linearly increasing from 0), training only.
    #[config(default = 0.0)]
    pub drop_path_rate: f64,
    /// Hidden width of each block's MLP, outer index stage, inner block. Empty means
    /// `embed_dim * 2^stage * mlp_ratio` everywhere; channel pruning writes explicit widths.
    #[config(default = "Vec::new()")]
    pub mlp_hidden: Vec<Vec<usize>>,
    /// Attention heads each block keeps, outer index stage, inner block, after head pruning
    /// (absent: `num_heads` everywhere). A head keeps its width (`head_dim`), so a block with
    /// fewer heads has a narrower qkv projection, proj input and bias table.
    pub attn_heads: Option<Vec<Vec<usize>>>,
}

/// How the attention of one window is computed; all compute the same function.
/// `Kernel` (default) uses our fused window-attention kernel (`kernels::window_attention`) on
/// the Flex CPU backend at inference and `Fused` elsewhere; `Fused` calls burn's `attention`
/// op (one kernel on backends that have one); `Explicit` spells out matmul + softmax, as
/// timm's non-fused path does. The benchmark compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AttentionImpl {
    #[default]
    Kernel,
    Fused,
    Explicit,
}

impl SwinConfig {
    /// timm `swin_tiny_patch4_window7_224`: embed 96, depths 2-2-6-2, heads 3-6-12-24.
    pub fn tiny() -> Self {
        Self::new()
    }

    /// The edge size: embed 48, depths 2-2-2-2, heads 2-4-8-16 (head dim 24 everywhere).
    /// About 7 M parameters (tiny has 28 M) and 4x fewer FLOPs per image than tiny.
    pub fn edge() -> Self {
        Self::new()
            .with_embed_dim(48)
            .with_depths(vec![2, 2, 2, 2])
            .with_num_heads(vec![2, 4, 8, 16])
    }

    /// The smallest Swin that still has every stage (embed 16, one block each, heads 1-2-2-4):
    /// for tests and smoke runs, not for accuracy.
    pub fn nano() -> Self {
        Self::new()
            .with_embed_dim(16)
            .with_depths(vec![1, 1, 1, 1])
            .with_num_heads(vec![1, 2, 2, 4])
    }

    /// Channels of each stage's output.
    pub fn stage_dims(&self) -> Vec<usize> {
        (0..self.depths.len())
            .map(|i| self.embed_dim << i)
            .collect()
    }

    /// Stride of each stage's output relative to the input image.
    pub fn stage_strides(&self) -> Vec<usize> {
        (0..self.depths.len())
            .map(|i| self.patch_size << i)
            .collect()
    }

    /// Hidden width of one block's MLP (explicit after pruning, `mlp_ratio` otherwise).
    pub fn mlp_hidden_of(&self, stage: usize, block: usize) -> usize {
        self.mlp_hidden
            .get(stage)
            .and_then(|widths| widths.get(block).copied())
            .unwrap_or(((self.embed_dim << stage) as f64 * self.mlp_ratio) as usize)
    }

    /// Attention heads of one block (fewer than `num_heads` after head pruning).
    pub fn heads_of(&self, stage: usize, block: usize) -> usize {
        self.attn_heads
            .as_ref()
            .and_then(|heads| heads.get(stage))
            .and_then(|heads| heads.get(block).copied())
            .unwrap_or(self.num_heads[stage])
    }

    /// Width of one attention head in a stage (pruning removes heads, never narrows them).
    pub fn head_dim(&self, stage: usize) -> usize {
        (self.embed_dim << stage) / self.num_heads[stage]
    }

    /// Multiply-accumulates of one forward pass at `img_size` (convolutions, linears and the
    /// two attention matmuls; norms, softmax and GELU are not counted).
    pub fn macs(&self) -> u64 {
        let mut res = [
            self.img_size[0].div_ceil(self.patch_size),
            self.img_size[1].div_ceil(self.patch_size),
        ];
        let mut n = res[0] * res[1];
        let mut macs = n * self.embed_dim * self.in_chans * self.patch_size * self.patch_size;
        for (stage, &depth) in self.depths.iter().enumerate() {
            let c = self.embed_dim << stage;
            if stage > 0 {
                res = [res[0].div_ceil(2), res[1].div_ceil(2)];
                n = res[0] * res[1];
                macs += n * (4 * c / 2) * c;
            }
            let window = res[0].min(self.window_size) * res[1].min(self.window_size);
            for block in 0..depth {
                let hidden = self.mlp_hidden_of(stage, block);
                let inner = self.heads_of(stage, block) * self.head_dim(stage);
                macs += n * c * 3 * inner + n * inner * c + 2 * n * window * inner;
                macs += 2 * n * c * hidden;
            }
        }
        macs as u64
    }

    /// Checks the numbers before anything is allocated, so a bad config is an error, not a panic.
    pub fn validate(&self) -> Result<(), String> {
        if self.depths.is_empty() {
            return Err("swin: `depths` is empty".into());
        }
        if self.depths.len() != self.num_heads.len() {
            return Err(format!(
                "swin: {} stages in `depths` but {} in `num_heads`",
                self.depths.len(),
                self.num_heads.len()
            ));
        }
        if self.patch_size == 0 || self.window_size == 0 || self.embed_dim == 0 {
            return Err("swin: `patch_size`, `window_size` and `embed_dim` must be > 0".into());
        }
        for (i, &heads) in self.num_heads.iter().enumerate() {
            let dim = self.embed_dim << i;
            if heads == 0 || !dim.is_multiple_of(heads) {
                return Err(format!(
                    "swin: stage {i} has {dim} channels, not divisible by {heads} heads"
                ));
            }
        }
        if !self.mlp_hidden.is_empty() {
            if self.mlp_hidden.len() != self.depths.len() {
                return Err("swin: `mlp_hidden` must list every stage".into());
            }
            for (i, (widths, &depth)) in self.mlp_hidden.iter().zip(&self.depths).enumerate() {
                if widths.len() != depth || widths.contains(&0) {
                    return Err(format!(
                        "swin: `mlp_hidden[{i}]` must give {depth} widths, each > 0"
                    ));
                }
            }
        }
        if let Some(heads) = &self.attn_heads {
            if heads.len() != self.depths.len() {
                return Err("swin: `attn_heads` must list every stage".into());
            }
            for (i, (kept, &depth)) in heads.iter().zip(&self.depths).enumerate() {
                let full = self.num_heads[i];
                if kept.len() != depth || kept.iter().any(|&h| h == 0 || h > full) {
                    return Err(format!(
                        "swin: `attn_heads[{i}]` must give {depth} head counts, each 1 to {full}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Builds the network with timm's initialisation (truncated normal std 0.02 for Linear
    /// weights and the bias table, zero biases, unit norms).
    pub fn init(&self, device: &Device) -> SwinTransformer {
        let patch_embed = PatchEmbed {
            proj: Conv2dConfig::new(
                [self.in_chans, self.embed_dim],
                [self.patch_size, self.patch_size],
            )
            .with_stride([self.patch_size, self.patch_size])
            .init(device),
            norm: LayerNormConfig::new(self.embed_dim).init(device),
        };
        let total_blocks: usize = self.depths.iter().sum();
        let mut block_index = 0;
        let mut resolution = [
            self.img_size[0].div_ceil(self.patch_size),
            self.img_size[1].div_ceil(self.patch_size),
        ];
        let mut layers = Vec::with_capacity(self.depths.len());
        for (stage, &depth) in self.depths.iter().enumerate() {
            let dim = self.embed_dim << stage;
            let head_dim = self.head_dim(stage);
            let downsample = if stage > 0 {
                resolution = [resolution[0].div_ceil(2), resolution[1].div_ceil(2)];
                Some(PatchMerging {
                    norm: LayerNormConfig::new(2 * dim).init(device),
                    reduction: trunc_normal_linear(2 * dim, dim, false, device),
                    reduction_int8: None,
                })
            } else {
                None
            };
            // timm's `_calc_window_shift`: a stage no larger than the window is one window.
            let window = [
                resolution[0].min(self.window_size),
                resolution[1].min(self.window_size),
            ];
            let shift_target = self.window_size / 2;
            let blocks = (0..depth)
                .map(|j| {
                    let shift = if j % 2 == 1 {
                        [
                            if resolution[0] <= window[0] {
                                0
                            } else {
                                shift_target
                            },
                            if resolution[1] <= window[1] {
                                0
                            } else {
                                shift_target
                            },
                        ]
                    } else {
                        [0, 0]
                    };
                    let drop_path = if total_blocks > 1 {
                        self.drop_path_rate * block_index as f64 / (total_blocks - 1) as f64
                    } else {
                        0.0
                    };
                    block_index += 1;
                    let shape = BlockShape {
                        dim,
                        heads: self.heads_of(stage, j),
                        head_dim,
                        hidden: self.mlp_hidden_of(stage, j),
                    };
                    SwinBlock::new(shape, window, shift, drop_path, device)
                })
                .collect();
            layers.push(SwinStage { downsample, blocks });
        }
        let num_features = self.embed_dim << (self.depths.len() - 1);
        SwinTransformer {
            patch_embed,
            layers,
            norm: LayerNormConfig::new(num_features).init(device),
            patch_size: self.patch_size,
        }
    }
}

fn trunc_normal_linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    let mut linear = LinearConfig::new(d_in, d_out).with_bias(bias).init(device);
    // `Param::map` keeps the parameter but not its gradient flag: a tensor made inside the
    // closure must ask for gradients itself, or training never updates this layer.
    linear.weight = linear
        .weight
        .map(|w| trainable(trunc_normal(w.dims(), 0.02, device)));
    linear.bias = linear
        .bias
        .map(|b| b.map(|b| trainable(Tensor::zeros(b.dims(), device))));
    linear
}

/// A new parameter value that asks for gradients on an autodiff device (what `Param::from_tensor`
/// does, and `Param::map` does not).
pub(crate) fn trainable<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.device().is_autodiff() {
        t.require_grad()
    } else {
        t
    }
}

/// Normal(0, std) clipped to +-2 std, like timm's `trunc_normal_(std=.02)`.
fn trunc_normal<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device).clamp(-2.0 * std, 2.0 * std)
}

/// Stage outputs of the backbone, each `[batch, height, width, channels]`.
#[derive(Debug, Clone)]
pub struct SwinFeatures {
    /// One tensor per stage, before the final norm.
    pub stages: Vec<Tensor<4>>,
    /// The last stage after the final norm (timm's `forward_features`).
    pub last_normed: Tensor<4>,
}

#[derive(Module, Debug)]
pub struct SwinTransformer {
    pub patch_embed: PatchEmbed,
    pub layers: Vec<SwinStage>,
    pub norm: LayerNorm,
    patch_size: usize,
}

impl SwinTransformer {
    /// `images`: `[batch, channels, height, width]`, any size (padded up to the patch size).
    pub fn forward(&self, images: Tensor<4>) -> SwinFeatures {
        let [_, _, h, w] = images.dims();
        let pad_h = (self.patch_size - h % self.patch_size) % self.patch_size;
        let pad_w = (self.patch_size - w % self.patch_size) % self.patch_size;
        let images = if pad_h + pad_w > 0 {
            images.pad([(0, pad_h), (0, pad_w)], PadMode::Constant(0.0))
        } else {
            images
        };
        let mut x = self.patch_embed.forward(images); // [B, H/4, W/4, C]
        let mut stages = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            x = layer.forward(x);
            stages.push(x.clone());
        }
        let last_normed = self.norm.forward(x);
        SwinFeatures {
            stages,
            last_normed,
        }
    }
}

/// A Linear layer, through the INT8 kernel when the layer has INT8 weights and the input is
/// one the kernel takes (the Flex CPU backend without autodiff), else as burn's float Linear.
fn linear<const D: usize>(layer: &Linear, int8: &Int8Weights, x: Tensor<D>) -> Tensor<D> {
    match int8 {
        Some(q) if q.applies(&x) => q.forward(x),
        _ => layer.forward(x),
    }
}

/// INT8 weights for a Linear layer from its current float weights (which, loaded from an INT8
/// file, are q x scale: re-quantizing recovers q exactly).
fn int8_of(layer: &Linear) -> Int8Weights {
    let [k, n] = layer.weight.dims();
    let weights = layer.weight.val().into_data().try_to_vec::<f32>().ok()?;
    let bias = match &layer.bias {
        Some(b) => Some(b.val().into_data().try_to_vec::<f32>().ok()?),
        None => None,
    };
    Some(Arc::new(Int8Linear::quantize(
        &weights,
        k,
        n,
        bias.as_deref(),
    )))
}

impl SwinTransformer {
    /// Runs the Linear layers that `quantized` names (by their weight's tensor name inside the
    /// backbone, e.g. `layers.0.blocks.1.mlp.fc1.weight`) with the INT8 kernel on CPUs that have
    /// it. Returns how many layers will. Call it after the weights are loaded; training (an
    /// autodiff device) always runs the float layers.
    pub fn use_int8(&mut self, quantized: &dyn Fn(&str) -> bool) -> usize {
        if !Int8Linear::supported() {
            return 0;
        }
        // The patch embedding (3 input channels) stays in float: its im2col and layout change
        // cost what INT8 saves (`cargo bench --bench int8_gemm`).
        let mut count = 0;
        let mut attach = |name: String, layer: &Linear, slot: &mut Int8Weights| {
            *slot = if quantized(&format!("{name}.weight")) {
                int8_of(layer)
            } else {
                None
            };
            count += slot.is_some() as usize;
        };
        for (s, stage) in self.layers.iter_mut().enumerate() {
            if let Some(merge) = &mut stage.downsample {
                let name = format!("layers.{s}.downsample.reduction");
                attach(name, &merge.reduction, &mut merge.reduction_int8);
            }
            for (b, block) in stage.blocks.iter_mut().enumerate() {
                let prefix = format!("layers.{s}.blocks.{b}");
                let attn = &mut block.attn;
                attach(format!("{prefix}.attn.qkv"), &attn.qkv, &mut attn.qkv_int8);
                attach(
                    format!("{prefix}.attn.proj"),
                    &attn.proj,
                    &mut attn.proj_int8,
                );
                let mlp = &mut block.mlp;
                attach(format!("{prefix}.mlp.fc1"), &mlp.fc1, &mut mlp.fc1_int8);
                attach(format!("{prefix}.mlp.fc2"), &mlp.fc2, &mut mlp.fc2_int8);
            }
        }
        count
    }
}

#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
    pub norm: LayerNorm,
}

impl PatchEmbed {
    fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        let x = self.proj.forward(images); // [B, C, H/p, W/p]
        let x = x.permute([0, 2, 3, 1]); // [B, H/p, W/p, C]
        self.norm.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct PatchMerging {
    pub norm: LayerNorm,
    pub reduction: Linear,
    #[module(skip)]
    reduction_int8: Int8Weights,
}

impl PatchMerging {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c] = x.dims();
        let x = if h % 2 + w % 2 > 0 {
            x.pad([(0, h % 2), (0, w % 2), (0, 0)], PadMode::Constant(0.0))
        } else {
            x
        };
        let [_, h, w, _] = x.dims();
        // timm: reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        let x = x.reshape([b, h / 2, 2, w / 2, 2, c]);
        let x = x.permute([0, 1, 3, 4, 2, 5]);
        let x = x.reshape([b, h / 2, w / 2, 4 * c]);
        let x = self.norm.forward(x);
        linear(&self.reduction, &self.reduction_int8, x) // [B, H/2, W/2, 2C]
    }
}

#[derive(Module, Debug)]
pub struct SwinStage {
    pub downsample: Option<PatchMerging>,
    pub blocks: Vec<SwinBlock>,
}

impl SwinStage {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = match &self.downsample {
            Some(merge) => merge.forward(x),
            None => x,
        };
        for block in &self.blocks {
            x = block.forward(x);
        }
        x
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    fc1_int8: Int8Weights,
    #[module(skip)]
    fc2_int8: Int8Weights,
}

#[derive(Module, Debug)]
pub struct SwinBlock {
    pub norm1: LayerNorm,
    pub attn: WindowAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    window: [usize; 2],
    shift: [usize; 2],
    drop_path: f64,
}

/// Widths of one block: channels, attention heads and their width, MLP hidden channels.
struct BlockShape {
    dim: usize,
    heads: usize,
    head_dim: usize,
    hidden: usize,
}

impl SwinBlock {
    fn new(
        shape: BlockShape,
        window: [usize; 2],
        shift: [usize; 2],
        drop_path: f64,
        device: &Device,
    ) -> Self {
        let BlockShape {
            dim,
            heads,
            head_dim,
            hidden,
        } = shape;
        let inner = heads * head_dim;
        let table_len = (2 * window[0] - 1) * (2 * window[1] - 1);
        let table = trunc_normal([table_len, heads], 0.02, device);
        let index = relative_position_index(window);
        let n = index.len();
        Self {
            norm1: LayerNormConfig::new(dim).init(device),
            attn: WindowAttention {
                qkv: trunc_normal_linear(dim, 3 * inner, true, device),
                proj: trunc_normal_linear(inner, dim, true, device),
                relative_position_bias_table: burn::module::Param::from_tensor(table),
                relative_position_index: Tensor::from_data(
                    TensorData::new(index, [n]),
                    TensorCreationOptions::from(device),
                ),
                num_heads: heads,
                implementation: AttentionImpl::Kernel,
                qkv_int8: None,
                proj_int8: None,
            },
            norm2: LayerNormConfig::new(dim).init(device),
            mlp: Mlp {
                fc1: trunc_normal_linear(dim, hidden, true, device),
                fc2: trunc_normal_linear(hidden, dim, true, device),
                fc1_int8: None,
                fc2_int8: None,
            },
            window,
            shift,
            drop_path,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c] = x.dims();
        let shortcut = x.clone();
        let x = self.norm1.forward(x);
        let x = self.shifted_window_attention(x);
        let x = shortcut + self.stochastic_depth(x);
        let y = self.norm2.forward(x.clone());
        let y = linear(&self.mlp.fc1, &self.mlp.fc1_int8, y);
        let y = super::kernels::gelu(y);
        let y = linear(&self.mlp.fc2, &self.mlp.fc2_int8, y);
        let x = x + self.stochastic_depth(y);
        debug_assert_eq!(x.dims(), [b, h, w, c]);
        x
    }

    /// Drops the whole residual branch per sample with probability `drop_path`, in training
    /// (an autodiff device) only; timm's `DropPath` with `scale_by_keep`.
    fn stochastic_depth(&self, x: Tensor<4>) -> Tensor<4> {
        if self.drop_path <= 0.0 || !x.device().is_autodiff() {
            return x;
        }
        let keep = 1.0 - self.drop_path;
        let [b, _, _, _] = x.dims();
        let mask = Tensor::<4>::random([b, 1, 1, 1], Distribution::Bernoulli(keep), &x.device())
            .cast(x.dtype()); // bf16 under mixed precision
        x * (mask / keep)
    }

    fn shifted_window_attention(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c] = x.dims();
        let [wh, ww] = self.window;
        let [sh, sw] = self.shift;
        if super::kernels::window_copy_applies(&x) {
            // Inference on the CPU: roll, pad and partition in one copy, and back in one.
            let (hp, wp) = (h.div_ceil(wh) * wh, w.div_ceil(ww) * ww);
            let windows = super::kernels::windows_from_image(x, self.window, self.shift);
            let mask = (sh + sw > 0).then(|| {
                shift_mask([hp, wp], self.window, self.shift, &windows.device())
                    .cast(windows.dtype())
            });
            let attended = self.attn.forward(windows, b, mask);
            return super::kernels::image_from_windows(attended, self.window, self.shift, b, h, w);
        }
        let shifted = if sh + sw > 0 {
            x.roll(&[-(sh as i64), -(sw as i64)], &[1, 2])
        } else {
            x
        };
        let pad_h = (wh - h % wh) % wh;
        let pad_w = (ww - w % ww) % ww;
        let shifted = if pad_h + pad_w > 0 {
            shifted.pad([(0, pad_h), (0, pad_w), (0, 0)], PadMode::Constant(0.0))
        } else {
            shifted
        };
        let (hp, wp) = (h + pad_h, w + pad_w);
        let windows = window_partition(shifted, self.window); // [B*nW, N, C]
        let mask = (sh + sw > 0).then(|| {
            shift_mask([hp, wp], self.window, self.shift, &windows.device()).cast(windows.dtype())
        });
        let attended = self.attn.forward(windows, b, mask); // [B*nW, N, C]
        let merged = window_reverse(attended, self.window, b, hp, wp); // [B, Hp, Wp, C]
        let merged = if pad_h + pad_w > 0 {
            merged.slice([0..b, 0..h, 0..w, 0..c])
        } else {
            merged
        };
        if sh + sw > 0 {
            merged.roll(&[sh as i64, sw as i64], &[1, 2])
        } else {
            merged
        }
    }
}

/// `[B, Hp, Wp, C]` -> `[B * nW, wh * ww, C]`, windows in row-major order per image.
fn window_partition(x: Tensor<4>, window: [usize; 2]) -> Tensor<3> {
    let [b, h, w, c] = x.dims();
    let [wh, ww] = window;
    let x = x.reshape([b, h / wh, wh, w / ww, ww, c]);
    let x = x.permute([0, 1, 3, 2, 4, 5]); // [B, nH, nW, wh, ww, C]
    x.reshape([b * (h / wh) * (w / ww), wh * ww, c])
}

/// Inverse of [`window_partition`].
fn window_reverse(
    windows: Tensor<3>,
    window: [usize; 2],
    b: usize,
    h: usize,
    w: usize,
) -> Tensor<4> {
    let [_, _, c] = windows.dims();
    let [wh, ww] = window;
    let x = windows.reshape([b, h / wh, w / ww, wh, ww, c]);
    let x = x.permute([0, 1, 3, 2, 4, 5]); // [B, nH, wh, nW, ww, C]
    x.reshape([b, h, w, c])
}

/// timm's `get_relative_position_index`: for each pair of positions in a window, the row of
/// the bias table holding their relative offset.
pub fn relative_position_index(window: [usize; 2]) -> Vec<i64> {
    let [wh, ww] = window;
    let n = wh * ww;
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        let (hi, wi) = ((i / ww) as i64, (i % ww) as i64);
        for j in 0..n {
            let (hj, wj) = ((j / ww) as i64, (j % ww) as i64);
            let dh = hi - hj + wh as i64 - 1;
            let dw = wi - wj + ww as i64 - 1;
            index.push(dh * (2 * ww as i64 - 1) + dw);
        }
    }
    index
}

/// timm's shifted-window attention mask for a padded `[hp, wp]` grid: `[nW, N, N]`, 0 where
/// two positions came from the same region before the roll and -100 where they did not.
pub fn shift_mask_values(padded: [usize; 2], window: [usize; 2], shift: [usize; 2]) -> Vec<f32> {
    let [hp, wp] = padded;
    let [wh, ww] = window;
    let region = |pos: usize, size: usize, win: usize, sft: usize| -> usize {
        // Slices (0, -win), (-win, -shift), (-shift, None) of timm's loop.
        if pos < size - win {
            0
        } else if pos < size - sft {
            1
        } else {
            2
        }
    };
    let (nh, nw) = (hp / wh, wp / ww);
    let n = wh * ww;
    let mut mask = Vec::with_capacity(nh * nw * n * n);
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<usize> = (0..n)
                .map(|p| {
                    let y = wy * wh + p / ww;
                    let x = wx * ww + p % ww;
                    region(y, hp, wh, shift[0]) * 3 + region(x, wp, ww, shift[1])
                })
                .collect();
            for &a in &ids {
                for &bb in &ids {
                    mask.push(if a == bb { 0.0 } else { -100.0 });
                }
            }
        }
    }
    mask
}

fn shift_mask(
    padded: [usize; 2],
    window: [usize; 2],
    shift: [usize; 2],
    device: &Device,
) -> Tensor<3> {
    let values = shift_mask_values(padded, window, shift);
    let n = window[0] * window[1];
    let nw = (padded[0] / window[0]) * (padded[1] / window[1]);
    Tensor::from_data(TensorData::new(values, [nw, n, n]), device)
}

#[derive(Module, Debug)]
pub struct WindowAttention {
    pub qkv: Linear,
    pub proj: Linear,
    pub relative_position_bias_table: burn::module::Param<Tensor<2>>,
    /// Not a parameter: rebuilt from the window size (timm keeps it as a non-persistent buffer).
    pub relative_position_index: Tensor<1, Int>,
    num_heads: usize,
    #[module(skip)]
    implementation: AttentionImpl,
    #[module(skip)]
    qkv_int8: Int8Weights,
    #[module(skip)]
    proj_int8: Int8Weights,
}

impl WindowAttention {
    /// `windows`: `[B * nW, N, C]`; `mask`: `[nW, N, N]` additive.
    fn forward(&self, windows: Tensor<3>, batch: usize, mask: Option<Tensor<3>>) -> Tensor<3> {
        let [bw, n, _] = windows.dims();
        let heads = self.num_heads;
        let nw = bw / batch;
        let qkv = linear(&self.qkv, &self.qkv_int8, windows); // [B*nW, N, 3 * inner]
        // `inner` = heads x head_dim: the block's channels, or fewer after head pruning.
        let inner = qkv.dims()[2] / 3;
        let head_dim = inner / heads;
        let table = self.relative_position_bias_table.val(); // [(2wh-1)(2ww-1), heads]
        let bias = table.select(0, self.relative_position_index.clone()); // [N*N, heads]
        let bias = bias.reshape([n, n, heads]).permute([2, 0, 1]); // [heads, N, N]
        let bias = match mask {
            Some(mask) => bias.unsqueeze_dim::<4>(0) + mask.unsqueeze_dim::<4>(1), // [nW, heads, N, N]
            None => bias.unsqueeze_dim::<4>(0), // [1, heads, N, N]
        };
        let scale = (head_dim as f64).powf(-0.5);
        if self.implementation == AttentionImpl::Kernel
            && super::kernels::window_attention_applies(&qkv, &bias, heads)
        {
            let out = super::kernels::window_attention(qkv, bias, heads, scale as f32);
            return linear(&self.proj, &self.proj_int8, out);
        }

        let qkv = qkv.reshape([bw, n, 3, heads, head_dim]);
        let qkv = qkv.permute([2, 0, 3, 1, 4]); // [3, B*nW, heads, N, hd]
        let q = qkv
            .clone()
            .narrow(0, 0, 1)
            .reshape([bw, heads, n, head_dim]);
        let k = qkv
            .clone()
            .narrow(0, 1, 1)
            .reshape([bw, heads, n, head_dim]);
        let v = qkv.narrow(0, 2, 1).reshape([bw, heads, n, head_dim]);
        // With a shift mask, fold the windows into the head axis, so one broadcast bias of
        // shape [1, nW*heads, N, N] serves every image of the batch.
        let masked = bias.dims()[0] > 1;
        let (bias, q, k, v, group) = if masked {
            let bias = bias.reshape([1, nw * heads, n, n]);
            let fold = |t: Tensor<4>| t.reshape([batch, nw * heads, n, head_dim]);
            (bias, fold(q), fold(k), fold(v), batch)
        } else {
            (bias, q, k, v, bw)
        };
        let out = if self.implementation != AttentionImpl::Explicit {
            let options = AttentionModuleOptions {
                scale: Some(scale),
                softcap: None,
                is_causal: false,
            };
            attention(q, k, v, None, Some(bias), options)
        } else {
            let scores = (q * scale).matmul(k.swap_dims(2, 3)) + bias;
            softmax(scores, 3).matmul(v)
        }; // [group, heads', N, hd]
        debug_assert_eq!(out.dims()[0], group);
        let out = out.reshape([bw, heads, n, head_dim]);
        let out = out.swap_dims(1, 2).reshape([bw, n, inner]);
        linear(&self.proj, &self.proj_int8, out)
    }
}

impl SwinTransformer {
    /// Chooses how window attention is computed in every block.
    pub fn set_attention_impl(&mut self, implementation: AttentionImpl) {
        for layer in &mut self.layers {
            for block in &mut layer.blocks {
                block.attn.implementation = implementation;
            }
        }
    }

    /// The (window, shift) each block was planned with, for reports and tests.
    pub fn window_plan(&self) -> Vec<Vec<([usize; 2], [usize; 2])>> {
        self.layers
            .iter()
            .map(|l| l.blocks.iter().map(|b| (b.window, b.shift)).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swin_tiny_costs_what_timm_reports() {
        // fvcore / the Swin paper: 4.5 G multiply-adds for swin_tiny_patch4_window7_224.
        let g = SwinConfig::tiny().macs() as f64 / 1e9;
        assert!((g - 4.49).abs() < 0.01, "{g}");
        let mut pruned = SwinConfig::edge();
        let full = pruned.macs();
        pruned.mlp_hidden = vec![vec![96, 96], vec![192, 192], vec![384, 384], vec![768, 768]];
        assert!(pruned.macs() < full);
    }

    #[test]
    fn relative_index_matches_timm_corners() {
        // timm, window 2x2: [[4,3,1,0],[5,4,2,1],[7,6,4,3],[8,7,5,4]].
        let index = relative_position_index([2, 2]);
        assert_eq!(index, vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]);
    }

    #[test]
    fn shift_mask_separates_regions() {
        // 4x4 grid, window 2, shift 1: the last window mixes four regions.
        let mask = shift_mask_values([4, 4], [2, 2], [1, 1]);
        assert_eq!(mask.len(), 4 * 16);
        assert!(
            mask[..16].iter().all(|&v| v == 0.0),
            "first window is one region"
        );
        let last = &mask[48..];
        let zeros = last.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(zeros, 4, "four distinct regions: only the diagonal attends");
    }

    #[test]
    fn window_partition_roundtrip() {
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 14, 21, 3], Distribution::Default, &device);
        let w = window_partition(x.clone(), [7, 7]);
        assert_eq!(w.dims(), [2 * 2 * 3, 49, 3]);
        let back = window_reverse(w, [7, 7], 2, 14, 21);
        back.into_data().assert_eq(&x.into_data(), true);
    }

    #[test]
    fn plan_follows_timm_shift_rule() {
        let device = Device::flex();
        let model = SwinConfig::edge().with_img_size([224, 224]).init(&device);
        let plan = model.window_plan();
        assert_eq!(plan[0][1], ([7, 7], [3, 3]));
        assert_eq!(
            plan[3][1],
            ([7, 7], [0, 0]),
            "7x7 stage is one window, no shift"
        );
    }
}
