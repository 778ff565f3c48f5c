//! Compression on a real (small) detector: pruning really removes channels and, when the removed
//! channels carry nothing, leaves the outputs unchanged; INT8 files are smaller, load on the CPU
//! backend and stay close to FP32; bad inputs are named.

use burn::prelude::*;
use burn::tensor::Distribution;
use edge_detector::{Detector, DetectorConfig, SwinConfig};
use safetensors::SafeTensors;

fn nano(device: &Device) -> Detector {
    let mut config = DetectorConfig::edge_neu();
    config.backbone = SwinConfig::nano().with_img_size([96, 96]);
    config.preprocess.input_size = [96, 96];
    Detector::new(config, device).unwrap()
}

fn outputs(d: &Detector, input: &Tensor<4>) -> Vec<f32> {
    let out = d.model.forward(input.clone());
    let mut v: Vec<f32> = out.cls_logits.into_data().try_to_vec().unwrap();
    v.extend(out.box_ltrb.into_data().try_to_vec::<f32>().unwrap());
    v
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The model file with `edit(name, shape, bytes)` applied to every tensor's F32 bytes.
fn rewrite(bytes: &[u8], edit: impl Fn(&str, &[usize], &mut [u8])) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut data = view.data().to_vec();
            edit(&name, view.shape(), &mut data);
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<_> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, header.metadata().clone()).unwrap()
}

/// Zeroes the rows `zero(row)` of a tensor (a row: everything of one output channel).
fn zero_rows(shape: &[usize], data: &mut [u8], zero: impl Fn(usize) -> bool) {
    let per = data.len() / shape[0];
    for o in (0..shape[0]).filter(|&o| zero(o)) {
        data[o * per..(o + 1) * per].fill(0);
    }
}

/// Zeroes fc2 rows of every other hidden channel: those channels contribute nothing.
fn zero_odd_channels(bytes: &[u8]) -> Vec<u8> {
    rewrite(bytes, |name, shape, data| {
        if name.ends_with("mlp.fc2.weight") {
            zero_rows(shape, data, |j| j % 2 == 1);
        }
    })
}

/// Makes every other pyramid and neck channel and every other GroupNorm group of the towers
/// carry nothing (weights and bias of what writes it zeroed; a tower group's gamma and beta
/// zeroed, so it leaves the ReLU as 0).
fn zero_odd_head_channels(bytes: &[u8]) -> Vec<u8> {
    let group = 4; // edge_neu: 64 channels in 16 groups
    rewrite(bytes, |name, shape, data| {
        if name.starts_with("head.lateral.") || name.starts_with("head.smooth.") {
            zero_rows(shape, data, |o| o % 2 == 1);
        }
        if name.contains("_tower.") && name.contains(".norm.") {
            zero_rows(shape, data, |o| (o / group) % 2 == 1);
        }
    })
}

/// A nano detector's file with `zero` applied, a random input and the file's outputs on it.
fn zeroed_nano(zero: fn(&[u8]) -> Vec<u8>) -> (Device, Vec<u8>, Tensor<4>, Vec<f32>) {
    let device = Device::flex();
    let bytes = zero(&nano(&device).to_bytes().unwrap());
    let original = Detector::from_bytes(bytes.clone(), "zeroed", &device).unwrap();
    let input = Tensor::<4>::random([2, 3, 96, 96], Distribution::Default, &device);
    let expected = outputs(&original, &input);
    (device, bytes, input, expected)
}

#[test]
fn pruning_removes_channels_and_keeps_what_matters() {
    let (device, bytes, input, expected) = zeroed_nano(zero_odd_channels);

    let (pruned, report) = trainer::compress::prune_keep(&bytes, "zeroed", 0.5).unwrap();
    assert_eq!(
        report.mlp_hidden,
        vec![vec![32], vec![64], vec![128], vec![256]]
    );
    assert!(report.macs_after < report.macs_before);
    assert!(report.params_after < report.params_before);
    let small = Detector::from_bytes(pruned, "pruned", &device).unwrap();
    assert_eq!(small.config.backbone.mlp_hidden, report.mlp_hidden);
    assert_eq!(small.config.macs(), report.macs_after);
    assert_eq!(small.model.num_params(), report.params_after);
    // The kept channels are exactly the ones that carry the signal.
    let diff = max_abs_diff(&outputs(&small, &input), &expected);
    assert!(diff < 1e-4, "pruned outputs moved by {diff}");

    // A FLOPs target is met; one pruning alone cannot reach is refused with the reason.
    let (_, r) = trainer::compress::prune(&bytes, "zeroed", 0.95).unwrap();
    assert!(r.macs_after as f64 <= 0.95 * r.macs_before as f64);
    assert!(r.macs_after as f64 > 0.9 * r.macs_before as f64);
    let e = trainer::compress::prune(&bytes, "zeroed", 0.05)
        .unwrap_err()
        .to_string();
    assert!(e.contains("reaches") && e.contains("at most"), "{e}");
}

#[test]
fn head_pruning_removes_channels_and_keeps_what_matters() {
    let (device, bytes, input, expected) = zeroed_nano(zero_odd_head_channels);

    let (pruned, report) = trainer::compress::prune_head(&bytes, "zeroed", 0.5).unwrap();
    assert_eq!(report.widths_before, vec![64, 64, 64, 64]);
    assert_eq!(report.widths_after, vec![32, 32, 32, 32]);
    assert!(report.macs_after < report.macs_before);
    let small = Detector::from_bytes(pruned.clone(), "pruned", &device).unwrap();
    assert_eq!(small.config.head.widths, Some(report.widths_after.clone()));
    assert_eq!(small.config.macs(), report.macs_after);
    assert_eq!(small.model.num_params(), report.params_after);
    assert_eq!(
        small.model.head.cls_tower[0].norm.num_groups, 8,
        "groups of 4 kept whole"
    );
    let diff = max_abs_diff(&outputs(&small, &input), &expected);
    assert!(diff < 1e-4, "pruned outputs moved by {diff}");

    // MLP pruning after it keeps the head's record and widths.
    let (both, _) = trainer::compress::prune_keep(&pruned, "pruned", 0.5).unwrap();
    let (_, header) = SafeTensors::read_metadata(&both).unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["pruning"]).unwrap();
    assert_eq!(
        record["head"]["widths_after"],
        serde_json::json!([32, 32, 32, 32])
    );
    assert_eq!(record["mlp_hidden"][0], serde_json::json!([32]));
    let both = Detector::from_bytes(both, "both", &device).unwrap();
    assert_eq!(both.config.head.widths, Some(vec![32, 32, 32, 32]));

    let e = trainer::compress::prune_head(&bytes, "zeroed", 1.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--head-keep"), "{e}");
}

/// Makes every odd attention head of every block write nothing (its rows of the output
/// projection zeroed). The nano backbone's heads are 16 wide in stages 0 and 1, 32 in 2 and 3.
fn zero_odd_heads(bytes: &[u8]) -> Vec<u8> {
    rewrite(bytes, |name, shape, data| {
        if name.ends_with("attn.proj.weight") {
            let wide = name.contains("layers.2.") || name.contains("layers.3.");
            let head_dim = if wide { 32 } else { 16 };
            zero_rows(shape, data, |row| (row / head_dim) % 2 == 1);
        }
    })
}

#[test]
fn attention_head_pruning_removes_heads_and_keeps_what_matters() {
    let (device, bytes, input, expected) = zeroed_nano(zero_odd_heads);

    let (pruned, report) = trainer::compress::prune_attention(&bytes, "zeroed", 0.5).unwrap();
    // nano: heads 1-2-2-4, one block per stage; a block keeps at least one head.
    assert_eq!(
        report.heads_before,
        vec![vec![1], vec![2], vec![2], vec![4]]
    );
    assert_eq!(report.heads_after, vec![vec![1], vec![1], vec![1], vec![2]]);
    assert_eq!(
        report.kept,
        vec![
            vec![vec![0]],
            vec![vec![0]],
            vec![vec![0]],
            vec![vec![0, 2]]
        ],
        "the heads that write nothing go first"
    );
    assert!(report.macs_after < report.macs_before);
    let mut small = Detector::from_bytes(pruned.clone(), "pruned", &device).unwrap();
    assert_eq!(
        small.config.backbone.attn_heads,
        Some(report.heads_after.clone())
    );
    assert_eq!(small.config.macs(), report.macs_after);
    assert_eq!(small.model.num_params(), report.params_after);
    let attn = &small.model.backbone.layers[3].blocks[0].attn;
    assert_eq!(attn.qkv.weight.dims(), [128, 3 * 2 * 32]);
    assert_eq!(attn.proj.weight.dims(), [2 * 32, 128]);
    assert_eq!(attn.relative_position_bias_table.dims()[1], 2);
    // Our window-attention kernel (the default on this CPU) and the explicit matmul-softmax
    // path both run the narrower blocks and agree with the unpruned model.
    let diff = max_abs_diff(&outputs(&small, &input), &expected);
    assert!(diff < 1e-4, "pruned outputs (kernel) moved by {diff}");
    small
        .model
        .backbone
        .set_attention_impl(edge_detector::AttentionImpl::Explicit);
    let diff = max_abs_diff(&outputs(&small, &input), &expected);
    assert!(diff < 1e-4, "pruned outputs (explicit) moved by {diff}");
    // INT8 of the narrower qkv/proj loads and runs through the INT8 kernel.
    let (int8, _) = edge_detector::quant::quantize(&pruned, "pruned", &|_| false).unwrap();
    let int8 = Detector::from_bytes(int8, "pruned int8", &device).unwrap();
    let rel = {
        let got = outputs(&int8, &input);
        let num: f32 = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        let den: f32 = expected.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    };
    assert!(rel < 0.05, "INT8 of the pruned model: relative error {rel}");

    // MLP pruning after it keeps the attention record and head counts.
    let (both, _) = trainer::compress::prune_keep(&pruned, "pruned", 0.5).unwrap();
    let (_, header) = SafeTensors::read_metadata(&both).unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["pruning"]).unwrap();
    assert_eq!(
        record["attention"]["heads_after"][3],
        serde_json::json!([2])
    );
    let both = Detector::from_bytes(both, "both", &device).unwrap();
    assert_eq!(both.config.backbone.attn_heads, Some(report.heads_after));

    let e = trainer::compress::prune_attention(&bytes, "zeroed", 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--attn-keep"), "{e}");
}

#[test]
fn int8_files_are_smaller_load_here_and_stay_close() {
    let device = Device::flex();
    let mut config = DetectorConfig::edge_neu();
    config.backbone = SwinConfig::edge().with_img_size([96, 96]);
    config.preprocess.input_size = [96, 96];
    let detector = Detector::new(config, &device).unwrap();
    let bytes = detector.to_bytes().unwrap();
    let input = Tensor::<4>::random([2, 3, 96, 96], Distribution::Default, &device);
    let expected = outputs(&detector, &input);

    let (q, report) =
        edge_detector::quant::quantize(&bytes, "m", &|n: &str| n == "head.reg_out.weight").unwrap();
    assert_eq!(report.kept, vec!["head.reg_out.weight".to_string()]);
    assert!(report.quantized.len() > 40);
    let ratio = bytes.len() as f64 / q.len() as f64;
    assert!(ratio > 3.5, "only {ratio:.2}x smaller");
    assert_eq!(
        edge_detector::quant::quantization_of(&q),
        "int8-per-channel"
    );
    let loaded = Detector::from_bytes(q.clone(), "int8", &device).unwrap();
    let got = outputs(&loaded, &input);
    let num: f32 = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).powi(2))
        .sum();
    let den: f32 = expected.iter().map(|b| b * b).sum();
    let rel = (num / den).sqrt();
    assert!(rel > 0.0 && rel < 0.02, "relative output error {rel}");

    // Quantizing twice, or pruning a quantized file, is refused by name.
    let e = edge_detector::quant::quantize(&q, "q.safetensors", &|_: &str| false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q.safetensors") && e.contains("already INT8"),
        "{e}"
    );
    let e = trainer::compress::prune(&q, "q.safetensors", 0.9)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prune before quantizing"), "{e}");

    // A scale tensor that is missing or wrong is a named error at load.
    let st = SafeTensors::deserialize(&q).unwrap();
    let (_, header) = SafeTensors::read_metadata(&q).unwrap();
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "head.smooth.0.weight.int8_scale")
        .collect();
    let broken = safetensors::serialize(views, header.metadata().clone()).unwrap();
    let e = Detector::from_bytes(broken, "broken.safetensors", &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("broken.safetensors") && e.contains("head.smooth.0.weight.int8_scale"),
        "{e}"
    );
}
