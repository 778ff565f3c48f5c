//! `trainer pretrain`: simCLR self-supervised pretraining of the Swin backbone on images (labels never read);
//! writes RUN/backbone.safetensors for `finetune --init`.

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;

use crate::precision::Precision;

use super::{stop_flag, swin_size};

#[derive(clap::Args)]
pub struct Args {
    /// A VOC folder (images/ is read) or, with --unlabeled, a flat folder of images.
    #[arg(long)]
    data: PathBuf,
    /// Run folder (config.json, metrics.jsonl with loss and kNN accuracy, checkpoints).
    #[arg(long)]
    out: PathBuf,
    /// DATA is a flat folder of unlabeled images.
    #[arg(long)]
    unlabeled: bool,
    /// Backbone size: nano (tests, the demo), edge (the product), tiny (Swin-T).
    #[arg(long, default_value = "edge")]
    size: String,
    /// Passes over the training images.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Images per step (each gives two views).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (AdamW), after a warmup of two epochs; cosine decay to 0.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// NT-Xent temperature.
    #[arg(long, default_value_t = 0.2)]
    temperature: f64,
    /// Square input size in pixels of each view (112 is 4x cheaper than 224; the backbone
    /// still initialises a 224-px detector).
    #[arg(long, default_value_t = 224)]
    input_size: usize,
    /// Seed of the initial weights, shuffles and augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute dtype of a training step: bf16 = mixed precision (f32 weights and loss;
    /// GPUs with bf16 arithmetic; refused where the device has none).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Stop after this many steps (quick checks).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Continue the run in --out.
    #[arg(long)]
    resume: bool,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let Args {
        data,
        out,
        unlabeled,
        size,
        epochs,
        batch_size,
        lr,
        temperature,
        input_size,
        seed,
        precision,
        max_steps,
        resume,
    } = args;

    let mut config = crate::simclr::PretrainConfig::new(data);
    config.precision = precision;
    config.backbone = swin_size(&size)?;
    config.flat = unlabeled;
    config.epochs = epochs;
    config.batch_size = batch_size;
    config.lr = lr;
    config.temperature = temperature;
    config.input_size = input_size;
    config.seed = seed;
    config.max_steps = max_steps;
    let outcome = crate::simclr::run(&config, &out, device, resume, stop_flag()?)?;
    println!(
        "{} after {} steps ({:.2} images/s); kNN accuracy by epoch: {:?}; backbone: {}",
        if outcome.stopped { "stopped" } else { "done" },
        outcome.state.step,
        outcome.images_per_second,
        outcome.state.knn,
        out.join("backbone.safetensors").display()
    );
    if let Some(summary) = outcome.state.knn_summary() {
        println!("{summary}");
    }
    crate::report::plot_training_curves(
        &out.join("metrics.jsonl"),
        &out.join("curves.png"),
        "knn_accuracy",
        "validation kNN accuracy",
    )?;
    Ok(())
}
