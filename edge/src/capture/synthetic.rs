//! The synthetic steel strip as a frame source: bands of [`Strip`] through the line-scan
//! assembler, each frame carrying the defects it shows (ground truth for tests and benchmarks).

use edge_detector::synth::{DrawnDefect, Strip};

use super::{Frame, FrameSource, LineScanAssembler, Pacer, SourceError, now_ms};

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
        let keep_from = drawn.saturating_sub(2 * self.assembler.height() as u64) as f32;
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
}
