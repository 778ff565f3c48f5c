//! Pascal VOC / NEU-DET datasets on disk: `images/NAME.{jpg,png,bmp}` paired with
//! `annotations/NAME.xml` by file stem. The XML's own `<filename>` and `<depth>` are ignored
//! (NEU-DET gets both wrong); sizes come from the image file itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One labeled image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub stem: String,
    pub image_path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub objects: Vec<Object>,
}

impl Sample {
    /// The image-level class of a NEU-style file name (`crazing_12` -> `crazing`), if it is one
    /// of `classes`: used for label-free representation checks, never for training.
    pub fn name_class(&self, classes: &[String]) -> Option<usize> {
        let (prefix, _) = self.stem.rsplit_once('_')?;
        classes.iter().position(|c| c == prefix)
    }
}

/// A labeled box in image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub class_id: usize,
    /// x1, y1, x2, y2.
    pub bbox: [f32; 4],
    /// VOC's `difficult`: ignored by evaluation (neither a miss nor a match).
    pub difficult: bool,
    /// The box's identity during training, for the trainer's per-box bookkeeping (noisy-label
    /// filtering); `None` when not tracked. Not read from or written to files.
    pub id: Option<u32>,
    /// A region the training loss ignores (neither defect nor background): a pseudo-label the
    /// teacher was unsure of. Not read from or written to files.
    pub ignore: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn invalid(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A dataset on disk, with what was skipped and why.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
    /// Human-readable notes on what was dropped (degenerate boxes, images without XML...).
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
struct XmlAnnotation {
    #[serde(rename = "object", default)]
    objects: Vec<XmlObject>,
}

#[derive(Deserialize)]
struct XmlObject {
    name: String,
    #[serde(default)]
    difficult: Option<String>,
    bndbox: XmlBox,
}

#[derive(Deserialize)]
struct XmlBox {
    xmin: String,
    ymin: String,
    xmax: String,
    ymax: String,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "bmp"];

/// The JPEG/PNG/BMP files directly in `dir` (any case of extension), by file stem, sorted.
pub fn list_images(dir: &Path) -> Result<BTreeMap<String, PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut images = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()));
        if let (true, Some(stem)) = (is_image, path.file_stem().and_then(|s| s.to_str())) {
            images.insert(stem.to_string(), path.clone());
        }
    }
    Ok(images)
}

/// Reads a VOC-layout folder. `classes` fixes the class ids; an object of another class is an
/// error naming the file (a label set that does not match the model is not something to skip).
pub fn load(root: &Path, classes: &[String]) -> Result<Dataset, DataError> {
    let images_dir = root.join("images");
    let annotations_dir = root.join("annotations");
    let images = list_images(&images_dir)?;
    let mut warnings = Vec::new();
    let mut samples = Vec::with_capacity(images.len());
    for (stem, image_path) in images {
        let xml_path = annotations_dir.join(format!("{stem}.xml"));
        if !xml_path.exists() {
            warnings.push(format!(
                "{}: no annotation {}, skipped",
                image_path.display(),
                xml_path.display()
            ));
            continue;
        }
        let (width, height) = image::image_dimensions(&image_path)
            .map_err(|e| invalid(&image_path, format!("cannot read image: {e}")))?;
        let objects = parse_annotation(&xml_path, classes, width, height, &mut warnings)?;
        samples.push(Sample {
            stem,
            image_path,
            width,
            height,
            objects,
        });
    }
    if samples.is_empty() {
        return Err(invalid(
            root,
            "no image with an annotation under images/ and annotations/",
        ));
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes: classes.to_vec(),
        samples,
        warnings,
    })
}

/// Every image in a folder, without labels (SimCLR reads only pixels): `folder/*` when
/// `flat`, else `folder/images/*` (a VOC folder, whose annotations are not read). `classes`
/// only serves file-name stratification of splits, so that they match the labeled runs'.
pub fn load_images_only(
    folder: &Path,
    flat: bool,
    classes: &[String],
) -> Result<Dataset, DataError> {
    let dir = if flat {
        folder.to_path_buf()
    } else {
        folder.join("images")
    };
    let images = list_images(&dir)?;
    let mut samples = Vec::with_capacity(images.len());
    for (stem, image_path) in images {
        let (width, height) = image::image_dimensions(&image_path)
            .map_err(|e| invalid(&image_path, format!("cannot read image: {e}")))?;
        samples.push(Sample {
            stem,
            image_path,
            width,
            height,
            objects: Vec::new(),
        });
    }
    if samples.is_empty() {
        return Err(invalid(&dir, "no JPEG/PNG/BMP images"));
    }
    Ok(Dataset {
        root: folder.to_path_buf(),
        classes: classes.to_vec(),
        samples,
        warnings: Vec::new(),
    })
}

/// Parses one VOC XML file; boxes are clipped to the image, degenerate ones dropped with a
/// warning naming the file.
pub fn parse_annotation(
    xml_path: &Path,
    classes: &[String],
    width: u32,
    height: u32,
    warnings: &mut Vec<String>,
) -> Result<Vec<Object>, DataError> {
    let text = std::fs::read_to_string(xml_path).map_err(|source| DataError::Io {
        path: xml_path.display().to_string(),
        source,
    })?;
    let parsed: XmlAnnotation = quick_xml::de::from_str(&text)
        .map_err(|e| invalid(xml_path, format!("malformed annotation: {e}")))?;
    let mut objects = Vec::with_capacity(parsed.objects.len());
    for (i, o) in parsed.objects.iter().enumerate() {
        let name = o.name.trim();
        let class_id = classes.iter().position(|c| c == name).ok_or_else(|| {
            invalid(
                xml_path,
                format!(
                    "object {}: unknown class `{name}` (known: {})",
                    i + 1,
                    classes.join(", ")
                ),
            )
        })?;
        let coord = |field: &str, value: &str| -> Result<f32, DataError> {
            value
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    invalid(
                        xml_path,
                        format!("object {}: <{field}> is `{value}`, not a number", i + 1),
                    )
                })
        };
        let b = &o.bndbox;
        let raw = [
            coord("xmin", &b.xmin)?,
            coord("ymin", &b.ymin)?,
            coord("xmax", &b.xmax)?,
            coord("ymax", &b.ymax)?,
        ];
        let bbox = [
            raw[0].clamp(0.0, width as f32),
            raw[1].clamp(0.0, height as f32),
            raw[2].clamp(0.0, width as f32),
            raw[3].clamp(0.0, height as f32),
        ];
        if bbox[2] - bbox[0] < 1.0 || bbox[3] - bbox[1] < 1.0 {
            warnings.push(format!(
                "{}: object {} ({name}) box {:?} is degenerate inside the {}x{} image, dropped",
                xml_path.display(),
                i + 1,
                raw,
                width,
                height
            ));
            continue;
        }
        let difficult = o.difficult.as_deref().map(str::trim) == Some("1");
        objects.push(Object {
            class_id,
            bbox,
            difficult,
            id: None,
            ignore: false,
        });
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        vec!["crazing".into(), "scratches".into()]
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn clips_and_drops_degenerate_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let xml = write(
            dir.path(),
            "a.xml",
            "<annotation><filename>wrong</filename><object><name>scratches</name><difficult>1</difficult>\
             <bndbox><xmin>-5</xmin><ymin>10</ymin><xmax>250</xmax><ymax>40</ymax></bndbox></object>\
             <object><name>crazing</name><bndbox><xmin>30</xmin><ymin>30</ymin><xmax>30</xmax><ymax>90</ymax></bndbox></object>\
             </annotation>",
        );
        let mut warnings = Vec::new();
        let objects = parse_annotation(&xml, &classes(), 200, 200, &mut warnings).unwrap();
        assert_eq!(
            objects,
            vec![Object {
                class_id: 1,
                bbox: [0.0, 10.0, 200.0, 40.0],
                difficult: true,
                id: None,
                ignore: false,
            }]
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("a.xml") && warnings[0].contains("object 2"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn malformed_xml_names_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let xml = write(
            dir.path(),
            "b.xml",
            "<annotation><object><name>crazing</name><bndbox><xmin>1</xmin></bndbox></object></annotation>",
        );
        let err = parse_annotation(&xml, &classes(), 200, 200, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.xml") && err.contains("ymin"), "{err}");
        let xml = write(
            dir.path(),
            "c.xml",
            "<annotation><object><name>crazing</name>",
        );
        let err = parse_annotation(&xml, &classes(), 200, 200, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.xml") && err.contains("malformed"), "{err}");
        let xml = write(
            dir.path(),
            "d.xml",
            "<annotation><object><name>dent</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>",
        );
        let err = parse_annotation(&xml, &classes(), 200, 200, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d.xml") && err.contains("unknown class `dent`"),
            "{err}"
        );
        let xml = write(
            dir.path(),
            "e.xml",
            "<annotation><object><name>crazing</name><bndbox><xmin>1</xmin><ymin>x</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>",
        );
        let err = parse_annotation(&xml, &classes(), 200, 200, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("e.xml") && err.contains("<ymin> is `x`"),
            "{err}"
        );
    }
}
