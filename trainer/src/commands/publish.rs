//! `trainer publish`: roll a package out over MQTT to a device, a group or the fleet, in waves,
//! and wait for every device's report. Exits non-zero when a device refused, failed or was not
//! served, or the rollout halted (a wave under its success threshold, the abort threshold).

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
    /// Send here first and halt unless every device in it activates the model (the same as
    /// `--waves TARGET`).
    #[arg(long, conflicts_with = "waves")]
    canary: Option<protocol::Target>,
    /// The rollout plan, comma-separated: percentages of the target's devices (`5%,15%,80%`)
    /// or targets (`group:canary`); devices no wave names form a last wave.
    #[arg(long, value_delimiter = ',')]
    waves: Vec<protocol::rollout::Wave>,
    /// Percent of a wave's finished devices that must activate for the next wave to start.
    #[arg(long, default_value_t = 100.0)]
    wave_success: f64,
    /// Offer to at most this many devices per minute.
    #[arg(long)]
    max_per_minute: Option<u32>,
    /// Abort the rollout (nothing more is offered or sent) when this percent of the finished
    /// devices failed...
    #[arg(long)]
    abort_percent: Option<f64>,
    /// ...once at least this many devices finished.
    #[arg(long, default_value_t = 10)]
    abort_after: usize,
    /// A device that has not finished this many seconds after its offer timed out.
    #[arg(long, default_value_t = 600)]
    device_timeout: u64,
    /// Rollout record: written as the rollout goes; a publisher started again with the same
    /// record, package and target continues that rollout.
    #[arg(long)]
    record: Option<PathBuf>,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Public key to check the package against before sending (recommended).
    #[arg(long)]
    verify_with: Option<PathBuf>,
    /// Size of each package chunk on the wire, KiB, 16 to 1024 (a device resumes at the first
    /// chunk it misses). Keep it under the broker's packet limit: AWS IoT takes 128 KB packets.
    #[arg(long, default_value_t = 256)]
    chunk_kib: usize,
    /// End of the rollout, seconds: devices not served by then (offline) are reported.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        package,
        to,
        canary,
        waves,
        wave_success,
        max_per_minute,
        abort_percent,
        abort_after,
        device_timeout,
        record,
        broker,
        verify_with,
        chunk_kib,
        timeout,
    } = args;
    anyhow::ensure!(
        (0.0..=100.0).contains(&wave_success),
        "--wave-success {wave_success}: a percentage, 0 to 100"
    );
    if let Some(p) = abort_percent {
        anyhow::ensure!(
            p > 0.0 && p <= 100.0,
            "--abort-percent {p}: a percentage above 0, at most 100"
        );
    }
    anyhow::ensure!(
        max_per_minute != Some(0),
        "--max-per-minute 0: at least 1 (leave it out for no limit)"
    );
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
    options.waves = match canary {
        Some(c) => vec![protocol::rollout::Wave::Target(c)],
        None => waves,
    };
    options.wave_success = wave_success / 100.0;
    options.max_per_minute = max_per_minute;
    options.abort = abort_percent.map(|p| protocol::rollout::Abort {
        failure_fraction: p / 100.0,
        min_finished: abort_after,
    });
    options.device_timeout = std::time::Duration::from_secs(device_timeout);
    options.record = record;
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
    let secs = report.elapsed.as_secs_f64();
    println!(
        "{} chunk(s), {} bytes sent in {secs:.2} s ({:.1} MB/s), {} of them repairs to single devices",
        report.chunks_sent,
        report.bytes_sent,
        report.bytes_sent as f64 / 1e6 / secs.max(1e-9),
        report.repair_bytes
    );
    print!("{}", final_table(&report));
    if let Some(why) = &report.halted {
        anyhow::bail!("rollout of v{} halted: {why}", report.version);
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

/// Per wave: devices, activated, failed, no answer; then every device that did not activate
/// (every device, in a rollout of 20 or fewer).
fn final_table(report: &protocol::rollout::RolloutReport) -> String {
    use std::fmt::Write;
    let total: usize = report.waves.iter().map(|w| w.devices.len()).sum();
    let width = report
        .waves
        .iter()
        .map(|w| w.label.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:<width$}  {:>7}  {:>9}  {:>6}  {:>9}\n",
        "wave", "devices", "activated", "failed", "no answer"
    );
    for wave in &report.waves {
        let activated = wave.devices.iter().filter(|d| d.succeeded()).count();
        let unanswered = wave.devices.iter().filter(|d| d.state.is_none()).count();
        let failed = wave.devices.len() - activated - unanswered;
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>9}  {:>6}  {:>9}",
            wave.label,
            wave.devices.len(),
            activated,
            failed,
            unanswered
        );
    }
    for wave in &report.waves {
        let shown: Vec<_> = wave
            .devices
            .iter()
            .filter(|d| total <= 20 || !d.succeeded())
            .collect();
        if !shown.is_empty() {
            let _ = writeln!(out, "{}:", wave.label);
        }
        for d in shown {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}
