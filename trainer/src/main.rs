//! `trainer`: data generation, fine-tuning and evaluation of the edge defect detector.

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edge::detector::{Detector, NEU_CLASSES};
use edge::device::DeviceChoice;
use trainer::data::augment::AugmentConfig;
use trainer::finetune::{self, FinetuneConfig};
use trainer::report;
use trainer::simclr::{self, PretrainConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Train, evaluate and package the edge defect detector"
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
    /// Write a synthetic NEU-DET-style dataset (JPEG + VOC XML, NEU layout).
    Synth {
        /// Output folder (gets images/ and annotations/).
        #[arg(long)]
        out: PathBuf,
        /// Images per class (six classes).
        #[arg(long, default_value_t = 50)]
        per_class: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// SimCLR self-supervised pretraining of the Swin backbone on images (labels never read);
    /// writes RUN/backbone.safetensors for `finetune --init`.
    Pretrain {
        /// A VOC folder (images/ is read) or, with --unlabeled, a flat folder of images.
        #[arg(long)]
        data: PathBuf,
        /// Run folder (config.json, metrics.jsonl with loss and kNN accuracy, checkpoints).
        #[arg(long)]
        out: PathBuf,
        /// DATA is a flat folder of unlabeled images.
        #[arg(long)]
        unlabeled: bool,
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        /// Images per step (each gives two views).
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// NT-Xent temperature.
        #[arg(long, default_value_t = 0.2)]
        temperature: f64,
        #[arg(long, default_value_t = 224)]
        input_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after this many steps (quick checks).
        #[arg(long)]
        max_steps: Option<usize>,
        /// Continue the run in --out.
        #[arg(long)]
        resume: bool,
    },
    /// Fine-tune the detector on a VOC / NEU-DET folder; writes a run folder.
    Finetune {
        /// Dataset folder with images/ and annotations/.
        #[arg(long)]
        data: PathBuf,
        /// Run folder (config.json, metrics.jsonl, checkpoint/, best.safetensors, model.safetensors, report/).
        #[arg(long)]
        out: PathBuf,
        /// Start from a detector model file, or from a Swin backbone in timm names (SimCLR output).
        /// Without it the detector trains from scratch.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Images per class to train on (few-shot); all training images when absent.
        #[arg(long)]
        shots: Option<usize>,
        /// Seed of the k-shot draw, shuffling and augmentation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Seed of the fixed train/validation split (keep it fixed to compare runs).
        #[arg(long, default_value_t = 42)]
        split_seed: u64,
        /// Fraction of images held out for validation, per class.
        #[arg(long, default_value_t = 0.2)]
        val_fraction: f64,
        #[arg(long, default_value_t = 60)]
        epochs: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Peak learning rate (AdamW), reached after the warmup.
        #[arg(long, default_value_t = 5e-4)]
        lr: f64,
        /// Learning rate at the end of the cosine decay.
        #[arg(long, default_value_t = 1e-5)]
        min_lr: f64,
        /// Linear warmup length in epochs.
        #[arg(long, default_value_t = 2.0)]
        warmup_epochs: f64,
        /// AdamW decoupled weight decay.
        #[arg(long, default_value_t = 0.05)]
        weight_decay: f32,
        /// Clip the global gradient norm to this.
        #[arg(long, default_value_t = 5.0)]
        grad_clip: f32,
        /// Re-weight the class loss by inverse square-root frequency (long-tailed label sets).
        #[arg(long)]
        class_balance: bool,
        /// Evaluate on the validation split every N epochs (and at the end).
        #[arg(long, default_value_t = 5)]
        eval_every: usize,
        /// Square network input size in pixels.
        #[arg(long, default_value_t = 224)]
        input_size: usize,
        /// Train without augmentation.
        #[arg(long)]
        no_augment: bool,
        /// Probability of a mosaic (four images in a 2x2 layout) per training image.
        #[arg(long, default_value_t = 0.0)]
        mosaic: f64,
        /// Probability of mixing another image in (mixup, boxes of both kept).
        #[arg(long, default_value_t = 0.0)]
        mixup: f64,
        /// Probability of pasting defects cut from another image (copy-paste).
        #[arg(long, default_value_t = 0.0)]
        copy_paste: f64,
        /// Stop after this many optimizer steps (quick checks).
        #[arg(long)]
        max_steps: Option<usize>,
        /// Continue the run in --out from its last checkpoint.
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate a model file on a dataset's validation split (or all of it): mAP, per-class AP,
    /// PR curves (PNG), JSON and Markdown report.
    Eval {
        /// Detector model file.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Report folder.
        #[arg(long)]
        out: PathBuf,
        /// Evaluate on every image instead of the validation split.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 42)]
        split_seed: u64,
        #[arg(long, default_value_t = 0.2)]
        val_fraction: f64,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
}

/// Set by the first Ctrl-C: the run stops after its current step and saves; a second quits.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let device = cli.device.device()?;
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    match cli.command {
        Command::Synth {
            out,
            per_class,
            seed,
        } => {
            let n = trainer::data::synth::write_dataset(&out, &classes, per_class, seed)?;
            println!("wrote {n} images to {}", out.display());
        }
        Command::Pretrain {
            data,
            out,
            unlabeled,
            epochs,
            batch_size,
            lr,
            temperature,
            input_size,
            seed,
            max_steps,
            resume,
        } => {
            let mut config = PretrainConfig::new(data);
            config.flat = unlabeled;
            config.epochs = epochs;
            config.batch_size = batch_size;
            config.lr = lr;
            config.temperature = temperature;
            config.input_size = input_size;
            config.seed = seed;
            config.max_steps = max_steps;
            let outcome = simclr::run(&config, &out, &device, resume, stop_flag()?)?;
            println!(
                "{} after {} steps ({:.2} images/s); kNN accuracy by epoch: {:?}; backbone: {}",
                if outcome.stopped { "stopped" } else { "done" },
                outcome.state.step,
                outcome.images_per_second,
                outcome.state.knn,
                out.join("backbone.safetensors").display()
            );
        }
        Command::Finetune {
            data,
            out,
            init,
            shots,
            seed,
            split_seed,
            val_fraction,
            epochs,
            batch_size,
            lr,
            min_lr,
            warmup_epochs,
            weight_decay,
            grad_clip,
            class_balance,
            eval_every,
            input_size,
            no_augment,
            mosaic,
            mixup,
            copy_paste,
            max_steps,
            resume,
        } => {
            let mut config = FinetuneConfig::new(data);
            config.init = init;
            config.shots = shots;
            config.seed = seed;
            config.split_seed = split_seed;
            config.val_fraction = val_fraction;
            config.epochs = epochs;
            config.batch_size = batch_size;
            config.lr = lr;
            config.min_lr = min_lr;
            config.warmup_epochs = warmup_epochs;
            config.weight_decay = weight_decay;
            config.grad_clip = grad_clip;
            config.class_balance = class_balance;
            config.eval_every = eval_every;
            config.input_size = input_size;
            config.max_steps = max_steps;
            if no_augment {
                config.augment = AugmentConfig::none();
            }
            config.augment.mosaic = mosaic;
            config.augment.mixup = mixup;
            config.augment.copy_paste = copy_paste;
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                eprintln!(
                    "\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)"
                );
            })
            .context("installing the Ctrl-C handler")?;
            let outcome = finetune::run(&config, &out, &device, resume, stop)?;
            println!(
                "{} after {} steps in {:.0} s ({:.2} train images/s){}",
                if outcome.stopped { "stopped" } else { "done" },
                outcome.state.step,
                outcome.seconds,
                outcome.train_images_per_second,
                outcome
                    .state
                    .best_map50
                    .map(|m| format!(", best validation mAP@0.5 {m:.4}"))
                    .unwrap_or_default()
            );
            if let Some(r) = &outcome.last_report {
                report::write(r, &out.join("report"), "validation")?;
            }
            report::plot_training_curves(&out.join("metrics.jsonl"), &out.join("curves.png"))?;
        }
        Command::Eval {
            model,
            data,
            out,
            all,
            split_seed,
            val_fraction,
            batch_size,
        } => {
            let mut detector = Detector::load(&model, &device)?;
            detector.config.score_threshold = 0.01;
            let dataset = trainer::data::voc::load(&data, &detector.config.classes)?;
            let samples = if all {
                dataset.samples.clone()
            } else {
                trainer::data::split(&dataset, val_fraction, split_seed).1
            };
            let report_data = finetune::evaluate_samples(&detector, &samples, batch_size)?;
            report::write(
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
        }
    }
    Ok(())
}
