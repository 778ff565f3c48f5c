//! The Swin backbone against timm: random weights and reference outputs written by
//! `scripts/fixtures/make_swin_fixture.py`; every stage and the final features must agree to 1e-4.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use edge_detector::AttentionImpl;

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

/// Runs the parity check on a fixture folder, returning the largest difference per output.
fn parity(dir: &Path, attention: AttentionImpl) -> Vec<(String, f32)> {
    edge_detector::parity::timm_parity(dir, &test_device(), attention)
        .unwrap_or_else(|e| panic!("{e}"))
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
/// `SWIN_TINY_FIXTURE=DIR cargo test --release -p edge-detector --test swin_parity -- --ignored`.
#[test]
#[ignore = "needs SWIN_TINY_FIXTURE, a fixture generated locally"]
fn tiny_swin_matches_timm() {
    let dir =
        std::env::var("SWIN_TINY_FIXTURE").expect("set SWIN_TINY_FIXTURE to the fixture folder");
    for attention in [AttentionImpl::Kernel, AttentionImpl::Fused] {
        assert_within(&parity(Path::new(&dir), attention), 1e-4);
    }
}
