//! Line-scan assembly: rows from a line camera stitched into overlapping frames, each stamped
//! with its position on the strip.

use image::GrayImage;

use super::{Frame, SourceError, now_ms};

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
            return Err(SourceError::BadFrame {
                origin: "line-scan".into(),
                reason: format!(
                    "line-scan burst of {} bytes is not a whole number of {}-pixel rows",
                    rows.len(),
                    self.width
                ),
            });
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
                position_mm: None,
            });
            self.seq += 1;
            let advance = self.height - self.overlap;
            self.rows.drain(..advance * self.width);
            self.first_line += advance as u64;
        }
        Ok(frames)
    }

    /// Pixels per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Lines per frame.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Lines between the starts of consecutive frames.
    pub fn stride(&self) -> usize {
        self.height - self.overlap
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
        assert!(matches!(
            a.push(&[1, 2, 3]),
            Err(SourceError::BadFrame { .. })
        ));
        assert!(LineScanAssembler::new(4, 10, 10).is_err());
    }
}
