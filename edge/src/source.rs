//! Frame sources: one trait, several sources chosen in the config.
//!
//! - [`LineScanAssembler`]: a line camera delivers rows (or bursts of rows) of a fixed width; the
//!   assembler stitches them into frames of H lines with O lines of overlap and stamps each frame
//!   with its strip position (index of its first line), so a defect can be located on the coil.
//! - [`FolderSource`]: replays JPEG/PNG/BMP files at a given rate, once or looping.
//! - [`SyntheticStrip`]: an endless steel strip with NEU-style defects at known positions (ground
//!   truth for tests and benchmarks), fed row-burst by row-burst through the assembler.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edge_detector::synth::{DrawnDefect, Strip};
use image::GrayImage;

/// One frame for the pipeline.
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
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source is unusable (missing device, empty folder): the daemon cannot start on it.
    #[error("{0}")]
    Fatal(String),
    /// One frame is bad (corrupt file, wrong size): logged, counted, skipped.
    #[error("{0}")]
    BadFrame(String),
}

/// A producer of frames. `next_frame` blocks until a frame is ready; `Ok(None)` ends the stream.
pub trait FrameSource: Send {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
    fn describe(&self) -> String;
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

/// Stitches rows into overlapping frames.
pub struct LineScanAssembler {
    width: usize,
    height: usize,
    overlap: usize,
    rows: Vec<u8>,
    /// Strip line of `rows[0]`.
    first_line: u64,
    seq: u64,
}

impl LineScanAssembler {
    pub fn new(width: usize, height: usize, overlap: usize) -> Result<Self, SourceError> {
        if width == 0 || height == 0 || overlap >= height {
            return Err(SourceError::Fatal(format!(
                "line-scan frames of {width}x{height} with {overlap} lines of overlap: need width, height > 0 and overlap < height"
            )));
        }
        Ok(Self {
            width,
            height,
            overlap,
            rows: Vec::with_capacity(width * height * 2),
            first_line: 0,
            seq: 0,
        })
    }

    /// Adds a burst of rows (row-major, `width` bytes each); returns the frames completed.
    pub fn push(&mut self, rows: &[u8]) -> Result<Vec<Frame>, SourceError> {
        if !rows.len().is_multiple_of(self.width) {
            return Err(SourceError::BadFrame(format!(
                "line-scan burst of {} bytes is not a whole number of {}-pixel rows",
                rows.len(),
                self.width
            )));
        }
        self.rows.extend_from_slice(rows);
        let mut frames = Vec::new();
        let frame_bytes = self.width * self.height;
        while self.rows.len() >= frame_bytes {
            let image = GrayImage::from_raw(
                self.width as u32,
                self.height as u32,
                self.rows[..frame_bytes].to_vec(),
            )
            .expect("buffer matches size");
            frames.push(Frame {
                seq: self.seq,
                line: self.first_line,
                captured_ms: now_ms(),
                image,
                origin: "line-scan".into(),
                truth: vec![],
            });
            self.seq += 1;
            let advance = self.height - self.overlap;
            self.rows.drain(..advance * self.width);
            self.first_line += advance as u64;
        }
        Ok(frames)
    }

    /// Lines between the starts of consecutive frames.
    pub fn stride(&self) -> usize {
        self.height - self.overlap
    }
}

/// Replays image files from a folder (sorted by name) at `fps`, once or in a loop.
pub struct FolderSource {
    files: Vec<PathBuf>,
    next: usize,
    looped: bool,
    pace: Pacer,
    seq: u64,
    dir: PathBuf,
}

impl FolderSource {
    pub fn new(dir: &Path, fps: f64, looped: bool) -> Result<Self, SourceError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| SourceError::Fatal(format!("source folder {}: {e}", dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(
                        e.to_ascii_lowercase().as_str(),
                        "jpg" | "jpeg" | "png" | "bmp"
                    )
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(SourceError::Fatal(format!(
                "source folder {}: no JPEG/PNG/BMP files",
                dir.display()
            )));
        }
        Ok(Self {
            files,
            next: 0,
            looped,
            pace: Pacer::new(fps),
            seq: 0,
            dir: dir.to_path_buf(),
        })
    }
}

impl FrameSource for FolderSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.next >= self.files.len() {
            if !self.looped {
                return Ok(None);
            }
            self.next = 0;
        }
        self.pace.wait();
        let path = self.files[self.next].clone();
        self.next += 1;
        let seq = self.seq;
        self.seq += 1;
        let image = image::open(&path)
            .map_err(|e| SourceError::BadFrame(format!("{}: {e}", path.display())))?
            .into_luma8();
        Ok(Some(Frame {
            seq,
            line: 0,
            captured_ms: now_ms(),
            image,
            origin: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            truth: vec![],
        }))
    }

    fn describe(&self) -> String {
        format!(
            "folder {} ({} images)",
            self.dir.display(),
            self.files.len()
        )
    }
}

/// An endless synthetic steel strip, `tiles` NEU-size tiles (200 px) wide. Each tile row is
/// clean steel or, with probability `defect_rate`, carries NEU-style defects of one class;
/// rows come out in bursts through a [`LineScanAssembler`].
pub struct SyntheticStrip {
    strip: Strip,
    defect_rate: f64,
    assembler: LineScanAssembler,
    pending: std::collections::VecDeque<Frame>,
    /// Defects on the strip that a future frame may still contain (strip coordinates).
    truth: Vec<DrawnDefect>,
    pace: Pacer,
    limit: Option<u64>,
}

impl SyntheticStrip {
    /// Frames of `frame_height` lines with `overlap`; `fps` paces them (0: as fast as consumed);
    /// `frames` ends the strip after that many frames.
    pub fn new(
        tiles: usize,
        frame_height: usize,
        overlap: usize,
        defect_rate: f64,
        seed: u64,
        fps: f64,
        frames: Option<u64>,
    ) -> Result<Self, SourceError> {
        let strip = Strip::new(tiles, defect_rate, seed);
        Ok(Self {
            assembler: LineScanAssembler::new(strip.width(), frame_height, overlap)?,
            strip,
            defect_rate: defect_rate.clamp(0.0, 1.0),
            pending: Default::default(),
            truth: vec![],
            pace: Pacer::new(fps),
            limit: frames,
        })
    }

    /// Draws one band of the strip and pushes it through the assembler.
    fn band(&mut self) -> Result<(), SourceError> {
        let band = self.strip.next_band();
        self.truth.extend(band.defects);
        for mut frame in self.assembler.push(&band.pixels)? {
            frame.origin = "synthetic strip".into();
            let (top, bottom) = (
                frame.line as f32,
                (frame.line + frame.image.height() as u64) as f32,
            );
            frame.truth = self
                .truth
                .iter()
                .filter(|d| d.within_lines(top, bottom))
                .map(|d| {
                    let b = d.bbox;
                    (
                        d.class_id,
                        [
                            b[0],
                            (b[1] - top).max(0.0),
                            b[2],
                            (b[3] - top).min(bottom - top),
                        ],
                    )
                })
                .collect();
            self.pending.push_back(frame);
        }
        // Forget defects that no future frame can contain.
        let drawn = band.top + edge_detector::synth::SIZE as u64;
        let keep_from = drawn.saturating_sub(2 * self.assembler.height as u64) as f32;
        self.truth.retain(|d| d.bbox[3] > keep_from);
        Ok(())
    }
}

impl FrameSource for SyntheticStrip {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.limit == Some(0) {
            return Ok(None);
        }
        while self.pending.is_empty() {
            self.band()?;
        }
        self.pace.wait();
        if let Some(n) = self.limit.as_mut() {
            *n -= 1;
        }
        let mut frame = self.pending.pop_front().expect("non-empty");
        frame.captured_ms = now_ms();
        Ok(Some(frame))
    }

    fn describe(&self) -> String {
        format!(
            "synthetic strip {} px wide, defect rate {}",
            self.strip.width(),
            self.defect_rate
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_overlaps_and_positions_frames() {
        let mut a = LineScanAssembler::new(4, 10, 2).unwrap();
        // Row i holds the value i, in bursts of 3 rows.
        let mut frames = vec![];
        for burst in 0..10u8 {
            let rows: Vec<u8> = (0..3).flat_map(|r| [burst * 3 + r; 4]).collect();
            frames.extend(a.push(&rows).unwrap());
        }
        // 30 lines, frames start every 8 lines: 0, 8, 16 (16..26 fits; 24..34 does not).
        assert_eq!(
            frames.iter().map(|f| f.line).collect::<Vec<_>>(),
            vec![0, 8, 16]
        );
        for f in &frames {
            assert_eq!(f.image.dimensions(), (4, 10));
            for y in 0..10 {
                assert_eq!(f.image.get_pixel(0, y).0[0] as u64, f.line + y as u64);
            }
        }
        assert_eq!(
            frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(matches!(a.push(&[1, 2, 3]), Err(SourceError::BadFrame(_))));
        assert!(LineScanAssembler::new(4, 10, 10).is_err());
    }

    #[test]
    fn synthetic_strip_places_truth_inside_frames() {
        let mut s = SyntheticStrip::new(3, 256, 32, 0.5, 7, 0.0, Some(12)).unwrap();
        let mut n = 0;
        let mut with_truth = 0;
        while let Some(f) = s.next_frame().unwrap() {
            assert_eq!(f.image.dimensions(), (600, 256));
            assert_eq!(f.line, n * 224);
            for (c, b) in &f.truth {
                assert!(*c < 6);
                assert!(
                    b[0] >= 0.0 && b[2] <= 600.0 && b[1] >= 0.0 && b[3] <= 256.0 && b[1] < b[3],
                    "{b:?}"
                );
            }
            with_truth += !f.truth.is_empty() as usize;
            n += 1;
        }
        assert_eq!(n, 12);
        assert!(with_truth >= 3, "{with_truth}");
    }

    #[test]
    fn folder_source_errors_name_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let e = FolderSource::new(dir.path(), 0.0, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no JPEG/PNG/BMP"), "{e}");
        std::fs::write(dir.path().join("a.jpg"), b"not a jpeg").unwrap();
        image::GrayImage::new(8, 8)
            .save(dir.path().join("b.png"))
            .unwrap();
        let mut s = FolderSource::new(dir.path(), 0.0, false).unwrap();
        let e = s.next_frame().err().unwrap().to_string();
        assert!(e.contains("a.jpg"), "{e}");
        assert_eq!(s.next_frame().unwrap().unwrap().origin, "b.png");
        assert!(s.next_frame().unwrap().is_none());
    }
}
