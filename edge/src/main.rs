//! `edge`: the inspection daemon (`edge run`) and tools around the detector.

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every forward pass.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::prelude::*;
use clap::{Parser, Subcommand};
use edge_detector::device::DeviceChoice;
use edge_detector::{Detector, DetectorConfig, ImageView};

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
        #[command(flatten)]
        trust: edge_detector::cli::PackageTrust,
    },
    /// Run the daemon: model lifecycle and updates over MQTT, as configured.
    Run {
        /// TOML configuration (see configs/edge.toml for every key).
        #[arg(long)]
        config: PathBuf,
    },
    /// List the V4L2 cameras this machine has (index for `[source] kind = "camera"`).
    Cameras,
    /// Simulate a fleet of devices on one MQTT broker (rollout tests and benchmarks): each
    /// device runs the daemon's transfer code, with chunks in memory and no detector.
    FleetSim(edge::sim::Args),
    /// Print a model file's config and parameter count.
    Info {
        /// A model file (SafeTensors) or a signed package (.edgepkg).
        #[arg(long)]
        model: PathBuf,
    },
}

fn main() -> Result<()> {
    edge_detector::cpu::hold_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // cubecl logs a GPU backend that fails to start (the error says it once);
                // pliron, the CUDA backend's LLVM passes, logs every kernel's IR at info.
                tracing_subscriber::EnvFilter::new("info,cubecl_common=error,pliron=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // A bad EDGE_CPU_KERNELS is an error here, before any kernel runs.
    edge_detector::cpu::select_from_env().map_err(anyhow::Error::msg)?;
    let device = cli.device.device()?;
    match cli.command {
        Command::Run { config } => {
            let config = edge::config::EdgeConfig::load(&config)?;
            tracing::info!("{}", edge_detector::cpu::describe());
            if edge::faults::COMPILED_IN {
                tracing::warn!(
                    "this is a test build: fault-injection points are compiled in (build for a line with `cargo build --release -p edge`)"
                );
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let daemon = edge::daemon::Daemon::open(config, device)?;
                daemon.run(shutdown_signal()).await
            })?;
        }
        Command::Detect {
            model,
            images,
            batch,
            trust,
        } => {
            let detector = match model {
                Some(path) => Detector::load_checked(
                    &path,
                    &trust.keys().map_err(anyhow::Error::msg)?,
                    &device,
                )?,
                None => Detector::new(DetectorConfig::edge_neu(), &device)?,
            };
            for chunk in images.chunks(batch.max(1)) {
                let decoded: Vec<image::RgbImage> = chunk
                    .iter()
                    .map(|p| {
                        edge_detector::image_io::open(p)
                            .map_err(anyhow::Error::msg)
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
        Command::Cameras => list_cameras()?,
        Command::FleetSim(args) => edge::sim::run(args)?,
        Command::Info { model } => {
            let mut bytes =
                std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            if bytes.starts_with(protocol::package::MAGIC) {
                let package =
                    protocol::package::Package::from_bytes(bytes, &model.display().to_string())?;
                let m = protocol::package::Manifest::from_json(&package.manifest_bytes)?;
                println!(
                    "package {} v{}: quantization {}, metrics {:?}, {} golden sample(s) (signature not checked here)",
                    m.id,
                    m.version,
                    m.quantization,
                    m.metrics,
                    m.golden.len()
                );
                bytes = package.weights;
            }
            let quantization = edge_detector::quant::quantization_of(&bytes);
            let detector =
                Detector::from_bytes(bytes.clone(), &model.display().to_string(), &device)?;
            println!("{}", serde_json::to_string_pretty(&detector.config)?);
            println!("parameters: {}", detector.model.num_params());
            println!(
                "GFLOPs at {:?}: {:.3} (2 x multiply-adds)",
                detector.config.backbone.img_size,
                2.0 * detector.config.macs() as f64 / 1e9
            );
            println!("weights: {quantization}, {} bytes", bytes.len());
            println!("{}", edge_detector::cpu::describe());
        }
    }
    Ok(())
}

/// V4L2 cameras (feature `camera`) and GenICam cameras (feature `genicam`).
fn list_cameras() -> Result<()> {
    #[cfg(feature = "camera")]
    print_cameras(
        "V4L2",
        edge::capture::camera::list().map_err(|e| anyhow::anyhow!("listing V4L2 cameras: {e}"))?,
    );
    #[cfg(not(feature = "camera"))]
    println!("V4L2: not built in (feature `camera`)");
    #[cfg(feature = "genicam")]
    print_cameras("GenICam", edge::capture::aravis_source::list());
    #[cfg(not(feature = "genicam"))]
    println!("GenICam: not built in (feature `genicam`)");
    Ok(())
}

#[cfg(any(feature = "camera", feature = "genicam"))]
fn print_cameras(kind: &str, cameras: Vec<String>) {
    if cameras.is_empty() {
        println!("{kind}: no cameras found");
    }
    for c in cameras {
        println!("{kind}: {c}");
    }
}

/// SIGTERM (systemd stop) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--help` explains every flag and argument of every subcommand.
    #[test]
    fn every_flag_has_help() {
        let missing = edge_detector::cli::undocumented_args(&super::Cli::command());
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
