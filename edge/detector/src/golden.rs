//! Golden-sample self-test: a package carries images with the detections its model gave at
//! packaging time; before a device switches to the model it must reproduce them.

use burn::prelude::*;
use protocol::package::{ExpectedDetection, GoldenSample, GoldenTolerance, Manifest};

use crate::{Detection, Detector, ImageView};

/// Loads the weights and runs the golden samples; the error says which sample and box failed.
pub fn load_and_check(
    manifest: &Manifest,
    weights: Vec<u8>,
    origin: &str,
    device: &Device,
) -> Result<Detector, String> {
    let detector = Detector::from_bytes(weights, origin, device).map_err(|e| e.to_string())?;
    if detector.config.classes != manifest.classes {
        return Err(format!(
            "model classes {:?} differ from the manifest's {:?}",
            detector.config.classes, manifest.classes
        ));
    }
    check(&detector, &manifest.golden, &manifest.golden_tolerance)?;
    Ok(detector)
}

/// Runs every golden sample through `detector`.
pub fn check(
    detector: &Detector,
    golden: &[GoldenSample],
    tol: &GoldenTolerance,
) -> Result<(), String> {
    for sample in golden {
        let bytes = sample.image_bytes().map_err(|e| e.to_string())?;
        let image =
            crate::image_io::decode(&bytes, &format!("golden sample {}", sample.name))?.into_rgb8();
        let got = detector
            .detect(&[ImageView::rgb(&image)])
            .map_err(|e| format!("golden sample {}: {e}", sample.name))?
            .remove(0);
        compare(detector, &sample.name, &sample.expected, &got, tol)?;
    }
    Ok(())
}

/// The detections to expect on an image: those scoring at least `tol.min_score`.
pub fn expectations(
    detector: &Detector,
    image: &image::RgbImage,
    tol: &GoldenTolerance,
) -> Result<Vec<ExpectedDetection>, String> {
    let got = detector
        .detect(&[ImageView::rgb(image)])
        .map_err(|e| e.to_string())?
        .remove(0);
    Ok(got
        .iter()
        .filter(|d| d.score >= tol.min_score)
        .map(|d| ExpectedDetection {
            class: detector.config.classes[d.class_id].clone(),
            score: d.score,
            bbox: [d.x1, d.y1, d.x2, d.y2],
        })
        .collect())
}

fn compare(
    detector: &Detector,
    name: &str,
    expected: &[ExpectedDetection],
    got: &[Detection],
    tol: &GoldenTolerance,
) -> Result<(), String> {
    let class = |d: &Detection| detector.config.classes[d.class_id].as_str();
    let boxed = |d: &Detection| [d.x1, d.y1, d.x2, d.y2];
    let mut used = vec![false; got.len()];
    for e in expected {
        let hit = got.iter().enumerate().position(|(i, d)| {
            !used[i]
                && class(d) == e.class
                && (d.score - e.score).abs() <= tol.score
                && crate::nms::box_iou(boxed(d), e.bbox) >= tol.iou
        });
        match hit {
            Some(i) => used[i] = true,
            None => {
                return Err(format!(
                    "golden sample {name}: expected {} {:.2} at {:?} not reproduced",
                    e.class, e.score, e.bbox
                ));
            }
        }
    }
    if let Some((_, d)) = got
        .iter()
        .enumerate()
        .find(|(i, d)| !used[*i] && d.score >= tol.min_score + tol.score)
    {
        return Err(format!(
            "golden sample {name}: unexpected {} {:.2} at {:?}",
            class(d),
            d.score,
            boxed(d)
        ));
    }
    Ok(())
}
