//! Augmentations with correct box handling, on 8-bit images before preprocessing. Grey data
//! has no hue, so there is no colour jitter; photometric changes are brightness, contrast,
//! gamma, noise and blur. Each is an option whose probability or strength is configured.

use image::{DynamicImage, GenericImageView};
use rand::RngExt;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::voc::Object;

/// Augmentation settings; the defaults are the training recipe, `none()` turns all off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    pub hflip: f64,
    pub vflip: f64,
    /// Probability of a random multiple-of-90-degree rotation.
    pub rot90: f64,
    /// Probability of a random resized crop, and the smallest kept area fraction.
    pub crop: f64,
    pub crop_min_area: f32,
    /// A box keeps at least this fraction of its area after a crop, or is dropped.
    pub crop_min_box_visibility: f32,
    /// Max relative change of brightness, contrast; max |log gamma|.
    pub brightness: f32,
    pub contrast: f32,
    pub gamma: f32,
    /// Probability and max std (0..255 scale) of additive Gaussian-like noise.
    pub noise: f64,
    pub noise_std: f32,
    /// Probability and max sigma of a Gaussian blur.
    pub blur: f64,
    pub blur_sigma: f32,
    /// Probabilities of the few-data mixers (`data::mixers`): mosaic of four images, mixup of
    /// two, copy-paste of defects from another image.
    pub mosaic: f64,
    pub mixup: f64,
    pub copy_paste: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            hflip: 0.5,
            vflip: 0.5,
            rot90: 0.0,
            crop: 0.3,
            crop_min_area: 0.5,
            crop_min_box_visibility: 0.4,
            brightness: 0.2,
            contrast: 0.2,
            gamma: 0.2,
            noise: 0.2,
            noise_std: 6.0,
            blur: 0.1,
            blur_sigma: 1.0,
            mosaic: 0.0,
            mixup: 0.0,
            copy_paste: 0.0,
        }
    }
}

impl AugmentConfig {
    pub fn none() -> Self {
        Self {
            hflip: 0.0,
            vflip: 0.0,
            rot90: 0.0,
            crop: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            gamma: 0.0,
            noise: 0.0,
            blur: 0.0,
            mosaic: 0.0,
            mixup: 0.0,
            copy_paste: 0.0,
            ..Self::default()
        }
    }
}

/// Applies the configured augmentations to an image and its boxes.
pub fn augment(
    mut image: DynamicImage,
    mut objects: Vec<Object>,
    config: &AugmentConfig,
    rng: &mut StdRng,
) -> (DynamicImage, Vec<Object>) {
    if rng.random_bool(config.crop.clamp(0.0, 1.0)) {
        (image, objects) = random_crop(image, objects, config, rng);
    }
    if rng.random_bool(config.hflip.clamp(0.0, 1.0)) {
        let w = image.width() as f32;
        image = image.fliph();
        for o in &mut objects {
            o.bbox = [w - o.bbox[2], o.bbox[1], w - o.bbox[0], o.bbox[3]];
        }
    }
    if rng.random_bool(config.vflip.clamp(0.0, 1.0)) {
        let h = image.height() as f32;
        image = image.flipv();
        for o in &mut objects {
            o.bbox = [o.bbox[0], h - o.bbox[3], o.bbox[2], h - o.bbox[1]];
        }
    }
    if rng.random_bool(config.rot90.clamp(0.0, 1.0)) {
        for _ in 0..rng.random_range(1..4) {
            // 90 degrees clockwise: (x, y) -> (h - y, x).
            let h = image.height() as f32;
            image = image.rotate90();
            for o in &mut objects {
                o.bbox = [h - o.bbox[3], o.bbox[0], h - o.bbox[1], o.bbox[2]];
            }
        }
    }
    image = photometric(image, config, rng);
    (image, objects)
}

fn random_crop(
    image: DynamicImage,
    objects: Vec<Object>,
    config: &AugmentConfig,
    rng: &mut StdRng,
) -> (DynamicImage, Vec<Object>) {
    let (w, h) = image.dimensions();
    let area = rng.random_range(config.crop_min_area.clamp(0.05, 1.0)..=1.0f32);
    let aspect = (rng.random_range(-0.3f32..0.3)).exp();
    let cw = ((w as f32 * (area * aspect).sqrt()).round() as u32).clamp(8, w);
    let ch = ((h as f32 * (area / aspect).sqrt()).round() as u32).clamp(8, h);
    let x0 = rng.random_range(0..=w - cw);
    let y0 = rng.random_range(0..=h - ch);
    let cropped = image.crop_imm(x0, y0, cw, ch);
    let kept = objects
        .into_iter()
        .filter_map(|o| {
            let b = [
                (o.bbox[0] - x0 as f32).clamp(0.0, cw as f32),
                (o.bbox[1] - y0 as f32).clamp(0.0, ch as f32),
                (o.bbox[2] - x0 as f32).clamp(0.0, cw as f32),
                (o.bbox[3] - y0 as f32).clamp(0.0, ch as f32),
            ];
            let before = (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]);
            let after = (b[2] - b[0]) * (b[3] - b[1]);
            (after >= config.crop_min_box_visibility * before
                && b[2] - b[0] >= 2.0
                && b[3] - b[1] >= 2.0)
                .then_some(Object { bbox: b, ..o })
        })
        .collect();
    (cropped, kept)
}

fn photometric(image: DynamicImage, config: &AugmentConfig, rng: &mut StdRng) -> DynamicImage {
    let gain = 1.0 + rng.random_range(-1.0..=1.0f32) * config.contrast;
    let offset = rng.random_range(-1.0..=1.0f32) * config.brightness * 128.0;
    let gamma = (rng.random_range(-1.0..=1.0f32) * config.gamma).exp();
    let noise_std = if rng.random_bool(config.noise.clamp(0.0, 1.0)) {
        rng.random_range(0.0..=config.noise_std)
    } else {
        0.0
    };
    let identity = gain == 1.0 && offset == 0.0 && gamma == 1.0 && noise_std == 0.0;
    let mut image = if identity {
        image
    } else {
        let mut buffer = image.into_luma8_or_rgb8();
        let table: Vec<f32> = (0..256)
            .map(|v| {
                let v = ((v as f32 - 128.0) * gain + 128.0 + offset).clamp(0.0, 255.0);
                255.0 * (v / 255.0).powf(gamma)
            })
            .collect();
        for p in buffer.bytes_mut() {
            let noise = if noise_std > 0.0 {
                (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5)
                    * 2.0
                    * noise_std
            } else {
                0.0
            };
            *p = (table[*p as usize] + noise).round().clamp(0.0, 255.0) as u8;
        }
        buffer.into_dynamic()
    };
    if rng.random_bool(config.blur.clamp(0.0, 1.0)) && config.blur_sigma > 0.0 {
        image = image.blur(rng.random_range(0.1..=config.blur_sigma));
    }
    image
}

/// Grey or RGB 8-bit buffer, whichever the image is closest to, for pixel-level edits.
enum Buffer {
    Luma(image::GrayImage),
    Rgb(image::RgbImage),
}

impl Buffer {
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buffer::Luma(b) => b.as_mut(),
            Buffer::Rgb(b) => b.as_mut(),
        }
    }

    fn into_dynamic(self) -> DynamicImage {
        match self {
            Buffer::Luma(b) => DynamicImage::ImageLuma8(b),
            Buffer::Rgb(b) => DynamicImage::ImageRgb8(b),
        }
    }
}

trait IntoBuffer {
    fn into_luma8_or_rgb8(self) -> Buffer;
}

impl IntoBuffer for DynamicImage {
    fn into_luma8_or_rgb8(self) -> Buffer {
        if self.color().has_color() {
            Buffer::Rgb(self.into_rgb8())
        } else {
            Buffer::Luma(self.into_luma8())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// An image that is black except a white rectangle: after any geometric augmentation, the
    /// box must still enclose exactly the white pixels.
    #[test]
    fn geometric_augmentations_keep_boxes_on_their_pixels() {
        let (w, h) = (64u32, 48u32);
        let bbox = [10.0f32, 5.0, 30.0, 20.0];
        let img = image::GrayImage::from_fn(w, h, |x, y| {
            let inside = (x as f32) >= bbox[0]
                && (x as f32) < bbox[2]
                && (y as f32) >= bbox[1]
                && (y as f32) < bbox[3];
            image::Luma([if inside { 255 } else { 0 }])
        });
        let config = AugmentConfig {
            hflip: 0.5,
            vflip: 0.5,
            rot90: 0.5,
            crop: 0.0,
            ..AugmentConfig::none()
        };
        for seed in 0..24 {
            let mut rng = StdRng::seed_from_u64(seed);
            let objects = vec![Object {
                class_id: 0,
                bbox,
                difficult: false,
                id: None,
                ignore: false,
            }];
            let (out, objs) = augment(
                DynamicImage::ImageLuma8(img.clone()),
                objects,
                &config,
                &mut rng,
            );
            let out = out.into_luma8();
            let b = objs[0].bbox;
            let (mut x1, mut y1, mut x2, mut y2) = (u32::MAX, u32::MAX, 0, 0);
            for (x, y, p) in out.enumerate_pixels() {
                if p.0[0] > 128 {
                    (x1, y1, x2, y2) = (x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1));
                }
            }
            assert_eq!(
                [x1 as f32, y1 as f32, x2 as f32, y2 as f32],
                b,
                "seed {seed}"
            );
        }
    }

    #[test]
    fn crop_drops_boxes_mostly_outside() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::new(100, 100));
        let config = AugmentConfig {
            crop: 1.0,
            crop_min_area: 0.25,
            crop_min_box_visibility: 0.2,
            ..AugmentConfig::none()
        };
        let mut dropped = 0;
        for seed in 0..20 {
            let objects = vec![
                Object {
                    class_id: 1,
                    bbox: [0.0, 0.0, 100.0, 100.0],
                    difficult: false,
                    id: None,
                    ignore: false,
                },
                Object {
                    class_id: 2,
                    bbox: [0.0, 0.0, 10.0, 10.0],
                    difficult: false,
                    id: None,
                    ignore: false,
                },
            ];
            let (out, objs) = augment(
                img.clone(),
                objects,
                &config,
                &mut StdRng::seed_from_u64(seed),
            );
            // A full-image box becomes the crop window (visible area >= 25% > 20%).
            assert_eq!(
                objs[0].bbox,
                [0.0, 0.0, out.width() as f32, out.height() as f32]
            );
            if objs.len() == 1 {
                dropped += 1;
            } else {
                let b = objs[1].bbox;
                assert!(
                    (b[2] - b[0]) * (b[3] - b[1]) >= 20.0,
                    "kept with >= 20% of its area: {b:?}"
                );
            }
        }
        assert!(dropped > 0, "a corner box falls outside some crops");
    }
}
