//! `trainer`: data generation, pretraining, fine-tuning, evaluation, packaging and rollout of
//! the edge defect detector.

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_detector::device::DeviceChoice;
use edge_detector::{Detector, NEU_CLASSES};
use trainer::data::augment::AugmentConfig;
use trainer::finetune::{self, FinetuneConfig};
use trainer::precision::Precision;
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

/// Where the MQTT broker is and how to log in.
#[derive(Args)]
struct BrokerArgs {
    /// Broker as HOST or HOST:PORT (1883 by default; with TLS, HOST must match its certificate).
    #[arg(long, default_value = "localhost")]
    broker: String,
    /// Site: the first topic level under `edgeinsp/`.
    #[arg(long, default_value = "site1")]
    site: String,
    /// User name on the broker (brokers that require a login).
    #[arg(long)]
    username: Option<String>,
    /// Password (or set MQTT_PASSWORD).
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// CA certificate (PEM) of the broker: connects over TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that require one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl BrokerArgs {
    fn config(&self) -> Result<protocol::mqtt::BrokerConfig> {
        let (host, port) = match self.broker.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .with_context(|| format!("--broker {}: bad port", self.broker))?,
            ),
            None => (self.broker.clone(), 1883),
        };
        let mut config = protocol::mqtt::BrokerConfig::plain(&host, port);
        config.username = self.username.clone();
        config.password = self.password.clone();
        if let Some(ca) = &self.tls_ca {
            config.tls = Some(protocol::mqtt::TlsFiles {
                ca: ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            });
        }
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create an ed25519 signing key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub
    /// (put its contents in the edge config's models.trusted_keys).
    Keygen {
        /// Folder for the two key files.
        #[arg(long)]
        out: PathBuf,
        /// File name of the pair (NAME.key, NAME.pub).
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// Write an untrained detector (random weights), for pipeline tests and benchmarks.
    InitModel {
        /// Model file to write (SafeTensors).
        #[arg(long)]
        out: PathBuf,
        /// Backbone size: nano (tests), edge (the product), tiny (Swin-T).
        #[arg(long, default_value = "edge")]
        size: String,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Sign a model into a package for the fleet (manifest, golden samples, weights).
    Package {
        /// Model file (SafeTensors written by `trainer finetune`).
        #[arg(long)]
        model: PathBuf,
        /// Secret key from `trainer keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Package version: devices only accept versions newer than their active one.
        #[arg(long)]
        version: u64,
        /// Model name in the manifest.
        #[arg(long, default_value = "neu-edge")]
        id: String,
        /// Golden images (repeat the flag): the device must reproduce their detections before
        /// it switches to the model.
        #[arg(long, required = true)]
        golden: Vec<PathBuf>,
        /// report.json from `trainer eval` or a run: its mAP goes into the manifest.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Oldest edge release that may run it.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        min_edge_version: String,
        /// Detections scoring at least this are part of the golden expectations.
        #[arg(long, default_value_t = 0.3)]
        golden_min_score: f32,
        /// Package file to write (.edgepkg).
        #[arg(long)]
        out: PathBuf,
    },
    /// Compress a detector: prune neck/head channels, attention heads and MLP channels (then
    /// recover with `finetune --init OUT`), and/or store weights as INT8 after a per-layer
    /// sensitivity scan.
    Compress {
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
    },
    /// Roll a package out over MQTT: offer, chunks, repair, wait for every device's report.
    /// Exits non-zero when a device refused or failed, or the canary halted the rollout.
    Publish {
        /// The signed package to send (.edgepkg from `trainer package`).
        package: PathBuf,
        /// device:ID, group:NAME or fleet.
        #[arg(long)]
        to: protocol::Target,
        /// Send here first and halt unless every device in it activates the model.
        #[arg(long)]
        canary: Option<protocol::Target>,
        #[command(flatten)]
        broker: BrokerArgs,
        /// Public key to check the package against before sending (recommended).
        #[arg(long)]
        verify_with: Option<PathBuf>,
        /// Size of each package chunk on the wire, KiB (a device resumes at the first chunk it
        /// misses).
        #[arg(long, default_value_t = 256)]
        chunk_kib: usize,
        /// Give up on devices that have not answered after this many seconds (per stage).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Send a signed rollback command: devices go back to a kept earlier model.
    Rollback {
        /// device:ID, group:NAME or fleet.
        #[arg(long)]
        to: protocol::Target,
        /// Version to go back to (default: the newest kept one).
        #[arg(long)]
        version: Option<u64>,
        /// Secret key from `trainer keygen` (devices accept commands signed by a trusted key).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// The whole product on this machine, no setup: MQTT broker (in-process), data, SimCLR
    /// pretraining, few-shot fine-tuning, evaluation, INT8 compression, a signed package rolled
    /// out over MQTT to an edge daemon that inspects a synthetic strip, and a summary checked
    /// against the strip's ground truth. About 4 minutes on 2 cores.
    Demo(trainer::demo::DemoOptions),
    /// Write a synthetic NEU-DET-style dataset (JPEG + VOC XML, NEU layout).
    Synth {
        /// Output folder (gets images/ and annotations/).
        #[arg(long)]
        out: PathBuf,
        /// Images per class (six classes).
        #[arg(long, default_value_t = 50)]
        per_class: usize,
        /// Defect-free images besides (`clean_N`, no objects): a detector that judges pass/fail
        /// needs to see clean steel.
        #[arg(long, default_value_t = 0)]
        clean: usize,
        /// Seed of the procedural textures and defects (same seed, same images).
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
    },
    /// Fine-tune the detector on a VOC / NEU-DET folder, or on the frames labeled on an edge's
    /// review page (--from-edge); writes a run folder.
    Finetune {
        /// Dataset folder with images/ and annotations/.
        #[arg(
            long,
            required_unless_present = "from_edge",
            conflicts_with = "from_edge"
        )]
        data: Option<PathBuf>,
        /// Train on what quality engineers labeled on an edge: its URL (http://HOST:PORT) or its
        /// /api/dataset URL. The set is downloaded to OUT/edge-dataset (kept on --resume).
        #[arg(long)]
        from_edge: Option<String>,
        /// Labeling token for --from-edge (one of the edge's review.labelers).
        #[arg(long, env = "EDGE_REVIEW_TOKEN", hide_env_values = true)]
        edge_token: Option<String>,
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
        /// Passes over the training images (k-shot: over the k images per class).
        #[arg(long, default_value_t = 60)]
        epochs: usize,
        /// Images per optimizer step.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Peak learning rate (AdamW), reached after the warmup.
        #[arg(long, default_value_t = 5e-4)]
        lr: f64,
        /// The backbone trains at --lr times this (neck and head at --lr). Below 1 (e.g. 0.1)
        /// keeps a pretrained backbone near its start while the fresh head learns.
        #[arg(long, default_value_t = 1.0)]
        backbone_lr_scale: f64,
        /// Keep the backbone frozen for this many first epochs while the neck and head warm up
        /// (those steps skip the backbone's backward pass); --epochs or more: never train it.
        /// With a SimCLR backbone as --init and few shots, frozen throughout (e.g. 1000) and
        /// about 3x the steps a fully trained run could afford is the best CPU recipe measured
        /// (README, few-shot results).
        #[arg(long, default_value_t = 0)]
        freeze_backbone_epochs: usize,
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
        /// Compute dtype of a training step: bf16 runs forward and backward in bf16 with f32
        /// weights, optimizer state, loss and checkpoints (mixed precision; GPUs with bf16
        /// arithmetic, e.g. CUDA on Ampere or newer; refused where the device has none).
        #[arg(long, value_enum, default_value_t = Precision::F32)]
        precision: Precision,
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
        /// Probability of a random 90-degree rotation per training image (textures without a
        /// preferred direction, e.g. steel).
        #[arg(long, default_value_t = 0.0)]
        rot90: f64,
        /// Stochastic depth of the Swin blocks (rising linearly to this rate in the last block);
        /// for long runs from scratch, e.g. 0.1. Applies to a new detector, not to --init.
        #[arg(long, default_value_t = 0.0)]
        drop_path: f64,
        /// Keep an exponential moving average of the weights with this decay (e.g. 0.9995),
        /// evaluated beside the raw weights each time; the run's model is then the average
        /// (the raw weights go to raw.safetensors).
        #[arg(long)]
        ema_decay: Option<f64>,
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
    },
}

/// "2.007 -> 1.404 GFLOPs (0.70x), 5429977 -> 3389497 parameters"
fn shrinkage(
    macs_before: u64,
    macs_after: u64,
    params_before: usize,
    params_after: usize,
) -> String {
    format!(
        "{:.3} -> {:.3} GFLOPs ({:.2}x), {params_before} -> {params_after} parameters",
        2.0 * macs_before as f64 / 1e9,
        2.0 * macs_after as f64 / 1e9,
        macs_after as f64 / macs_before as f64,
    )
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

/// `--size`: the Swin backbone sizes.
fn swin_size(size: &str) -> Result<edge_detector::SwinConfig> {
    use edge_detector::SwinConfig;
    Ok(match size {
        "nano" => SwinConfig::nano(),
        "edge" => SwinConfig::edge(),
        "tiny" => SwinConfig::tiny(),
        other => anyhow::bail!("--size {other}: expected nano, edge or tiny"),
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // rumqttd (the demo's broker) logs every connection at info.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let device = cli.device.device()?;
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    match cli.command {
        Command::Demo(options) => trainer::demo::run(&options)?,
        Command::Keygen { out, name } => {
            let key = protocol::package::generate_key()?;
            let (secret, public) = protocol::package::write_key_pair(&out, &name, &key)?;
            println!(
                "secret key: {}\npublic key: {} ({})",
                secret.display(),
                public.display(),
                protocol::package::public_key_hex(&key.verifying_key())
            );
        }
        Command::InitModel { out, size, seed } => {
            use edge_detector::DetectorConfig;
            let mut config = DetectorConfig::edge_neu();
            config.backbone = swin_size(&size)?;
            device.seed(seed);
            let detector = Detector::new(config, &device)?;
            detector.save(&out)?;
            use burn::module::Module;
            println!(
                "wrote {} ({} parameters)",
                out.display(),
                detector.model.num_params()
            );
        }
        Command::Package {
            model,
            key,
            version,
            id,
            golden,
            metrics,
            min_edge_version,
            golden_min_score,
            out,
        } => {
            let key = protocol::package::read_signing_key(&key)?;
            let spec = trainer::package::PackageSpec {
                id,
                version,
                golden,
                tolerance: protocol::package::GoldenTolerance {
                    min_score: golden_min_score,
                    ..Default::default()
                },
                metrics: match metrics {
                    Some(p) => trainer::package::metrics_from_report(&p)?,
                    None => Default::default(),
                },
                min_edge_version,
            };
            let package = trainer::package::build(&model, &spec, &key, &device)?;
            package.write(&out)?;
            println!(
                "wrote {} (v{version}, {} bytes, {} golden sample(s))",
                out.display(),
                package.to_bytes().len(),
                spec.golden.len()
            );
        }
        Command::Publish {
            package,
            to,
            canary,
            broker,
            verify_with,
            chunk_kib,
            timeout,
        } => {
            let pkg = protocol::Package::read(&package)?;
            let trusted = match verify_with {
                Some(p) => vec![protocol::package::parse_public_key(
                    &std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )?],
                None => vec![],
            };
            let mut options = protocol::rollout::RolloutOptions::new(&broker.site, to);
            options.canary = canary;
            options.chunk_size = chunk_kib << 10;
            options.timeout = std::time::Duration::from_secs(timeout);
            let broker = broker.config()?;
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(protocol::rollout::rollout(
                &broker,
                &pkg,
                &trusted,
                &options,
                &|line| eprintln!("{line}"),
            ))?;
            for stage in &report.stages {
                let secs = stage.elapsed.as_secs_f64();
                println!(
                    "{}: {} chunk(s), {} bytes sent in {secs:.2} s ({:.1} MB/s)",
                    stage.target,
                    stage.chunks_sent,
                    stage.bytes_sent,
                    stage.bytes_sent as f64 / 1e6 / secs.max(1e-9)
                );
                for d in &stage.devices {
                    println!(
                        "  {}: {}{}",
                        d.device,
                        d.state
                            .map(|s| format!("{s:?}").to_lowercase())
                            .unwrap_or("no answer".into()),
                        d.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
            if report.halted {
                anyhow::bail!("canary failed: rollout of v{} halted", report.version);
            }
            if !report.succeeded() {
                anyhow::bail!(
                    "rollout of v{} did not succeed on every device",
                    report.version
                );
            }
            println!("v{} active on every device", report.version);
        }
        Command::Rollback {
            to,
            version,
            key,
            broker,
        } => {
            let key = protocol::package::read_signing_key(&key)?;
            let command = protocol::Command {
                action: protocol::CommandAction::Rollback {
                    to_version: version,
                },
                target: to.clone(),
                issued_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis() as u64,
            };
            let signed = protocol::SignedCommand::sign(&command, &key);
            let topics = protocol::Topics::new(&broker.site)?;
            let broker = broker.config()?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                use protocol::messages::Message;
                let options = broker.options(&format!("rollback-{}", std::process::id()))?;
                let mut conn = protocol::mqtt::Connection::start(options, vec![]);
                conn.wait_connected(std::time::Duration::from_secs(15))
                    .await?;
                conn.publish(
                    topics.down(&to, protocol::topics::DownKind::Command),
                    signed.encode(),
                    false,
                )
                .await?;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                conn.close().await;
                anyhow::Ok(())
            })?;
            println!("rollback command sent to {to}");
        }
        Command::Synth {
            out,
            per_class,
            clean,
            seed,
        } => {
            let n = trainer::data::synth::write_dataset(&out, &classes, per_class, clean, seed)?;
            println!("wrote {n} images to {}", out.display());
        }
        Command::Pretrain {
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
        } => {
            let mut config = PretrainConfig::new(data);
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
            let outcome = simclr::run(&config, &out, &device, resume, stop_flag()?)?;
            println!(
                "{} after {} steps ({:.2} images/s); kNN accuracy by epoch: {:?}; backbone: {}",
                if outcome.stopped { "stopped" } else { "done" },
                outcome.state.step,
                outcome.images_per_second,
                outcome.state.knn,
                out.join("backbone.safetensors").display()
            );
            report::plot_training_curves(
                &out.join("metrics.jsonl"),
                &out.join("curves.png"),
                "knn_accuracy",
                "validation kNN accuracy",
            )?;
        }
        Command::Finetune {
            data,
            from_edge,
            edge_token,
            out,
            init,
            shots,
            seed,
            split_seed,
            val_fraction,
            epochs,
            batch_size,
            lr,
            backbone_lr_scale,
            freeze_backbone_epochs,
            min_lr,
            warmup_epochs,
            weight_decay,
            grad_clip,
            class_balance,
            precision,
            eval_every,
            input_size,
            no_augment,
            mosaic,
            mixup,
            copy_paste,
            rot90,
            drop_path,
            ema_decay,
            max_steps,
            resume,
        } => {
            let data = match (data, from_edge) {
                (Some(d), _) => d,
                (None, Some(url)) => {
                    let dir = out.join("edge-dataset");
                    if resume && dir.join("images").is_dir() {
                        println!(
                            "--resume: training on the set fetched before, {}",
                            dir.display()
                        );
                    } else {
                        let token = edge_token.context(
                            "--from-edge needs --edge-token (or EDGE_REVIEW_TOKEN): a token from the edge's review.labelers",
                        )?;
                        let n = trainer::from_edge::fetch(&url, &token, &dir)?;
                        println!(
                            "fetched {n} labeled frames from {url} into {}",
                            dir.display()
                        );
                    }
                    dir
                }
                (None, None) => unreachable!("clap requires --data or --from-edge"),
            };
            let mut config = FinetuneConfig::new(data);
            config.init = init;
            config.shots = shots;
            config.seed = seed;
            config.split_seed = split_seed;
            config.val_fraction = val_fraction;
            config.epochs = epochs;
            config.batch_size = batch_size;
            config.lr = lr;
            if !(backbone_lr_scale > 0.0 && backbone_lr_scale.is_finite()) {
                anyhow::bail!("--backbone-lr-scale {backbone_lr_scale}: give a factor > 0");
            }
            config.backbone_lr_scale = backbone_lr_scale;
            config.freeze_backbone_epochs = freeze_backbone_epochs;
            if freeze_backbone_epochs > 0 && config.init.is_none() {
                tracing::warn!(
                    "--freeze-backbone-epochs {freeze_backbone_epochs} without --init freezes a randomly initialised backbone"
                );
            }
            config.min_lr = min_lr;
            config.warmup_epochs = warmup_epochs;
            config.weight_decay = weight_decay;
            config.grad_clip = grad_clip;
            config.class_balance = class_balance;
            config.precision = precision;
            config.eval_every = eval_every;
            config.input_size = input_size;
            config.max_steps = max_steps;
            if no_augment {
                config.augment = AugmentConfig::none();
            }
            config.augment.mosaic = mosaic;
            config.augment.mixup = mixup;
            config.augment.copy_paste = copy_paste;
            config.augment.rot90 = rot90;
            config.backbone.drop_path_rate = drop_path;
            if let Some(d) = ema_decay
                && !(0.0..1.0).contains(&d)
            {
                anyhow::bail!("--ema-decay {d}: give a decay in [0, 1), e.g. 0.9995");
            }
            config.ema_decay = ema_decay;
            let outcome = finetune::run(&config, &out, &device, resume, stop_flag()?)?;
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
            report::plot_training_curves(
                &out.join("metrics.jsonl"),
                &out.join("curves.png"),
                "val_map50",
                "validation mAP@0.5",
            )?;
        }
        Command::Compress {
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
        } => {
            if flops.is_none() && head_keep.is_none() && attn_keep.is_none() && !int8 {
                anyhow::bail!(
                    "nothing to do: give --flops RATIO, --head-keep FRACTION, --attn-keep FRACTION and/or --int8"
                );
            }
            let origin = model.display().to_string();
            let mut bytes = std::fs::read(&model).with_context(|| format!("reading {origin}"))?;
            let mut summary = serde_json::Map::new();
            if let Some(keep) = head_keep {
                let (pruned, report) = trainer::compress::prune_head(&bytes, &origin, keep)?;
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
                let (pruned, report) = trainer::compress::prune_attention(&bytes, &origin, keep)?;
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
                let (pruned, report) = trainer::compress::prune(&bytes, &origin, ratio)?;
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
                let classes = Detector::from_bytes(bytes.clone(), &origin, &device)?
                    .config
                    .classes;
                let dataset = trainer::data::voc::load(&data, &classes)?;
                let val = trainer::data::split(&dataset, val_fraction, split_seed).1;
                let step = (val.len() / calibration_images.max(1)).max(1);
                let calibration: Vec<_> = val
                    .iter()
                    .step_by(step)
                    .take(calibration_images)
                    .cloned()
                    .collect();
                let (quantized, report) = trainer::compress::quantize(
                    &bytes,
                    &origin,
                    &calibration,
                    sensitivity,
                    &device,
                )?;
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
            Detector::from_bytes(bytes.clone(), &out.display().to_string(), &device)?;
            protocol::package::write_atomic(&out, &bytes)?;
            let summary_path = out.with_extension("compress.json");
            std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)?;
            println!(
                "wrote {} ({} bytes) and {}",
                out.display(),
                bytes.len(),
                summary_path.display()
            );
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
