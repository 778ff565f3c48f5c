//! The defect detector: Swin backbone, FPN neck, anchor-free head, post-processing, and the
//! `Detector` API that the daemon and the trainer share (images in, boxes out, any `Device`).
//! Beside it: the device choice, golden-sample checks of packaged models, and the synthetic
//! NEU-style surfaces (and their VOC annotations) that tests, the demo and the daemon's
//! synthetic source draw. Nothing here knows MQTT, HTTP or sled.

pub mod autograd;
pub mod cli;
pub mod cpu;
pub mod device;
pub mod golden;
pub mod head;
pub mod image_io;
pub mod int8;
pub mod kernels;
pub mod loss;
pub mod nms;
pub mod parity;
pub mod preprocess;
pub mod quant;
pub mod saliency;
pub mod swin;
pub mod synth;
pub mod voc;
mod weights;

use burn::prelude::*;
use burn::tensor::activation::sigmoid;

pub use head::{Detection, DetectionHead, HeadConfig, HeadOutput};
pub use preprocess::{ImageView, InverseTransform, Preprocess, ResizeMode};
pub use swin::{AttentionImpl, SwinConfig, SwinTransformer};
pub use weights::{CONFIG_KEY, FACTORY_KEY_HEX, PRUNING_KEY};

/// Everything that defines a detector: stored with its weights, so a model file is
/// self-describing.
#[derive(Config, Debug, PartialEq)]
pub struct DetectorConfig {
    pub backbone: SwinConfig,
    pub head: HeadConfig,
    /// Class names, index = class id.
    pub classes: Vec<String>,
    pub preprocess: Preprocess,
    /// Backbone stages fed to the neck (finest first).
    #[config(default = "vec![1, 2, 3]")]
    pub feature_stages: Vec<usize>,
    /// Boxes scoring below this are dropped before NMS.
    #[config(default = 0.05)]
    pub score_threshold: f32,
    /// Class-wise NMS IoU threshold.
    #[config(default = 0.5)]
    pub nms_iou: f32,
    /// Candidates kept per image before NMS, by score.
    #[config(default = 1000)]
    pub pre_nms_top_k: usize,
    /// Detections kept per image after NMS.
    #[config(default = 100)]
    pub max_detections: usize,
}

/// The six NEU-DET surface defect classes, in the dataset's usual order.
pub const NEU_CLASSES: [&str; 6] = [
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
];

impl DetectorConfig {
    /// The edge-size detector for NEU-DET's six classes at 224x224.
    pub fn edge_neu() -> Self {
        Self::new(
            SwinConfig::edge(),
            HeadConfig::new(),
            NEU_CLASSES.iter().map(|s| s.to_string()).collect(),
            Preprocess::new(),
        )
    }

    pub fn strides(&self) -> Vec<usize> {
        let all = self.backbone.stage_strides();
        self.feature_stages.iter().map(|&s| all[s]).collect()
    }

    /// Multiply-accumulates of one forward pass at the input size: the backbone's
    /// ([`SwinConfig::macs`]) plus the neck's and head's convolutions. GFLOPs = 2 x MACs / 1e9.
    pub fn macs(&self) -> u64 {
        let dims = self.backbone.stage_dims();
        let [h, w] = self.backbone.img_size;
        let per_position = |c_in: usize| self.head.macs_per_position(c_in, self.classes.len());
        let head: usize = self
            .feature_stages
            .iter()
            .map(|&s| {
                let stride = self.backbone.patch_size << s;
                h.div_ceil(stride) * w.div_ceil(stride) * per_position(dims[s])
            })
            .sum();
        self.backbone.macs() + head as u64
    }

    pub fn validate(&self) -> Result<(), DetectorError> {
        let invalid = |msg: String| DetectorError::InvalidConfig(msg);
        self.backbone.validate().map_err(invalid)?;
        self.head.validate().map_err(invalid)?;
        if self.classes.is_empty() {
            return Err(invalid("`classes` is empty".into()));
        }
        let stages = self.backbone.depths.len();
        if self.feature_stages.is_empty()
            || self.feature_stages.iter().any(|&s| s >= stages)
            || self.feature_stages.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(invalid(format!(
                "`feature_stages` {:?} must be increasing stage indices below {stages}",
                self.feature_stages
            )));
        }
        let [h, w] = self.preprocess.input_size;
        if h == 0 || w == 0 {
            return Err(invalid("`preprocess.input_size` must be positive".into()));
        }
        if !(self.preprocess.std.iter().all(|&s| s > 0.0)) {
            return Err(invalid("`preprocess.std` must be positive".into()));
        }
        Ok(())
    }

    /// Builds a randomly initialised model.
    pub fn init(&self, device: &Device) -> Result<DetectorModel, DetectorError> {
        self.validate()?;
        let backbone = self
            .backbone
            .clone()
            .with_img_size(self.preprocess.input_size)
            .init(device);
        let dims = self.backbone.stage_dims();
        let in_dims: Vec<usize> = self.feature_stages.iter().map(|&s| dims[s]).collect();
        let head = self.head.init(&in_dims, self.classes.len(), device);
        Ok(DetectorModel {
            backbone,
            head,
            feature_stages: self.feature_stages.clone(),
            strides: self.strides(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("invalid detector config: {0}")]
    InvalidConfig(String),
    #[error("image {index}: {reason}")]
    BadImage { index: usize, reason: String },
    #[error("{path}: {reason}")]
    BadWeights { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The network: backbone, neck and head.
#[derive(Module, Debug)]
pub struct DetectorModel {
    pub backbone: SwinTransformer,
    pub head: DetectionHead,
    feature_stages: Vec<usize>,
    strides: Vec<usize>,
}

impl DetectorModel {
    /// `images`: `[B, 3, H, W]`, already preprocessed.
    pub fn forward(&self, images: Tensor<4>) -> HeadOutput {
        let features = self.backbone.forward(images);
        let stages = self
            .feature_stages
            .iter()
            .map(|&s| features.stages[s].clone())
            .collect();
        self.head.forward(stages, &self.strides)
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
}

/// A ready-to-run detector: config, weights and the device they live on.
#[derive(Debug, Clone)]
pub struct Detector {
    pub config: DetectorConfig,
    pub model: DetectorModel,
    pub device: Device,
}

impl Detector {
    /// A detector with random weights (for training from scratch).
    pub fn new(config: DetectorConfig, device: &Device) -> Result<Self, DetectorError> {
        let model = config.init(device)?;
        Ok(Self {
            config,
            model,
            device: device.clone(),
        })
    }

    /// The same detector for inference: weights off the autodiff graph, on the inner device.
    pub fn valid(&self) -> Self {
        Self {
            config: self.config.clone(),
            model: self.model.valid(),
            device: self.device.clone().without_autodiff(),
        }
    }

    /// Detects defects in each image; boxes are in that image's own pixel coordinates.
    pub fn detect(&self, images: &[ImageView]) -> Result<Vec<Vec<Detection>>, DetectorError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let (input, inverses) = self.config.preprocess.batch(images, &self.device)?;
        let output = self.model.forward(input);
        Ok(self.postprocess(output, &inverses))
    }

    /// Scores, top-k, class-wise NMS, and mapping back to image pixels.
    pub fn postprocess(
        &self,
        output: HeadOutput,
        inverses: &[InverseTransform],
    ) -> Vec<Vec<Detection>> {
        let [b, l, k] = output.cls_logits.dims();
        let scores: Vec<f32> = sigmoid(output.cls_logits)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap_or_default();
        let ltrb: Vec<f32> = output
            .box_ltrb
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap_or_default();
        let points = head::location_centres(&output.level_sizes, self.model.strides());
        let c = &self.config;
        (0..b)
            .map(|i| {
                let mut candidates: Vec<Detection> = Vec::new();
                for (p, &(x, y, _)) in points.iter().enumerate().take(l) {
                    let base = (i * l + p) * k;
                    for class_id in 0..k {
                        let score = scores[base + class_id];
                        if score < c.score_threshold {
                            continue;
                        }
                        let d = &ltrb[(i * l + p) * 4..(i * l + p) * 4 + 4];
                        candidates.push(Detection {
                            x1: x - d[0],
                            y1: y - d[1],
                            x2: x + d[2],
                            y2: y + d[3],
                            class_id,
                            score,
                        });
                    }
                }
                candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
                candidates.truncate(c.pre_nms_top_k);
                let mut kept = nms::class_wise_nms(candidates, c.nms_iou);
                kept.truncate(c.max_detections);
                for d in &mut kept {
                    let [x1, y1, x2, y2] = inverses[i].apply(d.x1, d.y1, d.x2, d.y2);
                    (d.x1, d.y1, d.x2, d.y2) = (x1, y1, x2, y2);
                }
                kept
            })
            .collect()
    }
}
