//! Image files and buffers decoded strictly, for everything that inspects or trains on them.
//! `image`'s JPEG decoder fills a truncated scan with grey and returns no error, so a JPEG cut
//! short (an interrupted copy, an incomplete camera buffer) would be inspected as if whole:
//! here a JPEG must end its last scan with the end-of-image marker and a PNG must end with its
//! IEND chunk. BMP and the others already refuse truncated data in `image`.

use std::path::Path;

use image::{DynamicImage, ImageFormat};

/// Decodes `bytes`; `name` says where they came from in the error.
pub fn decode(bytes: &[u8], name: &str) -> Result<DynamicImage, String> {
    let format = image::guess_format(bytes)
        .map_err(|e| format!("{name}: not an image ({e}; {} bytes)", bytes.len()))?;
    match format {
        ImageFormat::Jpeg => jpeg_complete(bytes).map_err(|e| format!("{name}: {e}"))?,
        ImageFormat::Png => png_complete(bytes).map_err(|e| format!("{name}: {e}"))?,
        _ => {}
    }
    let image = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("{name}: cannot decode {format:?}: {e}"))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(format!("{name}: empty image (0 pixels)"));
    }
    Ok(image)
}

/// Reads and decodes an image file.
pub fn open(path: &Path) -> Result<DynamicImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode(&bytes, &path.display().to_string())
}

/// A JPEG is complete when an end-of-image marker (FF D9) follows its last start-of-scan
/// (FF DA). Neither can occur inside entropy-coded data (0xFF bytes there are stuffed), and an
/// embedded thumbnail's markers come before the main scan.
pub fn jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    let last_scan = bytes
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .ok_or_else(|| "JPEG has no image data (no start-of-scan marker)".to_string())?;
    if !bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(format!(
            "truncated JPEG: no end-of-image marker after its scan ({} bytes)",
            bytes.len()
        ));
    }
    Ok(())
}

/// A PNG is complete when it ends with its IEND chunk (and that chunk's CRC); `image` decodes
/// a file whose IEND was cut off without a word.
pub fn png_complete(bytes: &[u8]) -> Result<(), String> {
    match bytes.windows(4).rposition(|w| w == b"IEND") {
        Some(at) if at + 8 <= bytes.len() => Ok(()),
        _ => Err(format!(
            "truncated PNG: no complete IEND chunk ({} bytes)",
            bytes.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let img = image::GrayImage::from_fn(64, 48, |x, y| image::Luma([(x * 3 + y * 5) as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        DynamicImage::ImageLuma8(img)
            .write_to(&mut out, format)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn whole_images_decode_and_truncated_ones_are_refused() {
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Bmp] {
            let bytes = encoded(format);
            let img = decode(&bytes, "whole").unwrap();
            assert_eq!((img.width(), img.height()), (64, 48));
            // Cut anywhere after the header: always an error, never an image.
            for keep in [bytes.len() - 2, bytes.len() * 3 / 4, bytes.len() / 2] {
                let e = decode(&bytes[..keep], "cut.img").err().unwrap_or_else(|| {
                    panic!("{format:?} cut to {keep} of {} bytes decoded", bytes.len())
                });
                assert!(e.starts_with("cut.img: "), "{e}");
            }
        }
        let e = decode(b"hello", "x.jpg").unwrap_err();
        assert!(e.contains("x.jpg: not an image"), "{e}");
    }

    /// The real NEU-DET image the fault report used: its first 3,000 bytes are refused.
    #[test]
    fn a_truncated_neu_image_is_refused() {
        let Some(dir) = std::env::var_os("NEU_DET_DIR") else {
            eprintln!("NEU_DET_DIR not set: truncated NEU image test did not run");
            return;
        };
        let images = Path::new(&dir).join("images");
        let mut files: Vec<_> = std::fs::read_dir(&images)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        files.sort();
        let bytes = std::fs::read(&files[0]).unwrap();
        assert!(decode(&bytes, "whole").is_ok());
        let e = decode(&bytes[..3000], "neu-cut.jpg").unwrap_err();
        assert!(e.contains("truncated JPEG"), "{e}");
    }
}
