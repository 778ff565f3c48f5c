//! Model files and bad inputs: a saved detector reloads to the same outputs; damaged weights
//! and bad images give errors that name the tensor or the image, never a panic.

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;
use edge_detector::{Detector, DetectorConfig, HeadConfig, ImageView, SwinConfig};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn small_config() -> DetectorConfig {
    let mut config = DetectorConfig::edge_neu();
    config.backbone = SwinConfig::nano();
    config.head = HeadConfig::new().with_dim(32).with_norm_groups(8);
    config.preprocess.input_size = [64, 64];
    config.score_threshold = 0.0;
    config
}

fn grey_image(seed: u8) -> image::GrayImage {
    image::GrayImage::from_fn(80, 60, |x, y| {
        image::Luma([(x as u8).wrapping_mul(3) ^ (y as u8).wrapping_add(seed)])
    })
}

#[test]
fn saved_detector_reloads_to_identical_detections() {
    let device = Device::flex();
    let detector = Detector::new(small_config(), &device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    detector.save(&path).unwrap();
    let loaded = Detector::load(&path, &device).unwrap();
    assert_eq!(loaded.config, detector.config);
    let images = [grey_image(1), grey_image(7)];
    let views: Vec<ImageView> = images.iter().map(ImageView::grey).collect();
    let a = detector.detect(&views).unwrap();
    let b = loaded.detect(&views).unwrap();
    assert_eq!(a.len(), 2);
    assert!(!a[0].is_empty(), "score threshold 0 keeps candidates");
    assert_eq!(a, b);
    // Boxes are in the original image's pixels.
    for d in a.iter().flatten() {
        assert!(
            d.x1 >= 0.0 && d.x2 <= 80.0 && d.y1 >= 0.0 && d.y2 <= 60.0,
            "{d:?}"
        );
    }
}

#[test]
fn bad_images_are_refused_with_their_index() {
    let detector = Detector::new(small_config(), &Device::flex()).unwrap();
    let good = grey_image(0);
    let pixels = vec![0u8; 40];
    let two_channels = ImageView {
        width: 4,
        height: 5,
        channels: 2,
        pixels: &pixels,
    };
    let err = detector
        .detect(&[ImageView::grey(&good), two_channels])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image 1") && err.contains("2 channels"),
        "{err}"
    );
    let empty = ImageView {
        width: 0,
        height: 0,
        channels: 3,
        pixels: &[],
    };
    let err = detector.detect(&[empty]).unwrap_err().to_string();
    assert!(
        err.contains("image 0") && err.contains("zero-size"),
        "{err}"
    );
}

/// Rewrites a SafeTensors file through `edit`, which may drop, reshape or change tensors.
fn rewrite(
    bytes: &[u8],
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>,
) -> Vec<u8> {
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let file = SafeTensors::deserialize(bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        if let Some((shape, data)) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            owned.push((name, shape, data));
        }
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let metadata: Option<HashMap<String, String>> = header.metadata().clone();
    safetensors::serialize(views, metadata).unwrap()
}

fn timm_fixture() -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/swin_small/weights.safetensors"),
    )
    .unwrap()
}

fn fixture_backbone() -> edge_detector::SwinTransformer {
    SwinConfig::new()
        .with_img_size([112, 84])
        .with_embed_dim(16)
        .with_depths(vec![2, 2, 2, 2])
        .with_num_heads(vec![1, 2, 4, 8])
        .init(&Device::flex())
}

#[test]
fn timm_checkpoint_with_a_missing_key_names_it() {
    let bytes = rewrite(&timm_fixture(), |name, shape, data| {
        (name != "layers.2.blocks.1.mlp.fc2.weight").then_some((shape, data))
    });
    let err = fixture_backbone()
        .load_timm_bytes(bytes, "ckpt.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ckpt.safetensors") && err.contains("layers.2.blocks.1.mlp.fc2.weight"),
        "{err}"
    );
}

#[test]
fn timm_checkpoint_with_a_wrong_shape_names_key_and_shapes() {
    let bytes = rewrite(&timm_fixture(), |name, shape, data| {
        if name == "layers.1.blocks.0.attn.qkv.bias" {
            Some((vec![shape[0] - 3], data[..data.len() - 12].to_vec()))
        } else {
            Some((shape, data))
        }
    });
    let err = fixture_backbone()
        .load_timm_bytes(bytes, "ckpt.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.1.blocks.0.attn.qkv.bias") && err.contains("96") && err.contains("93"),
        "{err}"
    );
}

#[test]
fn nan_weights_are_refused_naming_the_tensor() {
    let bytes = rewrite(&timm_fixture(), |name, shape, mut data| {
        if name == "norm.weight" {
            data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((shape, data))
    });
    let err = fixture_backbone()
        .load_timm_bytes(bytes, "ckpt.safetensors")
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm.weight") && err.contains("NaN"), "{err}");
}

#[test]
fn a_timm_checkpoint_is_not_a_detector_model_file() {
    let err = Detector::from_bytes(timm_fixture(), "timm.safetensors", &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("timm.safetensors") && err.contains("detector_config"),
        "{err}"
    );
    let err = Detector::from_bytes(b"garbage".to_vec(), "junk.bin", &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("junk.bin") && err.contains("not a SafeTensors file"),
        "{err}"
    );
}
