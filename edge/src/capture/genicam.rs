//! GenICam cameras (GigE Vision, USB3 Vision): the `[source] kind = "genicam"` configuration and
//! the pixel conversion; the acquisition itself, through Aravis, is [`super::aravis_source`]
//! (cargo feature `genicam`).

use std::collections::BTreeMap;

use image::GrayImage;
use serde::Deserialize;

/// What the camera sends; every format becomes grey.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum GenicamPixelFormat {
    #[default]
    Mono8,
    /// 16-bit pixels scaled down by `pixel_bits` (12-bit sensors: 12).
    Mono16,
    BayerRG8,
    BayerGR8,
    BayerGB8,
    BayerBG8,
}

impl GenicamPixelFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mono8 => "Mono8",
            Self::Mono16 => "Mono16",
            Self::BayerRG8 => "BayerRG8",
            Self::BayerGR8 => "BayerGR8",
            Self::BayerGB8 => "BayerGB8",
            Self::BayerBG8 => "BayerBG8",
        }
    }
}

/// How acquisition is triggered.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The camera runs at its own frame rate (AcquisitionFrameRate in `features`).
    #[default]
    Free,
    /// The daemon fires TriggerSoftware at `software_trigger_hz`.
    Software,
    /// An electrical input (encoder, photo-eye): TriggerSource is `trigger_source`.
    Hardware,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenicamConfig {
    /// The device id as `edge cameras` lists it, its serial number or its IP address; absent:
    /// the first camera found.
    #[serde(default)]
    pub camera: Option<String>,
    #[serde(default)]
    pub pixel_format: GenicamPixelFormat,
    /// Significant bits of Mono16 pixels.
    #[serde(default = "sixteen")]
    pub pixel_bits: u32,
    /// GenICam features set by name at start (and after each reconnect), in name order:
    /// numbers, booleans or strings (ExposureTime = 2000.0, Gain = 3.0, AcquisitionFrameRate =
    /// 30.0, ReverseX = true...).
    #[serde(default)]
    pub features: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub trigger: Trigger,
    #[serde(default = "line1")]
    pub trigger_source: String,
    #[serde(default = "ten")]
    pub software_trigger_hz: f64,
    /// Stream buffers queued at the camera (and frames waiting for the pipeline).
    #[serde(default = "eight")]
    pub buffers: usize,
    /// No buffer for this long while free-running or software-triggered: the camera is lost.
    #[serde(default = "three_thousand")]
    pub lost_after_ms: u64,
    /// Line-scan: buffers are consecutive rows of one strip, assembled into frames.
    #[serde(default)]
    pub line_scan: Option<LineScanConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineScanConfig {
    /// Lines per frame.
    pub frame_height: usize,
    /// Lines shared by consecutive frames.
    #[serde(default)]
    pub overlap: usize,
    /// Millimetres of strip per line (encoder-triggered line cameras): verdicts then carry
    /// `position_mm`, the position of their first line.
    #[serde(default)]
    pub line_pitch_mm: Option<f64>,
}

fn sixteen() -> u32 {
    16
}
fn line1() -> String {
    "Line1".into()
}
fn ten() -> f64 {
    10.0
}
fn eight() -> usize {
    8
}
fn three_thousand() -> u64 {
    3000
}

/// Camera pixels to grey: Mono8 as is, Mono16 (little-endian) scaled from `bits`, Bayer 8-bit
/// through a 2x2 box filter (each output pixel averages one of each colour).
pub fn to_grey(
    data: &[u8],
    width: usize,
    height: usize,
    format: GenicamPixelFormat,
    bits: u32,
) -> Result<GrayImage, String> {
    let bytes_per_pixel = if format == GenicamPixelFormat::Mono16 {
        2
    } else {
        1
    };
    let need = width * height * bytes_per_pixel;
    if width == 0 || height == 0 || data.len() < need {
        return Err(format!(
            "camera buffer of {} bytes for a {width}x{height} {} image ({need} bytes)",
            data.len(),
            format.name()
        ));
    }
    let pixels: Vec<u8> = match format {
        GenicamPixelFormat::Mono8 => data[..need].to_vec(),
        GenicamPixelFormat::Mono16 => {
            let max = ((1u32 << bits) - 1) as f32;
            data[..need]
                .chunks_exact(2)
                .map(|p| {
                    let v = u16::from_le_bytes([p[0], p[1]]) as f32;
                    (v.min(max) * 255.0 / max).round() as u8
                })
                .collect()
        }
        _ => {
            let at = |x: usize, y: usize| data[y.min(height - 1) * width + x.min(width - 1)] as u32;
            let mut out = Vec::with_capacity(width * height);
            for y in 0..height {
                for x in 0..width {
                    let (x0, y0) = (x & !1, y & !1);
                    let s = at(x0, y0) + at(x0 + 1, y0) + at(x0, y0 + 1) + at(x0 + 1, y0 + 1);
                    out.push(((s + 2) / 4) as u8);
                }
            }
            out
        }
    };
    Ok(GrayImage::from_raw(width as u32, height as u32, pixels).expect("size checked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_formats_become_grey() {
        let mono = to_grey(&[1, 2, 3, 4, 5, 6], 3, 2, GenicamPixelFormat::Mono8, 16).unwrap();
        assert_eq!(mono.as_raw(), &[1, 2, 3, 4, 5, 6]);
        // 12-bit values in 16-bit words: 4095 is white, 0 black.
        let words: Vec<u8> = [0u16, 4095, 2048, 9999]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let m16 = to_grey(&words, 2, 2, GenicamPixelFormat::Mono16, 12).unwrap();
        assert_eq!(m16.as_raw(), &[0, 255, 128, 255]);
        // A uniform colour under an RG/GB mosaic is uniform grey.
        let bayer = [
            200, 100, 200, 100, 100, 0, 100, 0, 200, 100, 200, 100, 100, 0, 100, 0,
        ];
        let g = to_grey(&bayer, 4, 4, GenicamPixelFormat::BayerRG8, 16).unwrap();
        assert!(g.as_raw().iter().all(|&p| p == 100), "{:?}", g.as_raw());
        let short = to_grey(&[0; 5], 3, 2, GenicamPixelFormat::Mono8, 16).unwrap_err();
        assert!(
            short.contains("5 bytes") && short.contains("3x2"),
            "{short}"
        );
    }
}
