//! Turning a trained model into a signed package for the fleet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use edge_detector::{Detector, ResizeMode};
use protocol::package::{
    GoldenSample, GoldenTolerance, InputSpec, MANIFEST_FORMAT, Manifest, Package, SigningKey,
    WeightsRef,
};
use protocol::{sha256_hex, unix_now};

/// What goes into a package besides the model.
pub struct PackageSpec {
    pub id: String,
    pub version: u64,
    /// Images whose detections the device must reproduce before switching.
    pub golden: Vec<PathBuf>,
    pub tolerance: GoldenTolerance,
    pub metrics: BTreeMap<String, f64>,
    pub min_edge_version: String,
}

/// Reads `mAP@0.5` and `mAP@[.5:.95]` from a `trainer eval` / run `report.json`.
pub fn metrics_from_report(path: &Path) -> Result<BTreeMap<String, f64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let mut out = BTreeMap::new();
    for (key, name) in [("map50", "val_map50"), ("map50_95", "val_map50_95")] {
        if let Some(v) = value.get(key).and_then(|v| v.as_f64()) {
            out.insert(name.to_string(), v);
        }
    }
    if out.is_empty() {
        bail!("{}: no map50 / map50_95 fields", path.display());
    }
    Ok(out)
}

/// Builds the manifest (running the model on the golden images) and signs the package.
pub fn build(
    model: &Path,
    spec: &PackageSpec,
    key: &SigningKey,
    device: &Device,
) -> Result<Package> {
    let weights = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let detector = Detector::from_bytes(weights.clone(), &model.display().to_string(), device)?;
    if spec.golden.is_empty() {
        bail!("at least one golden image is needed: the device self-tests the model on them");
    }
    let mut golden = Vec::new();
    for path in &spec.golden {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let image = image::load_from_memory(&bytes)
            .with_context(|| format!("{}: not an image", path.display()))?
            .into_rgb8();
        let expected = edge_detector::golden::expectations(&detector, &image, &spec.tolerance)
            .map_err(anyhow::Error::msg)?;
        golden.push(GoldenSample {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            image: GoldenSample::encode_image(&bytes),
            expected,
        });
    }
    let config = &detector.config;
    let [height, width] = config.preprocess.input_size;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: spec.id.clone(),
        version: spec.version,
        created_unix: unix_now(),
        architecture: serde_json::to_value(config)?,
        classes: config.classes.clone(),
        input: InputSpec {
            width: width as u32,
            height: height as u32,
            channels: 3,
            resize: match config.preprocess.resize {
                ResizeMode::Stretch => "stretch",
                ResizeMode::Letterbox => "letterbox",
            }
            .into(),
        },
        // What `trainer compress` recorded in the model file's header.
        quantization: edge_detector::quant::quantization_of(&weights),
        pruning: safetensors::SafeTensors::read_metadata(&weights)
            .ok()
            .and_then(|(_, h)| {
                h.metadata()
                    .as_ref()?
                    .get(edge_detector::PRUNING_KEY)
                    .cloned()
            })
            .and_then(|json| serde_json::from_str(&json).ok()),
        metrics: spec.metrics.clone(),
        weights: WeightsRef {
            format: "safetensors".into(),
            size: weights.len() as u64,
            sha256: sha256_hex(&weights),
        },
        min_edge_version: spec.min_edge_version.clone(),
        golden,
        golden_tolerance: spec.tolerance.clone(),
    };
    Ok(Package::build(&manifest, weights, key)?)
}
