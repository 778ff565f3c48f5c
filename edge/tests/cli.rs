//! The `edge` binary as a user runs it: a model file and real JPEGs in, one JSON line per
//! image out; a corrupt image is an error that names the file.

use std::process::Command;

use burn::prelude::*;
use edge_detector::{Detector, DetectorConfig, HeadConfig, SwinConfig};

fn small_model(dir: &std::path::Path) -> std::path::PathBuf {
    let mut config = DetectorConfig::edge_neu();
    config.backbone = SwinConfig::nano();
    config.head = HeadConfig::new().with_dim(32).with_norm_groups(8);
    config.preprocess.input_size = [64, 64];
    config.score_threshold = 0.0;
    config.max_detections = 5;
    let path = dir.join("model.safetensors");
    Detector::new(config, &Device::flex())
        .unwrap()
        .save(&path)
        .unwrap();
    path
}

#[test]
fn detect_prints_one_json_line_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let grey = dir.path().join("strip.jpg");
    image::GrayImage::from_fn(120, 90, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]))
        .save(&grey)
        .unwrap();
    let rgb = dir.path().join("color.png");
    image::RgbImage::from_fn(50, 70, |x, y| image::Rgb([x as u8, y as u8, 128]))
        .save(&rgb)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["detect", "--model"])
        .arg(&model)
        .arg(&grey)
        .arg(&rgb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["image"].as_str().unwrap().ends_with("strip.jpg"));
    let detections = lines[1]["detections"].as_array().unwrap();
    assert_eq!(
        detections.len(),
        5,
        "threshold 0 keeps max_detections boxes"
    );
    for d in detections {
        let b: Vec<f64> = d["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            b[0] >= 0.0 && b[2] <= 50.0 && b[1] >= 0.0 && b[3] <= 70.0,
            "box inside the 50x70 image: {b:?}"
        );
        assert!(edge_detector::NEU_CLASSES.contains(&d["class"].as_str().unwrap()));
    }
}

#[test]
fn corrupt_image_and_missing_model_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["detect", "--model"])
        .arg(&model)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.jpg"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["detect", "--model", "/nonexistent/m.safetensors"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/m.safetensors"),
        "{err}"
    );
}
