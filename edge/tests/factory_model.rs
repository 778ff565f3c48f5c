//! The factory-default model that ships in edge/models/: signed by the release key committed
//! beside it, INT8 as its manifest says, and it passes its own golden self-test on the
//! CPU backend, as a device does before it activates it.

use std::path::Path;

use burn::prelude::*;

#[test]
fn shipped_factory_package_verifies_and_self_tests() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let package = protocol::package::Package::read(&models.join("neu-edge.edgepkg")).unwrap();
    let key = std::fs::read_to_string(models.join("release.pub")).unwrap();
    let key = protocol::package::parse_public_key(key.trim()).unwrap();
    let manifest = package.verify(&[key]).unwrap();
    assert_eq!(manifest.id, "neu-edge");
    assert_eq!(manifest.quantization, "int8-per-channel");
    assert!(
        manifest.metrics["val_map50"] > 0.5,
        "{:?}",
        manifest.metrics
    );
    assert!(package.weights.len() < 6 << 20, "a few MB");
    let detector = edge::selftest::load_and_check(
        &manifest,
        package.weights.clone(),
        "neu-edge.edgepkg",
        &Device::flex(),
    )
    .unwrap();
    assert_eq!(detector.config.classes, edge::detector::NEU_CLASSES);

    // Tools load the package directly (`edge detect --model`, `trainer eval --model`).
    let direct =
        edge::detector::Detector::load(models.join("neu-edge.edgepkg"), &Device::flex()).unwrap();
    assert_eq!(direct.config, detector.config);
    let e = edge::detector::Detector::load(models.join("release.pub"), &Device::flex())
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
