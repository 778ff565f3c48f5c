//! `trainer eval`: evaluate a model file on a dataset's validation split (or all of it): mAP, per-class AP,
//! PR curves (PNG), JSON and Markdown report.

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;
use edge_detector::Detector;

#[derive(clap::Args)]
pub struct Args {
    /// Detector model file.
    #[arg(long)]
    model: PathBuf,
    /// VOC / NEU-DET folder (images/ and annotations/).
    #[arg(long)]
    data: PathBuf,
    /// Report folder.
    #[arg(long)]
    out: PathBuf,
    /// Evaluate on every image instead of the validation split.
    #[arg(long)]
    all: bool,
    /// Seed of the fixed train/validation split (the one training used; default 42).
    #[arg(long, default_value_t = 42)]
    split_seed: u64,
    /// Fraction of images per class held out for validation (as in training).
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    trust: edge_detector::cli::PackageTrust,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let Args {
        model,
        data,
        out,
        all,
        split_seed,
        val_fraction,
        batch_size,
        trust,
    } = args;

    let keys = trust.keys().map_err(anyhow::Error::msg)?;
    let mut detector = Detector::load_checked(&model, &keys, device)?;
    detector.config.score_threshold = 0.01;
    let dataset = crate::data::voc::load(&data, &detector.config.classes)?;
    let samples = if all {
        dataset.samples.clone()
    } else {
        crate::data::split(&dataset, val_fraction, split_seed).1
    };
    let report_data = crate::finetune::evaluate_samples(&detector, &samples, batch_size)?;
    crate::report::write(
        &report_data,
        &out,
        if all {
            "all images"
        } else {
            "validation split"
        },
    )?;
    println!(
        "mAP@0.5 {:.4}  mAP@[.5:.95] {:.4}  ({} images) -> {}",
        report_data.map50,
        report_data.map50_95,
        samples.len(),
        out.display()
    );
    Ok(())
}
