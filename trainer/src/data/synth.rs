//! Synthetic NEU-DET-style data written as JPEG + VOC XML in the NEU-DET layout: what a fresh
//! clone's tests and demo train on. The drawing itself is `edge_detector::synth` (the daemon's synthetic
//! strip uses it too).

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;

pub use edge_detector::synth::{DrawnDefect, SIZE, generate};

use super::voc::DataError;

/// Writes `per_class` images of each class, and `clean` defect-free images (`clean_N`, an
/// annotation without objects: what a detector must learn to pass), to `out/images` and
/// `out/annotations`.
pub fn write_dataset(
    out: &Path,
    classes: &[String],
    per_class: usize,
    clean: usize,
    seed: u64,
) -> Result<usize, DataError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source: std::io::Error| DataError::Io { path, source }
    };
    let images = out.join("images");
    let annotations = out.join("annotations");
    std::fs::create_dir_all(&images).map_err(io(&images))?;
    std::fs::create_dir_all(&annotations).map_err(io(&annotations))?;
    let mut written = 0;
    let jobs = classes
        .iter()
        .enumerate()
        .map(|(id, name)| (id, name.as_str(), per_class))
        .chain(std::iter::once((usize::MAX, "clean", clean)));
    for (class_id, name, count) in jobs {
        for i in 1..=count {
            // One stream per image, so any single image can be regenerated alone.
            let mut rng = StdRng::seed_from_u64(seed ^ ((class_id as u64) << 32) ^ i as u64);
            let (image, defects) = generate(class_id, &mut rng);
            let stem = format!("{name}_{i}");
            let image_path = images.join(format!("{stem}.jpg"));
            image.save(&image_path).map_err(|e| DataError::Invalid {
                path: image_path.display().to_string(),
                reason: e.to_string(),
            })?;
            let xml_path = annotations.join(format!("{stem}.xml"));
            std::fs::write(
                &xml_path,
                edge_detector::voc::voc_xml(
                    &format!("{stem}.jpg"),
                    SIZE,
                    SIZE,
                    "synthetic NEU-DET",
                    &defects
                        .iter()
                        .map(|d| (classes[d.class_id].as_str(), d.bbox))
                        .collect::<Vec<_>>(),
                ),
            )
            .map_err(io(&xml_path))?;
            written += 1;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::voc;

    #[test]
    fn written_set_loads_back_with_boxes_of_its_class() {
        let dir = tempfile::tempdir().unwrap();
        let classes: Vec<String> = edge_detector::NEU_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(write_dataset(dir.path(), &classes, 3, 0, 5).unwrap(), 18);
        let data = voc::load(dir.path(), &classes).unwrap();
        assert_eq!(data.samples.len(), 18);
        assert!(data.warnings.is_empty(), "{:?}", data.warnings);
        for s in &data.samples {
            assert!(!s.objects.is_empty(), "{} has no defect", s.stem);
            let class = s.name_class(&classes).unwrap();
            assert!(s.objects.iter().all(|o| o.class_id == class));
        }
    }
}
