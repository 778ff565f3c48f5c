//! A folder of image files replayed as frames.

use std::path::{Path, PathBuf};

use super::{Frame, FrameSource, Pacer, SourceError, now_ms};

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
        let origin = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&path).map_err(|e| SourceError::BadFrame {
            origin: origin.clone(),
            reason: format!("{}: {e}", path.display()),
        })?;
        let image = edge_detector::image_io::decode(&bytes, &path.display().to_string())
            .map_err(|reason| SourceError::BadFrame {
                origin: origin.clone(),
                reason,
            })?
            .into_luma8();
        Ok(Some(Frame {
            seq,
            line: 0,
            captured_ms: now_ms(),
            image,
            origin,
            truth: vec![],
            position_mm: None,
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

#[cfg(test)]
mod tests {
    use super::*;

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
