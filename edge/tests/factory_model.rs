//! The factory-default model that ships in edge/models/: signed by the release key committed
//! beside it, INT8 as its manifest says, and it passes its own golden self-test on the
//! CPU backend, as a device does before it activates it.

use std::path::Path;

use burn::prelude::*;

/// edge/models/, the factory package, the release key beside it, and the manifest it verifies to.
fn factory() -> (
    std::path::PathBuf,
    protocol::package::Package,
    protocol::package::VerifyingKey,
    protocol::package::Manifest,
) {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let package = protocol::package::Package::read(&models.join("neu-edge.edgepkg")).unwrap();
    let key = std::fs::read_to_string(models.join("release.pub")).unwrap();
    let key = protocol::package::parse_public_key(key.trim()).unwrap();
    let manifest = package.verify(&[key]).unwrap();
    (models, package, key, manifest)
}

#[test]
fn shipped_factory_package_verifies_and_self_tests() {
    let (models, package, key, manifest) = factory();
    assert_eq!(manifest.id, "neu-edge");
    assert_eq!(manifest.quantization, "int8-per-channel");
    assert!(
        manifest.metrics["val_map50"] > 0.5,
        "{:?}",
        manifest.metrics
    );
    assert!(package.weights.len() < 6 << 20, "a few MB");
    let detector = edge_detector::golden::load_and_check(
        &manifest,
        package.weights.clone(),
        "neu-edge.edgepkg",
        &Device::flex(),
    )
    .unwrap();
    assert_eq!(detector.config.classes, edge_detector::NEU_CLASSES);

    // Tools load the package directly (`edge detect --model`, `trainer eval --model`).
    let direct =
        edge_detector::Detector::load(models.join("neu-edge.edgepkg"), &Device::flex()).unwrap();
    assert_eq!(direct.config, detector.config);
    let e = edge_detector::Detector::load(models.join("release.pub"), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(e.contains("release.pub"), "{e}");

    // The example config trusts the release key and installs this package.
    let config = edge::config::EdgeConfig::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/edge.toml"),
    )
    .unwrap();
    assert_eq!(
        config.models.factory.unwrap().canonicalize().unwrap(),
        models.join("neu-edge.edgepkg").canonicalize().unwrap()
    );
    assert!(
        config
            .models
            .trusted_keys
            .contains(&protocol::package::public_key_hex(&key))
    );
}

/// The factory model is INT8: on a CPU with AVX2 its Linear layers compute in INT8
/// (`edge_detector::int8`). Their outputs stay within quantization error of the same weights
/// computed in float, and the detections the line sees are the same.
#[test]
fn int8_compute_matches_float_compute_on_the_factory_model() {
    let (models, package, _, manifest) = factory();
    let int8 =
        edge_detector::Detector::load(models.join("neu-edge.edgepkg"), &Device::flex()).unwrap();
    let mut float = int8.clone();
    assert_eq!(float.model.backbone.use_int8(&|_| false), 0);
    if !edge_detector::int8::Int8Linear::supported() {
        eprintln!("no AVX2 on this CPU: both run in float");
        return;
    }
    // The INT8 weights of the file compute in INT8: the backbone's 4 Linear layers per block
    // and 3 merges; the head's 3x3 convolutions but `reg_out`, which the sensitivity scan kept
    // in F32 (the patch embedding and the 1x1 laterals are faster in float).
    assert_eq!(float.model.head.use_int8(&|_| false), 0);
    let mut check = float.clone();
    assert_eq!(check.model.backbone.use_int8(&|_| true), 4 * 8 + 3);
    assert_eq!(check.model.head.use_int8(&|_| true), 3 + 2 + 2 + 2);
    let quantized = package.weights.clone();
    let (_, names) = edge_detector::quant::dequantize(quantized, "factory").unwrap();
    assert_eq!(names.len(), 1 + 4 * 8 + 3 + 3 + 3 + 2 + 2 + 1, "{names:?}");
    assert!(!names.contains(&"head.reg_out.weight".to_string()));

    let mut agreed = 0;
    let mut total = 0;
    for sample in &manifest.golden {
        let image = image::load_from_memory(&sample.image_bytes().unwrap())
            .unwrap()
            .into_rgb8();
        let view = edge_detector::ImageView::rgb(&image);
        let (input, _) = int8.config.preprocess.batch(&[view], &int8.device).unwrap();
        let a = int8.model.forward(input.clone()).cls_logits;
        let b = float.model.forward(input).cls_logits;
        let a = a.into_data().try_to_vec::<f32>().unwrap();
        let b = b.into_data().try_to_vec::<f32>().unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let spread = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            diff < 0.05 * spread,
            "{}: INT8 logits differ from float by {diff} (largest logit {spread})",
            sample.name
        );
        assert!(a != b, "{}: the INT8 path did not run", sample.name);
        let top = |d: &edge_detector::Detector| {
            d.detect(&[edge_detector::ImageView::rgb(&image)]).unwrap()[0]
                .iter()
                .filter(|d| d.score >= 0.3)
                .map(|d| d.class_id)
                .collect::<Vec<_>>()
        };
        total += 1;
        agreed += (top(&int8) == top(&float)) as usize;
    }
    assert!(total > 0, "the manifest has golden samples");
    assert_eq!(
        agreed, total,
        "detections above 0.3 differ between INT8 and float"
    );
}
