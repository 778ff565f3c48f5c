//! The `trainer` command line: one module per command, each with its own flags (`Args`) and
//! `run`; [`run`] dispatches.

pub mod compress;
pub mod corrupt_labels;
pub mod device_check;
pub mod eval;
pub mod finetune;
pub mod fleet;
pub mod init_model;
pub mod keygen;
pub mod package;
pub mod pretrain;
pub mod publish;
pub mod resign;
pub mod rollback;
pub mod synth;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_detector::device::DeviceChoice;

#[derive(Parser)]
#[command(
    version,
    about = "Train, evaluate and package the edge defect detector"
)]
pub struct Cli {
    /// Compute device: flex (CPU, default), wgpu, cuda (the last two need the cargo feature).
    #[arg(long, global = true, default_value = "flex")]
    pub device: DeviceChoice,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the MQTT broker is and how to log in.
#[derive(Args)]
pub struct BrokerArgs {
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
pub enum Command {
    /// Create an ed25519 signing key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub
    /// (put its contents in the edge config's models.trusted_keys).
    Keygen(keygen::Args),
    /// Write an untrained detector (random weights), for pipeline tests and benchmarks.
    InitModel(init_model::Args),
    /// Sign a model into a package for the fleet (manifest, golden samples, weights).
    Package(package::Args),
    /// Compress a detector: prune neck/head channels, attention heads and MLP channels (then
    /// recover with `finetune --init OUT`), and/or store weights as INT8 after a per-layer
    /// sensitivity scan.
    Compress(compress::Args),
    /// Sign a package again with another key (key rotation); manifest and weights unchanged.
    Resign(resign::Args),
    /// Roll a package out over MQTT: offer, chunks, repair, wait for every device's report.
    /// Exits non-zero when a device refused or failed, or the canary halted the rollout.
    Publish(publish::Args),
    /// The fleet: statuses, the broker ACL, a verdict consumer.
    #[command(subcommand)]
    Fleet(fleet::Command),
    /// Send a signed rollback command: devices go back to a kept earlier model and refuse the
    /// version they left until an `allow` command.
    Rollback(rollback::Args),
    /// Send a signed allow command: devices admit again a version a rollback made them refuse.
    Allow(rollback::AllowArgs),
    /// The whole product on this machine, no setup: MQTT broker (in-process), data, SimCLR
    /// pretraining, few-shot fine-tuning, evaluation, INT8 compression, a signed package rolled
    /// out over MQTT to an edge daemon that inspects a synthetic strip, and a summary checked
    /// against the strip's ground truth. About 4 minutes on 2 cores.
    Demo(crate::demo::DemoOptions),
    /// Write a synthetic NEU-DET-style dataset (JPEG + VOC XML, NEU layout).
    Synth(synth::Args),
    /// Copy a VOC dataset with a share of its training boxes made wrong (class or place):
    /// a test bed for `finetune --noisy-labels`.
    CorruptLabels(corrupt_labels::Args),
    /// SimCLR self-supervised pretraining of the Swin backbone on images (labels never read);
    /// writes RUN/backbone.safetensors for `finetune --init`.
    Pretrain(pretrain::Args),
    /// Fine-tune the detector on a VOC / NEU-DET folder, or on the frames labeled on an edge's
    /// review page (--from-edge); writes a run folder.
    Finetune(finetune::Args),
    /// Check a device against the CPU: timm parity, a model's detections and verdicts, and its
    /// frames per second at several batch sizes (JSON report).
    DeviceCheck(device_check::Args),
    /// Evaluate a model file on a dataset's validation split (or all of it): mAP, per-class AP,
    /// PR curves (PNG), JSON and Markdown report.
    Eval(eval::Args),
}

/// Runs the command on the device the flags chose.
pub fn run(cli: Cli) -> Result<()> {
    let device = cli.device.device()?;
    match cli.command {
        Command::Demo(options) => crate::demo::run(&options),
        Command::Keygen(args) => keygen::run(args),
        Command::InitModel(args) => init_model::run(args, &device),
        Command::Package(args) => package::run(args, &device),
        Command::Compress(args) => compress::run(args, &device),
        Command::Publish(args) => publish::run(args),
        Command::Fleet(command) => fleet::run(command),
        Command::Resign(args) => resign::run(args),
        Command::Rollback(args) => rollback::run(args),
        Command::Allow(args) => rollback::run_allow(args),
        Command::Synth(args) => synth::run(args),
        Command::CorruptLabels(args) => corrupt_labels::run(args),
        Command::Pretrain(args) => pretrain::run(args, &device),
        Command::Finetune(args) => finetune::run(args, &device),
        Command::DeviceCheck(args) => device_check::run(args, &device),
        Command::Eval(args) => eval::run(args, &device),
    }
}

/// "2.007 -> 1.404 GFLOPs (0.70x), 5429977 -> 3389497 parameters"
pub(crate) fn shrinkage(
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
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>> {
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
pub(crate) fn swin_size(size: &str) -> Result<edge_detector::SwinConfig> {
    use edge_detector::SwinConfig;
    Ok(match size {
        "nano" => SwinConfig::nano(),
        "edge" => SwinConfig::edge(),
        "tiny" => SwinConfig::tiny(),
        other => anyhow::bail!("--size {other}: expected nano, edge or tiny"),
    })
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
