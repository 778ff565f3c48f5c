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
    // A decoder bug must not take the caller down: zune-jpeg 0.5.15 panics in its AVX2 IDCT on
    // some malformed JPEGs (found by the `images` fuzz target; the input is in its corpus).
    let decoded = std::panic::catch_unwind(|| image::load_from_memory_with_format(bytes, format))
        .map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("{name}: the {format:?} decoder failed on this file ({what})")
    })?;
    let image = decoded.map_err(|e| format!("{name}: cannot decode {format:?}: {e}"))?;
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

    /// The committed seeds of the `images` fuzz target (`protocol/fuzz/corpus/images`): a small
    /// grey and colour image in each format. `FUZZ_CORPUS_WRITE=1` rewrites them.
    #[test]
    fn fuzz_seeds_are_committed_and_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../protocol/fuzz/corpus/images");
        let write = std::env::var_os("FUZZ_CORPUS_WRITE").is_some();
        if write {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let grey = image::GrayImage::from_fn(32, 24, |x, y| image::Luma([(x * 7 + y * 3) as u8]));
        let rgb = image::RgbImage::from_fn(24, 16, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 13) as u8, ((x + y) * 5) as u8])
        });
        for (name, img, format) in [
            (
                "grey.jpg",
                DynamicImage::ImageLuma8(grey.clone()),
                ImageFormat::Jpeg,
            ),
            (
                "grey.png",
                DynamicImage::ImageLuma8(grey.clone()),
                ImageFormat::Png,
            ),
            ("grey.bmp", DynamicImage::ImageLuma8(grey), ImageFormat::Bmp),
            (
                "rgb.jpg",
                DynamicImage::ImageRgb8(rgb.clone()),
                ImageFormat::Jpeg,
            ),
            ("rgb.png", DynamicImage::ImageRgb8(rgb), ImageFormat::Png),
        ] {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, format).unwrap();
            let bytes = out.into_inner();
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (FUZZ_CORPUS_WRITE=1)", path.display()));
            assert!(
                committed == bytes,
                "{} is stale (FUZZ_CORPUS_WRITE=1)",
                path.display()
            );
            assert!(decode(&committed, name).is_ok());
        }
    }

    /// A malformed JPEG on which zune-jpeg's AVX2 IDCT panics (found by fuzzing): an error.
    #[test]
    fn a_decoder_panic_is_an_error() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../protocol/fuzz/corpus/images/regress-zune-jpeg-avx2-idct-panic.jpg");
        let bytes = std::fs::read(path).unwrap();
        assert!(decode(&bytes, "crash.jpg").is_err());
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
