//! Capture: where frames come from. One trait ([`FrameSource`]), the sources chosen by
//! `[source] kind` in the config, and the line-scan assembly that turns rows into frames.
//!
//! - [`linescan::LineScanAssembler`]: a line camera delivers rows (or bursts of rows) of a fixed
//!   width; the assembler stitches them into frames of H lines with O lines of overlap and stamps
//!   each frame with its strip position (index of its first line), so a defect can be located on
//!   the coil.
//! - [`folder::FolderSource`]: replays JPEG/PNG/BMP files at a given rate, once or looping.
//! - [`synthetic::SyntheticStrip`]: an endless steel strip with NEU-style defects at known
//!   positions (ground truth for tests and benchmarks), fed through the assembler.
//! - `camera::CameraSource` (feature `camera`): a V4L2/UVC camera through nokhwa.
//! - `aravis_source::GenicamSource` (feature `genicam`): a GigE Vision / USB3 Vision camera
//!   through Aravis, area or line-scan ([`genicam`] holds its configuration).

#[cfg(feature = "genicam")]
pub mod aravis_source;
#[cfg(feature = "camera")]
pub mod camera;
pub mod folder;
pub mod genicam;
pub mod linescan;
pub mod synthetic;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::GrayImage;
use serde::Deserialize;

pub use folder::FolderSource;
pub use linescan::LineScanAssembler;
pub use synthetic::SyntheticStrip;

#[derive(Clone, Debug)]
pub struct Frame {
    /// Sequence number from the source (monotonic).
    pub seq: u64,
    /// Strip position: index of the frame's first line since the source started (line-scan),
    /// or 0 for area sources.
    pub line: u64,
    /// Unix milliseconds when the frame was complete.
    pub captured_ms: u64,
    pub image: GrayImage,
    /// Where it came from (file name, "strip"), for logs and the store.
    pub origin: String,
    /// Known defects (synthetic sources only), in frame pixels: (class, box).
    pub truth: Vec<(usize, [f32; 4])>,
    /// Strip position of the first line in millimetres (line-scan sources with a line pitch).
    pub position_mm: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source is unusable (missing device, empty folder): the daemon cannot start on it.
    #[error("{0}")]
    Fatal(String),
    /// One frame is bad (corrupt or truncated file, incomplete buffer, wrong size): it gets
    /// the fail-safe verdict (undecided, cause `bad_frame`), logged and counted.
    #[error("{origin}: {reason}")]
    BadFrame { origin: String, reason: String },
}

/// A producer of frames. `next_frame` blocks until a frame is ready; `Ok(None)` ends the stream.
pub trait FrameSource: Send {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
    fn describe(&self) -> String;
    /// Adds the source's own counters to `/metrics` (cameras: buffers, losses).
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Releases at most `fps` frames per second (0: no limit).
struct Pacer {
    period: Option<Duration>,
    last: Option<Instant>,
}

impl Pacer {
    fn new(fps: f64) -> Self {
        Self {
            period: (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps)),
            last: None,
        }
    }

    fn wait(&mut self) {
        if let (Some(period), Some(last)) = (self.period, self.last) {
            let due = last + period;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        self.last = Some(Instant::now());
    }
}

/// Frame sources, chosen by `kind`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Replays JPEG/PNG/BMP files from a folder (sorted by name).
    Folder {
        path: PathBuf,
        /// Frames per second; 0: as fast as the pipeline takes them.
        #[serde(default)]
        fps: f64,
        /// Start again after the last file.
        #[serde(default, rename = "loop")]
        looped: bool,
    },
    /// A synthetic steel strip with NEU-style defects at known positions.
    Synthetic {
        /// Strip width in 200-pixel tiles.
        #[serde(default = "one")]
        tiles: usize,
        /// Lines per frame and lines shared by consecutive frames.
        #[serde(default = "two_hundred")]
        frame_height: usize,
        #[serde(default)]
        overlap: usize,
        /// Probability that a 200x200 tile carries defects.
        #[serde(default = "defect_rate")]
        defect_rate: f64,
        #[serde(default)]
        seed: u64,
        #[serde(default)]
        fps: f64,
        /// Stop after this many frames (absent: endless).
        #[serde(default)]
        frames: Option<u64>,
    },
    /// A V4L2/UVC camera (cargo feature `camera`, on by default).
    Camera {
        /// Device index (/dev/videoN).
        #[serde(default)]
        index: u32,
        width: u32,
        height: u32,
        #[serde(default = "thirty")]
        fps: u32,
        /// What the camera sends; frames are converted to grey either way.
        #[serde(default)]
        pixel_format: PixelFormat,
    },
    /// A GenICam camera (GigE Vision, USB3 Vision) through Aravis (cargo feature `genicam`).
    Genicam(genicam::GenicamConfig),
}

/// Camera pixel formats (V4L2 fourcc).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    #[default]
    Mjpeg,
    Yuyv,
    Nv12,
    Gray,
    Rgb,
}

fn one() -> usize {
    1
}
fn two_hundred() -> usize {
    200
}
fn defect_rate() -> f64 {
    0.3
}
fn thirty() -> u32 {
    30
}

/// Opens the configured source; a source that cannot work is an error naming it.
pub fn open_source(config: &SourceConfig) -> Result<Box<dyn FrameSource>, String> {
    let fatal = |e: SourceError| format!("source: {e}");
    Ok(match config {
        SourceConfig::Folder { path, fps, looped } => {
            Box::new(FolderSource::new(path, *fps, *looped).map_err(fatal)?)
        }
        SourceConfig::Synthetic {
            tiles,
            frame_height,
            overlap,
            defect_rate,
            seed,
            fps,
            frames,
        } => Box::new(
            SyntheticStrip::new(
                *tiles,
                *frame_height,
                *overlap,
                *defect_rate,
                *seed,
                *fps,
                *frames,
            )
            .map_err(fatal)?,
        ),
        #[cfg(feature = "camera")]
        SourceConfig::Camera {
            index,
            width,
            height,
            fps,
            pixel_format,
        } => Box::new(
            camera::CameraSource::open(*index, *width, *height, *fps, *pixel_format)
                .map_err(fatal)?,
        ),
        #[cfg(feature = "genicam")]
        SourceConfig::Genicam(c) => {
            Box::new(aravis_source::GenicamSource::open(c.clone()).map_err(fatal)?)
        }
        #[cfg(not(feature = "genicam"))]
        SourceConfig::Genicam(_) => {
            return Err(
                "source: genicam: this edge was built without the `genicam` feature (needs libaravis-dev); rebuild with default features".into(),
            );
        }
        #[cfg(not(feature = "camera"))]
        SourceConfig::Camera { index, .. } => {
            return Err(format!(
                "source: camera /dev/video{index}: this edge was built without the `camera` feature; rebuild with default features or use kind = \"folder\" or \"synthetic\""
            ));
        }
    })
}
