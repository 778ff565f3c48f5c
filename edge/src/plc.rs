//! The PLC link: every verdict written to the line's PLC over Modbus/TCP, the verdict's first
//! consumer on a real line (the reject gate), beside the store and MQTT.
//!
//! Per verdict, in this order: the verdict record ([`RECORD_LEN`] holding registers from
//! `record_register`, one Write Multiple Registers request, so the PLC never sees half a record),
//! then the pass coil (Write Single Coil: ON = pass, OFF = reject). A heartbeat register counts
//! up every `heartbeat_ms` so that the PLC can tell the vision system is alive (and reject when
//! it stops). The record layout (16-bit words, 32- and 64-bit values high word first):
//!
//! | offset | value |
//! | --- | --- |
//! | 0-1 | sequence: 1, 2, 3... for each verdict this daemon decided since it started (a jump means the PLC missed verdicts) |
//! | 2 | result: 1 pass, 0 reject |
//! | 3 | flags: bit 0 undecided (the fail-safe verdict: `[rules] undecided`) |
//! | 4 | failing defect classes, bit i = `classes[i]` (bit 15: any class not in the list) |
//! | 5 | failing defects (count, saturating) |
//! | 6-7 | strip line of the frame's first line (low 32 bits) |
//! | 8-9 | model version (0: none) |
//! | 10-13 | verdict id (the id in the store and on MQTT) |
//!
//! Never blocking inspection: the inspection thread hands the verdict to a bounded queue and goes
//! on. A verdict that cannot reach the PLC in time is not written late (the part has passed the
//! gate): it is counted as missed, by reason, and the sequence counter shows the gap. The link
//! reconnects with back-off and jitter; the store and MQTT are not affected by it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::Verdict;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_modbus::client::{Context, Writer};
use tokio_modbus::slave::Slave;

use crate::capture::now_ms;

/// Holding registers in the verdict record.
pub const RECORD_LEN: u16 = 14;
/// Verdicts waiting for the link (a slow PLC beyond this misses verdicts, counted).
const QUEUE: usize = 256;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlcConfig {
    /// The PLC's Modbus/TCP server, `host:port`.
    pub address: String,
    /// Modbus unit id (slave id) of the PLC.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Connect and per-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Heartbeat period (the heartbeat register counts up, wrapping at 65535).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A verdict older than this (from capture) when its turn comes is not written: it is
    /// counted as missed (`late`). Set it to the time the part takes to reach the gate.
    #[serde(default = "default_stale_ms")]
    pub stale_ms: u64,
    /// Coil written per verdict: ON pass, OFF reject.
    #[serde(default)]
    pub pass_coil: u16,
    /// First holding register of the verdict record.
    #[serde(default)]
    pub record_register: u16,
    /// Holding register of the heartbeat counter.
    #[serde(default = "default_heartbeat_register")]
    pub heartbeat_register: u16,
    /// Defect classes in bit order for the class mask (bit 15: any other class).
    #[serde(default = "default_classes")]
    pub classes: Vec<String>,
}

fn default_unit_id() -> u8 {
    1
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_heartbeat_ms() -> u64 {
    500
}
fn default_stale_ms() -> u64 {
    2000
}
fn default_heartbeat_register() -> u16 {
    20
}
fn default_classes() -> Vec<String> {
    edge_detector::NEU_CLASSES.map(String::from).to_vec()
}

impl PlcConfig {
    /// Refuses maps that cannot work: overlapping registers, a record past the address space,
    /// more classes than mask bits, zero periods.
    pub fn validate(&self) -> Result<(), String> {
        if self.address.trim().is_empty() {
            return Err("address: empty (expected host:port of the PLC)".into());
        }
        let end = self.record_register as u32 + RECORD_LEN as u32;
        if end > 65536 {
            return Err(format!(
                "record_register {}: the record's {RECORD_LEN} registers run past 65535",
                self.record_register
            ));
        }
        if (self.record_register as u32..end).contains(&(self.heartbeat_register as u32)) {
            return Err(format!(
                "heartbeat_register {} lies inside the verdict record ({}..{})",
                self.heartbeat_register,
                self.record_register,
                end - 1
            ));
        }
        if self.classes.len() > 15 {
            return Err(format!(
                "classes: {} listed, the mask holds 15 (bit 15 is 'any other')",
                self.classes.len()
            ));
        }
        if self.heartbeat_ms == 0 || self.timeout_ms == 0 {
            return Err("heartbeat_ms and timeout_ms must be > 0".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The link's metrics (`edge_plc_*` in `/metrics`).
pub struct PlcMetrics {
    pub connected: Gauge,
    pub written: Counter,
    /// Verdicts not written, by reason: `down` (no link), `late` (older than `stale_ms`),
    /// `overflow` (queue full), `refused` (the PLC answered with an exception).
    pub missed: Family<ReasonLabel, Counter>,
    pub connects: Counter,
    pub heartbeat: Gauge,
    /// Frame captured -> pass coil written.
    pub latency: Histogram,
}

impl PlcMetrics {
    fn new() -> Self {
        let m = PlcMetrics {
            connected: Gauge::default(),
            written: Counter::default(),
            missed: Family::default(),
            connects: Counter::default(),
            heartbeat: Gauge::default(),
            latency: Histogram::new([
                0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
            ]),
        };
        for reason in ["down", "late", "overflow", "refused"] {
            let _ = m.missed.get_or_create(&ReasonLabel { reason });
        }
        m
    }

    fn miss(&self, reason: &'static str) {
        self.missed.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "plc_connected",
            "1 while the Modbus/TCP link to the PLC is up",
            self.connected.clone(),
        );
        registry.register(
            "plc_verdicts_written",
            "Verdicts written to the PLC (record and pass coil)",
            self.written.clone(),
        );
        registry.register(
            "plc_verdicts_missed",
            "Verdicts not written to the PLC, by reason (down, late, overflow, refused)",
            self.missed.clone(),
        );
        registry.register(
            "plc_connects",
            "Connections made to the PLC",
            self.connects.clone(),
        );
        registry.register(
            "plc_heartbeat",
            "Last heartbeat value written to the PLC",
            self.heartbeat.clone(),
        );
        registry.register(
            "plc_latency_seconds",
            "Frame captured -> pass coil written at the PLC",
            self.latency.clone(),
        );
    }
}

/// One verdict as the PLC gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u32,
    pub pass: bool,
    pub undecided: bool,
    pub class_mask: u16,
    pub failing: u16,
    pub line: u32,
    pub model_version: u32,
    pub verdict_id: u64,
    pub captured_ms: u64,
}

impl Record {
    pub fn new(seq: u32, verdict: &Verdict, classes: &[String]) -> Record {
        let failing: Vec<_> = verdict.defects.iter().filter(|d| d.fails).collect();
        let class_mask = failing.iter().fold(0u16, |mask, d| {
            mask | match classes.iter().position(|c| *c == d.class) {
                Some(i) => 1 << i,
                None => 1 << 15,
            }
        });
        Record {
            seq,
            pass: verdict.pass,
            undecided: verdict.undecided.is_some(),
            class_mask,
            failing: failing.len().min(u16::MAX as usize) as u16,
            line: verdict.line as u32,
            model_version: verdict.model.as_ref().map_or(0, |m| m.1 as u32),
            verdict_id: verdict.id,
            captured_ms: verdict.captured_ms,
        }
    }

    /// The [`RECORD_LEN`] registers, as the module documentation lays them out.
    pub fn words(&self) -> [u16; RECORD_LEN as usize] {
        let hi = |v: u32| (v >> 16) as u16;
        let lo = |v: u32| v as u16;
        let id = self.verdict_id;
        [
            hi(self.seq),
            lo(self.seq),
            self.pass as u16,
            self.undecided as u16,
            self.class_mask,
            self.failing,
            hi(self.line),
            lo(self.line),
            hi(self.model_version),
            lo(self.model_version),
            (id >> 48) as u16,
            (id >> 32) as u16,
            (id >> 16) as u16,
            id as u16,
        ]
    }
}

/// The running link: [`PlcLink::offer`] from the inspection thread, a task that writes.
pub struct PlcLink {
    tx: mpsc::Sender<Record>,
    seq: AtomicU32,
    classes: Vec<String>,
    pub metrics: Arc<PlcMetrics>,
    task: tokio::task::JoinHandle<()>,
}

impl PlcLink {
    /// Starts the link's task (on the current tokio runtime); connecting happens there.
    pub fn start(config: PlcConfig) -> PlcLink {
        let (tx, rx) = mpsc::channel(QUEUE);
        let metrics = Arc::new(PlcMetrics::new());
        let classes = config.classes.clone();
        let task = tokio::spawn(run(config, rx, metrics.clone()));
        PlcLink {
            tx,
            seq: AtomicU32::new(0),
            classes,
            metrics,
            task,
        }
    }

    /// Queues `verdict` for the PLC; never waits (a full queue counts the verdict as missed).
    pub fn offer(&self, verdict: &Verdict) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let record = Record::new(seq, verdict, &self.classes);
        if self.tx.try_send(record).is_err() {
            self.metrics.miss("overflow");
        }
    }

    /// Ends the link's task (the inspection's sink may still hold the link).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The link's task: connects (with back-off), writes each record, beats the heartbeat.
async fn run(config: PlcConfig, mut rx: mpsc::Receiver<Record>, metrics: Arc<PlcMetrics>) {
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut link: Option<Context> = None;
    let mut backoff = Duration::from_millis(100);
    let mut next_try = tokio::time::Instant::now();
    let mut beat = tokio::time::interval(Duration::from_millis(config.heartbeat_ms));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat: u16 = 0;
    loop {
        // Reconnect when due (a verdict or a heartbeat tick wakes the loop).
        if link.is_none() && tokio::time::Instant::now() >= next_try {
            match connect(&config, timeout).await {
                Ok(ctx) => {
                    tracing::info!("plc: connected to {}", config.address);
                    metrics.connects.inc();
                    metrics.connected.set(1);
                    backoff = Duration::from_millis(100);
                    link = Some(ctx);
                }
                Err(e) => {
                    // Back-off with jitter: 100 ms doubling to 5 s, +-25%.
                    let jitter = 0.75 + rand::random::<f64>() * 0.5;
                    next_try = tokio::time::Instant::now() + backoff.mul_f64(jitter);
                    if backoff == Duration::from_millis(100) {
                        tracing::warn!(
                            "plc: cannot reach {}: {e}; verdicts are not written to the PLC until it answers (retrying with back-off)",
                            config.address
                        );
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tokio::select! {
            record = rx.recv() => {
                let Some(record) = record else { break };
                let Some(ctx) = link.as_mut() else {
                    metrics.miss("down");
                    continue;
                };
                if now_ms().saturating_sub(record.captured_ms) > config.stale_ms {
                    metrics.miss("late");
                    continue;
                }
                match write(ctx, &config, &record, timeout).await {
                    Ok(Ok(())) => {
                        metrics.written.inc();
                        let age = now_ms().saturating_sub(record.captured_ms);
                        metrics.latency.observe(age as f64 / 1e3);
                    }
                    Ok(Err(refusal)) => {
                        metrics.miss("refused");
                        tracing::error!(
                            "plc: {} refused verdict {} (seq {}): {refusal} (check the register map in [plc])",
                            config.address, record.verdict_id, record.seq
                        );
                    }
                    Err(e) => {
                        metrics.miss("down");
                        lost(&mut link, &metrics, &config, &e);
                    }
                }
            }
            _ = beat.tick() => {
                if let Some(ctx) = link.as_mut() {
                    heartbeat = heartbeat.wrapping_add(1);
                    let sent = tokio::time::timeout(
                        timeout,
                        ctx.write_single_register(config.heartbeat_register, heartbeat),
                    )
                    .await;
                    match sent {
                        Ok(Ok(Ok(()))) => {
                            metrics.heartbeat.set(heartbeat as i64);
                        }
                        Ok(Ok(Err(refusal))) => tracing::error!(
                            "plc: {} refused the heartbeat register {}: {refusal}",
                            config.address, config.heartbeat_register
                        ),
                        Ok(Err(e)) => lost(&mut link, &metrics, &config, &e.to_string()),
                        Err(_) => lost(&mut link, &metrics, &config, &"heartbeat timed out"),
                    }
                }
            }
        }
    }
}

fn lost(
    link: &mut Option<Context>,
    metrics: &PlcMetrics,
    config: &PlcConfig,
    error: &dyn std::fmt::Display,
) {
    tracing::warn!(
        "plc: link to {} lost: {error}; reconnecting",
        config.address
    );
    *link = None;
    metrics.connected.set(0);
}

async fn connect(config: &PlcConfig, timeout: Duration) -> Result<Context, String> {
    let attempt = async {
        let addr: SocketAddr = tokio::net::lookup_host(&config.address)
            .await
            .map_err(|e| format!("resolving {}: {e}", config.address))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", config.address))?;
        tokio_modbus::client::tcp::connect_slave(addr, Slave(config.unit_id))
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {} ms", config.timeout_ms))?
}

/// The record, then the coil. `Err`: the link failed; `Ok(Err)`: the PLC refused a request.
async fn write(
    ctx: &mut Context,
    config: &PlcConfig,
    record: &Record,
    timeout: Duration,
) -> Result<Result<(), String>, String> {
    let requests = async {
        if let Err(refusal) = ctx
            .write_multiple_registers(config.record_register, &record.words())
            .await?
        {
            return Ok(Err(format!(
                "record registers {}..{}: {refusal}",
                config.record_register,
                config.record_register + RECORD_LEN - 1
            )));
        }
        if let Err(refusal) = ctx.write_single_coil(config.pass_coil, record.pass).await? {
            return Ok(Err(format!("pass coil {}: {refusal}", config.pass_coil)));
        }
        Ok::<_, tokio_modbus::Error>(Ok(()))
    };
    match tokio::time::timeout(timeout, requests).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", config.timeout_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Defect, Undecided, UndecidedCause};

    fn verdict(id: u64, pass: bool, classes: &[&str]) -> Verdict {
        Verdict {
            id,
            device: "cam1".into(),
            frame: 3,
            line: 0x1_0002_0003,
            origin: "synthetic".into(),
            width: 200,
            height: 200,
            captured_ms: 1,
            decided_ms: 2,
            latency_ms: 1.0,
            pass,
            defects: classes
                .iter()
                .map(|c| Defect {
                    class: c.to_string(),
                    score: 0.9,
                    bbox: [0.0; 4],
                    fails: !pass,
                })
                .collect(),
            model: Some(("neu-edge".into(), 7)),
            undecided: None,
            position_mm: None,
        }
    }

    #[test]
    fn the_record_lays_out_as_documented() {
        let classes = default_classes();
        let v = verdict(
            0x0102_0304_0506_0708,
            false,
            &["scratches", "crazing", "oil"],
        );
        let r = Record::new(0x0009_000A, &v, &classes);
        assert_eq!(
            r.words(),
            [
                0x0009,
                0x000A,
                0,
                0,
                0b1000_0000_0010_0001,
                3,
                0x0002,
                0x0003,
                0,
                7,
                0x0102,
                0x0304,
                0x0506,
                0x0708
            ]
        );
        let mut u = verdict(5, false, &[]);
        u.undecided = Some(Undecided {
            cause: UndecidedCause::DetectorError,
            reason: "x".into(),
        });
        let w = Record::new(1, &u, &classes).words();
        assert_eq!((w[2], w[3], w[4]), (0, 1, 0));
        // Passing detections are not failing defects.
        let p = Record::new(2, &verdict(6, true, &["crazing"]), &classes).words();
        assert_eq!((w[0], p[2], p[4], p[5]), (0, 1, 0, 0));
    }

    #[test]
    fn maps_that_cannot_work_are_refused() {
        let base: PlcConfig = toml::from_str("address = \"127.0.0.1:502\"").unwrap();
        base.validate().unwrap();
        let overlap = PlcConfig {
            heartbeat_register: 5,
            ..base.clone()
        };
        assert!(
            overlap
                .validate()
                .unwrap_err()
                .contains("inside the verdict record")
        );
        let past = PlcConfig {
            record_register: 65530,
            ..base.clone()
        };
        assert!(past.validate().unwrap_err().contains("past 65535"));
        let many = PlcConfig {
            classes: (0..16).map(|i| i.to_string()).collect(),
            ..base
        };
        assert!(many.validate().unwrap_err().contains("mask holds 15"));
    }
}
