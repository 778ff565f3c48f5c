//! `trainer compress`: structured channel pruning of the Swin MLPs to a FLOPs target, and INT8
//! weights with a per-layer sensitivity scan.
//!
//! Pruning removes hidden channels of every block's MLP (fc1 output columns, fc1 bias entries,
//! fc2 input rows): the result is a smaller network whose config records the per-block widths
//! (`backbone.mlp_hidden`), not a mask. Importance of hidden channel j of a block:
//! `||fc1[:, j]||_2 * ||fc2[j, :]||_2`, the largest gain with which j can move the block's output
//! (GELU is 1-Lipschitz), a data-free criterion that needs no gradient pass; recovery
//! fine-tuning (`trainer finetune --init pruned.safetensors`) closes the gap. The MLPs hold about
//! two thirds of the backbone's multiply-adds; attention heads are not pruned (see the README).
//!
//! INT8: every Linear and convolution weight (`edge::detector::quant`), except the layers the
//! sensitivity scan finds costly: each candidate is quantized alone and the detector's outputs on
//! calibration images are compared with the FP32 outputs (relative L2 error of the class logits
//! and box distances); layers above the threshold stay F32.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use edge::detector::quant::{self, channel_axis, dequantize_weights, f32_values, quantize_weights};
use edge::detector::{CONFIG_KEY, Detector, DetectorConfig, PRUNING_KEY};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::data::{self, voc::Sample};

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A model file as named F32 tensors plus its header metadata.
struct ModelFile {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: std::collections::HashMap<String, String>,
}

impl ModelFile {
    fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).with_context(|| format!("{origin}: header"))?;
        let st = SafeTensors::deserialize(bytes).with_context(|| format!("{origin}: tensors"))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                bail!(
                    "{origin}: `{name}` is {:?}; compress an FP32 model (prune before quantizing)",
                    view.dtype()
                );
            }
            tensors.insert(name, (view.shape().to_vec(), f32_values(view.data())));
        }
        Ok(Self {
            tensors,
            metadata: header.metadata().clone().unwrap_or_default(),
        })
    }

    fn config(&self) -> Result<DetectorConfig> {
        let json = self
            .metadata
            .get(CONFIG_KEY)
            .context("no detector config in the header: not a detector model file")?;
        Ok(serde_json::from_str(json)?)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let owned: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, (s, v))| (n.clone(), s.clone(), bytes_of(v)))
            .collect();
        let views = owned
            .iter()
            .map(|(n, s, d)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), d)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(safetensors::serialize(views, Some(self.metadata.clone()))?)
    }
}

/// What pruning did, recorded in the package manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    pub method: String,
    pub mlp_keep_fraction: f64,
    pub mlp_hidden: Vec<Vec<usize>>,
    pub macs_before: u64,
    pub macs_after: u64,
    pub params_before: usize,
    pub params_after: usize,
}

/// Widths when each block keeps `keep` of its hidden channels (multiples of 8, at least 8).
fn widths(config: &DetectorConfig, keep: f64) -> Vec<Vec<usize>> {
    let b = &config.backbone;
    b.depths
        .iter()
        .enumerate()
        .map(|(stage, &depth)| {
            (0..depth)
                .map(|block| {
                    let full = b.mlp_hidden_of(stage, block);
                    (((full as f64 * keep) / 8.0).round() as usize * 8).clamp(8, full)
                })
                .collect()
        })
        .collect()
}

/// Prunes MLP hidden channels uniformly across blocks so that the detector's multiply-adds are at
/// most `flops_ratio` of the original's.
pub fn prune(bytes: &[u8], origin: &str, flops_ratio: f64) -> Result<(Vec<u8>, PruneReport)> {
    if !(0.0..1.0).contains(&flops_ratio) || flops_ratio <= 0.0 {
        bail!("--flops {flops_ratio}: give the FLOPs to keep as a fraction in (0, 1)");
    }
    let config = ModelFile::parse(bytes, origin)?.config()?;
    let macs_before = config.macs();
    let macs_at = |keep: f64| {
        let mut c = config.clone();
        c.backbone.mlp_hidden = widths(&config, keep);
        c.macs()
    };
    let floor = macs_at(0.0) as f64 / macs_before as f64;
    if floor > flops_ratio {
        bail!(
            "--flops {flops_ratio}: pruning MLP channels alone reaches {floor:.2} at most for this model"
        );
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if (macs_at(mid) as f64) <= flops_ratio * macs_before as f64 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    prune_keep(bytes, origin, lo)
}

/// Keeps the `keep` fraction of each block's MLP hidden channels (rounded to multiples of 8),
/// the most important ones.
pub fn prune_keep(bytes: &[u8], origin: &str, keep: f64) -> Result<(Vec<u8>, PruneReport)> {
    let mut file = ModelFile::parse(bytes, origin)?;
    let mut config = file.config()?;
    let macs_before = config.macs();
    let params_before: usize = file.tensors.values().map(|(_, v)| v.len()).sum();
    let new_widths = widths(&config, keep);
    for (stage, blocks) in new_widths.iter().enumerate() {
        for (block, &width) in blocks.iter().enumerate() {
            let prefix = format!("backbone.layers.{stage}.blocks.{block}.mlp");
            let get = |file: &ModelFile, n: &str| {
                file.tensors
                    .get(&format!("{prefix}.{n}"))
                    .cloned()
                    .with_context(|| format!("{origin}: `{prefix}.{n}` missing"))
            };
            let (s1, w1) = get(&file, "fc1.weight")?; // [C, H]
            let (_, b1) = get(&file, "fc1.bias")?; // [H]
            let (s2, w2) = get(&file, "fc2.weight")?; // [H, C]
            let (c, h) = (s1[0], s1[1]);
            if s2 != [h, c] {
                bail!("{origin}: `{prefix}` fc1 {s1:?} and fc2 {s2:?} do not pair");
            }
            let importance: Vec<f64> = (0..h)
                .map(|j| {
                    let a: f64 = (0..c).map(|i| (w1[i * h + j] as f64).powi(2)).sum();
                    let b: f64 = (0..c).map(|i| (w2[j * c + i] as f64).powi(2)).sum();
                    (a * b).sqrt()
                })
                .collect();
            let mut order: Vec<usize> = (0..h).collect();
            order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]));
            let mut kept: Vec<usize> = order[..width].to_vec();
            kept.sort_unstable();
            let w1n: Vec<f32> = (0..c)
                .flat_map(|i| kept.iter().map(move |&j| (i, j)))
                .map(|(i, j)| w1[i * h + j])
                .collect();
            let b1n: Vec<f32> = kept.iter().map(|&j| b1[j]).collect();
            let w2n: Vec<f32> = kept
                .iter()
                .flat_map(|&j| w2[j * c..(j + 1) * c].iter().copied())
                .collect();
            file.tensors
                .insert(format!("{prefix}.fc1.weight"), (vec![c, width], w1n));
            file.tensors
                .insert(format!("{prefix}.fc1.bias"), (vec![width], b1n));
            file.tensors
                .insert(format!("{prefix}.fc2.weight"), (vec![width, c], w2n));
        }
    }
    config.backbone.mlp_hidden = new_widths.clone();
    let report = PruneReport {
        method: "mlp-channels-l2-product".into(),
        mlp_keep_fraction: keep,
        mlp_hidden: new_widths,
        macs_before,
        macs_after: config.macs(),
        params_before,
        params_after: file.tensors.values().map(|(_, v)| v.len()).sum(),
    };
    file.metadata
        .insert(CONFIG_KEY.into(), serde_json::to_string(&config)?);
    file.metadata
        .insert(PRUNING_KEY.into(), serde_json::to_string(&report)?);
    Ok((file.to_bytes()?, report))
}

/// One layer's sensitivity: output error with only that layer quantized.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sensitivity {
    pub layer: String,
    pub params: usize,
    pub error: f64,
}

/// Names of the weights INT8 would quantize.
fn quantizable(file: &ModelFile) -> Vec<String> {
    file.tensors
        .iter()
        .filter(|(n, (s, _))| channel_axis(n, s).is_some())
        .map(|(n, _)| n.clone())
        .collect()
}

/// The model with `names` rounded through INT8 (the numbers a quantized file loads as).
fn fake_quantized(file: &ModelFile, names: &[String]) -> ModelFile {
    let mut tensors = file.tensors.clone();
    for name in names {
        let (shape, values) = &file.tensors[name];
        let axis = channel_axis(name, shape).expect("a quantizable weight");
        let (q, scales) = quantize_weights(values, shape, axis);
        let values = dequantize_weights(&q, &scales, shape, axis);
        tensors.insert(name.clone(), (shape.clone(), values));
    }
    ModelFile {
        tensors,
        metadata: file.metadata.clone(),
    }
}

/// Class logits and box distances of a calibration batch, flattened.
fn outputs(detector: &Detector, input: &Tensor<4>) -> Vec<f32> {
    let out = detector.model.forward(input.clone());
    let mut v: Vec<f32> = out.cls_logits.into_data().try_to_vec().unwrap_or_default();
    v.extend(
        out.box_ltrb
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default(),
    );
    v
}

fn relative_error(a: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(reference)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-12)).sqrt()
}

/// What INT8 quantization did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantSummary {
    pub scheme: String,
    pub quantized: usize,
    pub kept_fp32: Vec<String>,
    pub threshold: f64,
    pub error_all_int8: f64,
    pub error_final: f64,
    pub scan: Vec<Sensitivity>,
}

/// INT8 with a sensitivity scan on `calibration` (images from the dataset): layers whose solo
/// output error exceeds `threshold` stay F32. Returns the quantized file.
pub fn quantize(
    bytes: &[u8],
    origin: &str,
    calibration: &[Sample],
    threshold: f64,
    device: &Device,
) -> Result<(Vec<u8>, QuantSummary)> {
    let file = ModelFile::parse(bytes, origin)?;
    let reference = Detector::from_bytes(bytes.to_vec(), origin, device)?;
    let preprocess = &reference.config.preprocess;
    let indices: Vec<usize> = (0..calibration.len()).collect();
    let batch = data::loader::make_batch(
        calibration,
        &indices,
        preprocess,
        None,
        &vec![0; indices.len()],
    )?;
    let [h, w] = preprocess.input_size;
    let input = Tensor::<4>::from_data(
        TensorData::new(batch.pixels, [batch.count, 3, h, w]),
        device,
    );
    let expected = outputs(&reference, &input);
    let error_of = |names: &[String]| -> Result<f64> {
        let variant = fake_quantized(&file, names).to_bytes()?;
        let detector = Detector::from_bytes(variant, origin, device)?;
        Ok(relative_error(&outputs(&detector, &input), &expected))
    };
    let candidates = quantizable(&file);
    let bar = crate::progress::bar(candidates.len() as u64, "sensitivity scan");
    let mut scan = vec![];
    for name in &candidates {
        let error = error_of(std::slice::from_ref(name))?;
        scan.push(Sensitivity {
            layer: name.clone(),
            params: file.tensors[name].1.len(),
            error,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let keep: HashSet<String> = scan
        .iter()
        .filter(|s| s.error > threshold)
        .map(|s| s.layer.clone())
        .collect();
    let chosen: Vec<String> = candidates
        .iter()
        .filter(|n| !keep.contains(*n))
        .cloned()
        .collect();
    let error_all_int8 = error_of(&candidates)?;
    let error_final = error_of(&chosen)?;
    let (out, report) = quant::quantize(bytes, origin, &|n| keep.contains(n))?;
    scan.sort_by(|a, b| b.error.total_cmp(&a.error));
    Ok((
        out,
        QuantSummary {
            scheme: "int8-per-channel".into(),
            quantized: report.quantized.len(),
            kept_fp32: report.kept,
            threshold,
            error_all_int8,
            error_final,
            scan,
        },
    ))
}
