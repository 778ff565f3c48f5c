//! `trainer compress`: compress a detector: prune neck/head channels, attention heads and MLP channels (then
//! recover with `finetune --init OUT`), and/or store weights as INT8 after a per-layer
//! sensitivity scan.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::prelude::*;
use edge_detector::Detector;

use super::shrinkage;

#[derive(clap::Args)]
pub struct Args {
    /// FP32 detector model file.
    #[arg(long)]
    model: PathBuf,
    /// Output model file.
    #[arg(long)]
    out: PathBuf,
    /// Keep this fraction of the detector's multiply-adds by removing MLP hidden channels
    /// (e.g. 0.7); absent: no pruning.
    #[arg(long)]
    flops: Option<f64>,
    /// Keep this fraction of the neck's and head's channels (pyramid, smoothing outputs and
    /// tower layers, the towers in whole GroupNorm groups), the most important by weight
    /// norms (network slimming for the towers); applied before --flops. E.g. 0.5.
    #[arg(long)]
    head_keep: Option<f64>,
    /// Keep this fraction of each Swin block's attention heads (at least one per block), the
    /// most important by ||value weights|| x ||output-projection weights||; whole heads go,
    /// with their qkv columns, proj rows and bias-table column. Applied after --head-keep,
    /// before --flops. E.g. 0.5.
    #[arg(long)]
    attn_keep: Option<f64>,
    /// Store Linear and convolution weights as INT8 (symmetric, per output channel).
    #[arg(long)]
    int8: bool,
    /// Dataset whose validation images calibrate the sensitivity scan (needed with --int8).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Calibration images for the scan.
    #[arg(long, default_value_t = 16)]
    calibration_images: usize,
    /// Layers whose INT8 version alone moves the outputs by more than this relative L2 error
    /// stay FP32.
    #[arg(long, default_value_t = 0.003)]
    sensitivity: f64,
    /// Seed of the fixed train/validation split (the one training used; default 42).
    #[arg(long, default_value_t = 42)]
    split_seed: u64,
    /// Fraction of images per class held out for validation (as in training).
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let Args {
        model,
        out,
        flops,
        head_keep,
        attn_keep,
        int8,
        data,
        calibration_images,
        sensitivity,
        split_seed,
        val_fraction,
    } = args;

    if flops.is_none() && head_keep.is_none() && attn_keep.is_none() && !int8 {
        anyhow::bail!(
            "nothing to do: give --flops RATIO, --head-keep FRACTION, --attn-keep FRACTION and/or --int8"
        );
    }
    let origin = model.display().to_string();
    let mut bytes = std::fs::read(&model).with_context(|| format!("reading {origin}"))?;
    let mut summary = serde_json::Map::new();
    if let Some(keep) = head_keep {
        let (pruned, report) = crate::compress::prune_head(&bytes, &origin, keep)?;
        println!(
            "pruned head channels (widths {:?} -> {:?}): {}",
            report.widths_before,
            report.widths_after,
            shrinkage(
                report.macs_before,
                report.macs_after,
                report.params_before,
                report.params_after
            )
        );
        summary.insert("head_pruning".into(), serde_json::to_value(&report)?);
        bytes = pruned;
    }
    if let Some(keep) = attn_keep {
        let (pruned, report) = crate::compress::prune_attention(&bytes, &origin, keep)?;
        println!(
            "pruned attention heads ({:?} -> {:?}): {}",
            report.heads_before,
            report.heads_after,
            shrinkage(
                report.macs_before,
                report.macs_after,
                report.params_before,
                report.params_after
            )
        );
        summary.insert("attention_pruning".into(), serde_json::to_value(&report)?);
        bytes = pruned;
    }
    if let Some(ratio) = flops {
        let (pruned, report) = crate::compress::prune(&bytes, &origin, ratio)?;
        println!(
            "pruned MLP channels (keep {:.1}%): {}",
            100.0 * report.mlp_keep_fraction,
            shrinkage(
                report.macs_before,
                report.macs_after,
                report.params_before,
                report.params_after
            )
        );
        summary.insert("pruning".into(), serde_json::to_value(&report)?);
        bytes = pruned;
    }
    if int8 {
        let data = data.context("--int8 needs --data (calibration images)")?;
        let classes = Detector::from_bytes(bytes.clone(), &origin, device)?
            .config
            .classes;
        let dataset = crate::data::voc::load(&data, &classes)?;
        let val = crate::data::split(&dataset, val_fraction, split_seed).1;
        let step = (val.len() / calibration_images.max(1)).max(1);
        let calibration: Vec<_> = val
            .iter()
            .step_by(step)
            .take(calibration_images)
            .cloned()
            .collect();
        let (quantized, report) =
            crate::compress::quantize(&bytes, &origin, &calibration, sensitivity, device)?;
        println!("sensitivity (output error with only this layer in INT8), worst first:");
        for s in report.scan.iter().take(10) {
            println!("  {:<50} {:>8} params  {:.4}", s.layer, s.params, s.error);
        }
        println!(
            "INT8: {} weights quantized, {} kept FP32 (error > {}); output error {:.4} with all INT8, {:.4} as written",
            report.quantized,
            report.kept_fp32.len(),
            sensitivity,
            report.error_all_int8,
            report.error_final
        );
        summary.insert("quantization".into(), serde_json::to_value(&report)?);
        bytes = quantized;
    }
    // The result must load and run here (CPU backend) before it is written.
    Detector::from_bytes(bytes.clone(), &out.display().to_string(), device)?;
    protocol::package::write_atomic(&out, &bytes)?;
    let summary_path = out.with_extension("compress.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)?;
    println!(
        "wrote {} ({} bytes) and {}",
        out.display(),
        bytes.len(),
        summary_path.display()
    );
    Ok(())
}
