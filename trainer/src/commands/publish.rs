//! `trainer publish`: roll a package out over MQTT: offer, chunks, repair, wait for every device's report.
//! Exits non-zero when a device refused or failed, or the canary halted the rollout.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::BrokerArgs;

#[derive(clap::Args)]
pub struct Args {
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
    /// Size of each package chunk on the wire, KiB, 16 to 1024 (a device resumes at the first
    /// chunk it misses). Keep it under the broker's packet limit: AWS IoT takes 128 KB packets.
    #[arg(long, default_value_t = 256)]
    chunk_kib: usize,
    /// Give up on devices that have not answered after this many seconds (per stage).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        package,
        to,
        canary,
        broker,
        verify_with,
        chunk_kib,
        timeout,
    } = args;
    anyhow::ensure!(
        (16..=1024).contains(&chunk_kib),
        "--chunk-kib {chunk_kib}: must be 16 to 1024 (KiB), the sizes every device accepts"
    );

    let pkg = protocol::Package::read(&package)?;
    let trusted = match verify_with {
        Some(p) => vec![protocol::package::parse_public_key(
            &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
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
    Ok(())
}
