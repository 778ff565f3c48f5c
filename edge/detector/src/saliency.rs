//! Where the detector looked: Grad-CAM (Selvaraju et al. 2017) on the feature maps the head
//! reads (the backbone runs as in inference, the head again with autodiff). For each image the target is the summed probability of its top-scoring class over all
//! locations; each neck input's channels are weighted by their mean gradient, summed, rectified,
//! and the levels are resampled to the image and added.

use burn::prelude::*;
use burn::tensor::activation::sigmoid;

use super::{Detector, DetectorError, ImageView};

/// A saliency map at an image's own resolution, row-major, values in [0, 1].
#[derive(Clone, Debug)]
pub struct SaliencyMap {
    pub width: usize,
    pub height: usize,
    /// Normalised to a maximum of 1 (all 0 when nothing drew the model's attention).
    pub values: Vec<f32>,
    /// Probability of the best detection the map explains (its class at its best location).
    pub score: f32,
}

impl Detector {
    /// Grad-CAM maps of `images`, one per image, at each image's resolution. The backbone runs
    /// as in inference; the head runs again with autodiff to take gradients at its inputs.
    pub fn saliency(&self, images: &[ImageView]) -> Result<Vec<SaliencyMap>, DetectorError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let plain = self.device.clone().without_autodiff();
        let (input, inverses) = self.config.preprocess.batch(images, &plain)?;
        let features = self.model.valid().backbone.forward(input);
        let stages: Vec<Tensor<4>> = self
            .config
            .feature_stages
            .iter()
            .map(|&s| features.stages[s].clone().autodiff().require_grad())
            .collect();
        let head = self.model.head.clone().train();
        let output = head.forward(stages.clone(), self.model.strides());
        let [b, l, k] = output.cls_logits.dims();
        // Each image's top class (by its best location), then that class's probability summed
        // over the locations scoring at least half the best: the evidence for what it found.
        let probabilities = sigmoid(output.cls_logits);
        let p: Vec<f32> = probabilities
            .clone()
            .inner()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap_or_default();
        let mut mask = vec![0f32; b * l * k];
        let mut scores = vec![0f32; b];
        for i in 0..b {
            let at = |loc: usize, class: usize| p[(i * l + loc) * k + class];
            let (mut best, mut top) = (0f32, 0);
            for loc in 0..l {
                for class in 0..k {
                    if at(loc, class) > best {
                        (best, top) = (at(loc, class), class);
                    }
                }
            }
            scores[i] = best;
            for loc in 0..l {
                if at(loc, top) >= 0.5 * best {
                    mask[(i * l + loc) * k + top] = 1.0;
                }
            }
        }
        let mask = Tensor::<3>::from_data(
            TensorData::new(mask, [b, l, k]),
            &self.device.clone().autodiff(),
        );
        let target = (probabilities * mask).sum();
        let grads = target.backward();

        let [in_h, in_w] = self.config.preprocess.input_size;
        let mut maps: Vec<Vec<f32>> = vec![vec![0f32; in_h * in_w]; b];
        for stage in &stages {
            let [_, h, w, c] = stage.dims();
            let Some(grad) = stage.grad(&grads) else {
                continue;
            };
            let a: Vec<f32> = stage
                .clone()
                .inner()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap_or_default();
            let g: Vec<f32> = grad
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap_or_default();
            for (i, map) in maps.iter_mut().enumerate() {
                let base = i * h * w * c;
                let mut weights = vec![0f32; c];
                for p in 0..h * w {
                    for (ch, weight) in weights.iter_mut().enumerate() {
                        *weight += g[base + p * c + ch];
                    }
                }
                let cam: Vec<f32> = (0..h * w)
                    .map(|p| {
                        let s: f32 = (0..c)
                            .map(|ch| weights[ch] * a[base + p * c + ch])
                            .sum::<f32>();
                        s.max(0.0) / (h * w) as f32
                    })
                    .collect();
                add_resampled(map, in_w, in_h, &cam, w, h);
            }
        }
        Ok(maps
            .into_iter()
            .zip(images.iter().zip(&inverses))
            .zip(scores)
            .map(|((map, (image, inverse)), score)| {
                // Input pixel = image pixel x scale (anchored at the top-left corner).
                let (iw, ih) = (image.width, image.height);
                let mut values = vec![0f32; iw * ih];
                for y in 0..ih {
                    let sy = ((y as f32 + 0.5) * inverse.scale_y) as usize;
                    for x in 0..iw {
                        let sx = ((x as f32 + 0.5) * inverse.scale_x) as usize;
                        values[y * iw + x] = map[sy.min(in_h - 1) * in_w + sx.min(in_w - 1)];
                    }
                }
                let max = values.iter().copied().fold(0f32, f32::max);
                if max > 0.0 {
                    values.iter_mut().for_each(|v| *v /= max);
                }
                SaliencyMap {
                    width: iw,
                    height: ih,
                    values,
                    score,
                }
            })
            .collect())
    }
}

/// Adds the bilinear resampling of `src` (`sw` x `sh`, cell centres) onto `dst` (`dw` x `dh`).
fn add_resampled(dst: &mut [f32], dw: usize, dh: usize, src: &[f32], sw: usize, sh: usize) {
    for y in 0..dh {
        let fy = ((y as f32 + 0.5) * sh as f32 / dh as f32 - 0.5).clamp(0.0, (sh - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(sh - 1);
        for x in 0..dw {
            let fx = ((x as f32 + 0.5) * sw as f32 / dw as f32 - 0.5).clamp(0.0, (sw - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(sw - 1);
            let top = src[y0 * sw + x0] * (1.0 - tx) + src[y0 * sw + x1] * tx;
            let bottom = src[y1 * sw + x0] * (1.0 - tx) + src[y1 * sw + x1] * tx;
            dst[y * dw + x] += top * (1.0 - ty) + bottom * ty;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DetectorConfig;

    #[test]
    fn saliency_maps_cover_each_image_in_unit_range() {
        let mut config = DetectorConfig::edge_neu();
        config.backbone = crate::SwinConfig::nano();
        let detector = Detector::new(config, &Device::flex()).unwrap();
        let a = image::GrayImage::from_fn(200, 120, |x, y| {
            image::Luma([((x * 7 + y * 3) % 255) as u8])
        });
        let b =
            image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x > 32 { 200 } else { 30 }]));
        let maps = detector
            .saliency(&[ImageView::grey(&a), ImageView::grey(&b)])
            .unwrap();
        assert_eq!((maps[0].width, maps[0].height), (200, 120));
        assert_eq!((maps[1].width, maps[1].height), (64, 64));
        for m in &maps {
            assert_eq!(m.values.len(), m.width * m.height);
            assert!(m.values.iter().all(|v| (0.0..=1.0).contains(v)));
            let max = m.values.iter().copied().fold(0f32, f32::max);
            assert!(max == 1.0 || max == 0.0);
            assert!((0.0..=1.0).contains(&m.score));
        }
    }
}
