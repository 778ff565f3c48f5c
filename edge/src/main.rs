//! `edge`: the inspection daemon's binary. For now it runs the detector on image files.

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every forward pass.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::prelude::*;
use clap::{Parser, Subcommand};
use edge::detector::{Detector, DetectorConfig, ImageView};
use edge::device::DeviceChoice;

#[derive(Parser)]
#[command(
    version,
    about = "Edge defect inspection: Swin detector on a line camera"
)]
struct Cli {
    /// Compute device: flex (CPU, default), wgpu, cuda (the last two need the cargo feature).
    #[arg(long, global = true, default_value = "flex")]
    device: DeviceChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect defects in image files (JPEG/PNG/BMP) and print one JSON line per image.
    Detect {
        /// Model file written by `trainer` (SafeTensors with the detector config inside).
        /// Without it, an untrained edge-size NEU detector is used (for smoke tests only).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Images to inspect.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Images per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
    /// Print a model file's config and parameter count.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let device = cli.device.device()?;
    match cli.command {
        Command::Detect {
            model,
            images,
            batch,
        } => {
            let detector = match model {
                Some(path) => Detector::load(&path, &device)?,
                None => Detector::new(DetectorConfig::edge_neu(), &device)?,
            };
            for chunk in images.chunks(batch.max(1)) {
                let decoded: Vec<image::RgbImage> = chunk
                    .iter()
                    .map(|p| {
                        image::open(p)
                            .with_context(|| format!("reading image {}", p.display()))
                            .map(|i| i.into_rgb8())
                    })
                    .collect::<Result<_>>()?;
                let views: Vec<ImageView> = decoded.iter().map(ImageView::rgb).collect();
                let results = detector.detect(&views)?;
                for (path, detections) in chunk.iter().zip(results) {
                    let named: Vec<serde_json::Value> = detections
                        .iter()
                        .map(|d| {
                            serde_json::json!({
                                "class": detector.config.classes[d.class_id],
                                "score": d.score,
                                "box": [d.x1, d.y1, d.x2, d.y2],
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"image": path.display().to_string(), "detections": named})
                    );
                }
            }
        }
        Command::Info { model } => {
            let detector = Detector::load(&model, &device)?;
            println!("{}", serde_json::to_string_pretty(&detector.config)?);
            println!("parameters: {}", detector.model.num_params());
        }
    }
    Ok(())
}
