//! Turning camera pixels into the model's input tensor, and model boxes back into pixels.
//! Defined once here and stored in the model's config, so training, evaluation and the edge
//! feed the network identically.

use burn::prelude::*;
use image::imageops::FilterType;
use image::{GrayImage, ImageBuffer, Luma, RgbImage};

use super::DetectorError;

/// How an image is fitted to the model's input size.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum ResizeMode {
    /// Scale each axis independently to the input size (NEU's square tiles).
    Stretch,
    /// Keep the aspect ratio, scale to fit, pad right/bottom with the mean colour.
    Letterbox,
}

/// Preprocessing stored with a model.
#[derive(Config, Debug, PartialEq)]
pub struct Preprocess {
    /// Network input `[height, width]`.
    #[config(default = "[224, 224]")]
    pub input_size: [usize; 2],
    #[config(default = "ResizeMode::Stretch")]
    pub resize: ResizeMode,
    /// Convert to luminance and repeat it on the three input channels (grey surfaces: steel).
    #[config(default = true)]
    pub grey: bool,
    /// Per-channel mean and std on the 0..1 scale.
    #[config(default = "[0.485, 0.456, 0.406]")]
    pub mean: [f32; 3],
    #[config(default = "[0.229, 0.224, 0.225]")]
    pub std: [f32; 3],
}

/// Pixels handed to the detector: 8-bit, 1 (grey) or 3 (RGB) channels, row-major, interleaved.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: &'a [u8],
}

impl<'a> ImageView<'a> {
    pub fn grey(image: &'a GrayImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            channels: 1,
            pixels: image.as_raw(),
        }
    }

    pub fn rgb(image: &'a RgbImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            channels: 3,
            pixels: image.as_raw(),
        }
    }

    /// Checks the view describes a real image; `index` names it in the error.
    pub fn validate(&self, index: usize) -> Result<(), DetectorError> {
        if self.width == 0 || self.height == 0 {
            return Err(DetectorError::BadImage {
                index,
                reason: format!("zero-size image {}x{}", self.width, self.height),
            });
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(DetectorError::BadImage {
                index,
                reason: format!("{} channels; expected 1 (grey) or 3 (RGB)", self.channels),
            });
        }
        let expected = self.width * self.height * self.channels;
        if self.pixels.len() != expected {
            return Err(DetectorError::BadImage {
                index,
                reason: format!(
                    "{} bytes for {}x{}x{} (expected {expected})",
                    self.pixels.len(),
                    self.width,
                    self.height,
                    self.channels
                ),
            });
        }
        Ok(())
    }
}

/// Maps boxes from network input pixels back to the original image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InverseTransform {
    pub scale_x: f32,
    pub scale_y: f32,
    pub width: f32,
    pub height: f32,
}

impl InverseTransform {
    pub fn apply(&self, x1: f32, y1: f32, x2: f32, y2: f32) -> [f32; 4] {
        [
            (x1 / self.scale_x).clamp(0.0, self.width),
            (y1 / self.scale_y).clamp(0.0, self.height),
            (x2 / self.scale_x).clamp(0.0, self.width),
            (y2 / self.scale_y).clamp(0.0, self.height),
        ]
    }
}

impl Preprocess {
    /// Resizes and normalises one image into `[3, H, W]` floats (channel-major), returning the
    /// transform that maps input-pixel boxes back to the image.
    pub fn prepare(
        &self,
        image: &ImageView,
        index: usize,
    ) -> Result<(Vec<f32>, InverseTransform), DetectorError> {
        image.validate(index)?;
        let [out_h, out_w] = self.input_size;
        let (w, h) = (image.width as u32, image.height as u32);
        let (scale_x, scale_y, fit_w, fit_h) = match self.resize {
            ResizeMode::Stretch => (
                out_w as f32 / w as f32,
                out_h as f32 / h as f32,
                out_w as u32,
                out_h as u32,
            ),
            ResizeMode::Letterbox => {
                let s = (out_w as f32 / w as f32).min(out_h as f32 / h as f32);
                let fw = ((w as f32 * s).round() as u32).clamp(1, out_w as u32);
                let fh = ((h as f32 * s).round() as u32).clamp(1, out_h as u32);
                (fw as f32 / w as f32, fh as f32 / h as f32, fw, fh)
            }
        };
        let plane = out_h * out_w;
        // Padding takes the mean colour, which normalises to 0.
        let mut out = vec![0f32; 3 * plane];
        let channels: Vec<Vec<u8>> = if self.grey || image.channels == 1 {
            let grey: GrayImage = if image.channels == 1 {
                ImageBuffer::<Luma<u8>, _>::from_raw(w, h, image.pixels.to_vec())
                    .ok_or_else(|| bad(index, "pixel buffer does not match its size"))?
            } else {
                let rgb = RgbImage::from_raw(w, h, image.pixels.to_vec())
                    .ok_or_else(|| bad(index, "pixel buffer does not match its size"))?;
                image::DynamicImage::ImageRgb8(rgb).into_luma8()
            };
            let resized = resize_grey(&grey, fit_w, fit_h);
            vec![resized.into_raw()]
        } else {
            let rgb = RgbImage::from_raw(w, h, image.pixels.to_vec())
                .ok_or_else(|| bad(index, "pixel buffer does not match its size"))?;
            let resized = if (fit_w, fit_h) == (w, h) {
                rgb
            } else {
                image::imageops::resize(&rgb, fit_w, fit_h, FilterType::Triangle)
            };
            let raw = resized.into_raw();
            (0..3)
                .map(|c| raw.iter().skip(c).step_by(3).copied().collect())
                .collect()
        };
        for c in 0..3 {
            let src = &channels[if channels.len() == 1 { 0 } else { c }];
            let (mean, std) = (self.mean[c], self.std[c]);
            for y in 0..fit_h as usize {
                let row = &src[y * fit_w as usize..(y + 1) * fit_w as usize];
                let dst = &mut out[c * plane + y * out_w..c * plane + y * out_w + fit_w as usize];
                for (d, &s) in dst.iter_mut().zip(row) {
                    *d = (s as f32 / 255.0 - mean) / std;
                }
            }
        }
        let inverse = InverseTransform {
            scale_x,
            scale_y,
            width: w as f32,
            height: h as f32,
        };
        Ok((out, inverse))
    }

    /// A batch of images as one `[B, 3, H, W]` tensor plus their inverse transforms.
    pub fn batch(
        &self,
        images: &[ImageView],
        device: &Device,
    ) -> Result<(Tensor<4>, Vec<InverseTransform>), DetectorError> {
        let [h, w] = self.input_size;
        let mut data = Vec::with_capacity(images.len() * 3 * h * w);
        let mut inverses = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let (pixels, inverse) = self.prepare(image, i)?;
            data.extend_from_slice(&pixels);
            inverses.push(inverse);
        }
        let tensor = Tensor::from_data(TensorData::new(data, [images.len(), 3, h, w]), device);
        Ok((tensor, inverses))
    }
}

fn resize_grey(image: &GrayImage, w: u32, h: u32) -> GrayImage {
    if image.dimensions() == (w, h) {
        image.clone()
    } else {
        image::imageops::resize(image, w, h, FilterType::Triangle)
    }
}

fn bad(index: usize, reason: &str) -> DetectorError {
    DetectorError::BadImage {
        index,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_views() {
        let p = Preprocess::new();
        let pixels = vec![0u8; 12];
        let two_channel = ImageView {
            width: 2,
            height: 3,
            channels: 2,
            pixels: &pixels,
        };
        let err = p.prepare(&two_channel, 4).unwrap_err().to_string();
        assert!(
            err.contains("image 4") && err.contains("2 channels"),
            "{err}"
        );
        let empty = ImageView {
            width: 0,
            height: 3,
            channels: 1,
            pixels: &[],
        };
        assert!(
            p.prepare(&empty, 0)
                .unwrap_err()
                .to_string()
                .contains("zero-size")
        );
        let short = ImageView {
            width: 4,
            height: 4,
            channels: 3,
            pixels: &pixels,
        };
        assert!(
            p.prepare(&short, 0)
                .unwrap_err()
                .to_string()
                .contains("12 bytes")
        );
    }

    #[test]
    fn letterbox_maps_boxes_back() {
        let p = Preprocess::new()
            .with_resize(ResizeMode::Letterbox)
            .with_input_size([100, 100]);
        let pixels = vec![128u8; 200 * 50];
        let view = ImageView {
            width: 200,
            height: 50,
            channels: 1,
            pixels: &pixels,
        };
        let (data, inv) = p.prepare(&view, 0).unwrap();
        assert_eq!(data.len(), 3 * 100 * 100);
        assert_eq!(inv.apply(10.0, 10.0, 50.0, 25.0), [20.0, 20.0, 100.0, 50.0]);
        // Below the fitted 25 rows is padding (0 after normalisation).
        assert_eq!(data[60 * 100 + 5], 0.0);
    }
}
