//! The Swin backbone against timm: random weights and reference outputs written by
//! `scripts/fixtures/make_swin_fixture.py`; every stage and the final features must agree to 1e-4.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use edge_detector::{AttentionImpl, SwinConfig};
use safetensors::SafeTensors;

/// The device the parity checks run on: Flex unless `EDGE_TEST_DEVICE` names another compiled
/// in (`EDGE_TEST_DEVICE=wgpu cargo test --features wgpu ...`), so GPUs get the same check.
fn test_device() -> Device {
    let name = std::env::var("EDGE_TEST_DEVICE").unwrap_or_else(|_| "flex".into());
    let choice = <edge_detector::device::DeviceChoice as clap::ValueEnum>::from_str(&name, true)
        .unwrap_or_else(|e| panic!("EDGE_TEST_DEVICE={name}: {e}"));
    choice.device().unwrap_or_else(|e| panic!("{e}"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tensor<const D: usize>(file: &SafeTensors, key: &str, device: &Device) -> Tensor<D> {
    let view = file
        .tensor(key)
        .unwrap_or_else(|e| panic!("reference {key}: {e}"));
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let shape: [usize; D] = view.shape().try_into().expect("rank");
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar::<f32>()
}

/// Runs the parity check on a fixture folder, returning the largest difference per output.
fn parity(dir: &Path, attention: AttentionImpl) -> Vec<(String, f32)> {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let list = |k: &str| -> Vec<usize> {
        cfg[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    };
    let img = list("img_size");
    let config = SwinConfig::new()
        .with_img_size([img[0], img[1]])
        .with_embed_dim(cfg["embed_dim"].as_u64().unwrap() as usize)
        .with_depths(list("depths"))
        .with_num_heads(list("num_heads"))
        .with_window_size(cfg["window_size"].as_u64().unwrap() as usize);
    let device = test_device();
    let mut model = config.init(&device);
    model.set_attention_impl(attention);

    // The window plan (window and shift per block) must be timm's.
    let plan: Vec<Vec<([usize; 2], [usize; 2])>> = cfg["window_plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|stage| {
            stage
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let v = |i: usize, j: usize| b[i][j].as_u64().unwrap() as usize;
                    ([v(0, 0), v(0, 1)], [v(1, 0), v(1, 1)])
                })
                .collect()
        })
        .collect();
    assert_eq!(
        model.window_plan(),
        plan,
        "window/shift plan differs from timm"
    );

    model
        .load_timm(dir.join("weights.safetensors"))
        .expect("load timm weights");
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let input: Tensor<4> = tensor(&reference, "input", &device);
    let features = model.forward(input);
    let mut diffs = Vec::new();
    for (i, stage) in features.stages.into_iter().enumerate() {
        let expected: Tensor<4> = tensor(&reference, &format!("stage{i}"), &device);
        diffs.push((format!("stage{i}"), max_abs_diff(stage, expected)));
    }
    let expected: Tensor<4> = tensor(&reference, "final", &device);
    diffs.push(("final".into(), max_abs_diff(features.last_normed, expected)));
    diffs
}

fn assert_within(diffs: &[(String, f32)], tolerance: f32) {
    eprintln!("max |diff| vs timm: {diffs:?}");
    for (name, diff) in diffs {
        assert!(
            diff.is_finite() && *diff <= tolerance,
            "{name}: max |diff| {diff} > {tolerance}"
        );
    }
}

#[test]
fn small_swin_matches_timm_with_our_attention_kernel() {
    assert_within(&parity(&fixture("swin_small"), AttentionImpl::Kernel), 1e-4);
}

#[test]
fn small_swin_matches_timm_fused_attention() {
    assert_within(&parity(&fixture("swin_small"), AttentionImpl::Fused), 1e-4);
}

#[test]
fn small_swin_matches_timm_explicit_attention() {
    assert_within(
        &parity(&fixture("swin_small"), AttentionImpl::Explicit),
        1e-4,
    );
}

/// swin_tiny at 224 (28 M parameters, not committed): generate with
/// `python scripts/fixtures/make_swin_fixture.py --tiny --out DIR`, then
/// `SWIN_TINY_FIXTURE=DIR cargo test --release -p edge --test swin_parity -- --ignored`.
#[test]
#[ignore = "needs SWIN_TINY_FIXTURE, a fixture generated locally"]
fn tiny_swin_matches_timm() {
    let dir =
        std::env::var("SWIN_TINY_FIXTURE").expect("set SWIN_TINY_FIXTURE to the fixture folder");
    for attention in [AttentionImpl::Kernel, AttentionImpl::Fused] {
        assert_within(&parity(Path::new(&dir), attention), 1e-4);
    }
}
