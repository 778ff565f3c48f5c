//! `edge fleet-sim`: N simulated devices in one process, for rollout tests and benchmarks at
//! fleet scale. Each device has its own MQTT connection (last will, retained status, reconnects
//! with back-off) and runs the daemon's own transfer code (`protocol::device`); what differs is
//! storage (chunks in memory, one copy shared by all devices) and installation (no detector: a
//! device activates a verified package at once, or fails its self-test when told to).
//!
//! Devices can be killed mid-transfer (the connection dropped, so the broker sends the last
//! will) and come back, or start offline. The run ends when every device has finished (or after
//! `--run-s`) and prints a JSON summary on stdout: activations, failures, reports per device,
//! chunk bytes received, what killed devices missed and were sent again, reconnect times.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use protocol::device::{Installed, Installer, MemoryStore, Outbound, Receiver, SharedChunks};
use protocol::messages::Message;
use protocol::mqtt::{BrokerConfig, Connection};
use protocol::package::{Manifest, Package, VerifyingKey, parse_public_key};
use protocol::topics::{Target, Topics, UpKind};
use protocol::{ModelRef, Offer, Report, Status};
use rumqttc::{LastWill, QoS};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Broker, HOST:PORT.
    #[arg(long)]
    broker: String,
    /// Site: the first level of the devices' topics.
    #[arg(long)]
    site: String,
    /// How many devices.
    #[arg(long)]
    devices: usize,
    /// Device ids are PREFIX-0000, PREFIX-0001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Groups every device is in (comma-separated).
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Public key file (hex) the devices trust.
    #[arg(long)]
    trusted: std::path::PathBuf,
    /// Version of the model the devices run at start.
    #[arg(long, default_value_t = 1)]
    active_version: u64,
    /// Percent of devices whose self-test fails.
    #[arg(long, default_value_t = 0.0)]
    fail_selftest: f64,
    /// Percent of devices killed mid-transfer...
    #[arg(long, default_value_t = 0.0)]
    kill: f64,
    /// ...once they hold this fraction of the chunks...
    #[arg(long, default_value_t = 0.5)]
    kill_at: f64,
    /// ...and back after this many seconds.
    #[arg(long, default_value_t = 20.0)]
    down_s: f64,
    /// Percent of devices offline at the start (known to the fleet: their last will says so)...
    #[arg(long, default_value_t = 0.0)]
    offline: f64,
    /// ...and back after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    offline_s: f64,
    /// Stop after this many seconds even if devices have not finished.
    #[arg(long, default_value_t = 600.0)]
    run_s: f64,
    /// Keep running this long after every device finished (reconnect measurements).
    #[arg(long, default_value_t = 2.0)]
    linger_s: f64,
    /// MQTT keep-alive, seconds. A client drops its connection when the broker's answer to a
    /// ping is later than this, and a simulated device's answer waits behind the chunks the
    /// broker is still delivering to a thousand others on the same machine.
    #[arg(long, default_value_t = 30)]
    keep_alive_s: u64,
    /// Each device logs in with its id as user name and this password (a broker with a
    /// password file and the ACL of `trainer fleet acl`).
    #[arg(long)]
    password: Option<String>,
}

/// What one device did, for the summary.
#[derive(Clone, Debug, Default, Serialize)]
struct DeviceStats {
    id: String,
    outcome: Option<String>,
    reports: u32,
    /// Reports by state (`receiving` counts the answer to the offer, half way, and answers
    /// to probes or after a reconnect).
    report_states: std::collections::BTreeMap<String, u32>,
    chunk_bytes: u64,
    killed: bool,
    offline_at_start: bool,
    /// Chunk bytes it lacked when killed, and chunk bytes received after it came back.
    missed_bytes: u64,
    resent_bytes: u64,
    /// Seconds from coming back (or from the start) to its final report.
    final_after_s: Option<f64>,
    /// Connections after the first (a kill's return not counted).
    reconnects: u32,
    /// Seconds from each lost connection to the next connection, where the loss was seen.
    reconnects_s: Vec<f64>,
}

/// Activation without a detector: the package was verified (signature, digest) by the
/// receiver; the self-test passes unless this device is set to fail it.
struct SimInstaller {
    active: Option<ModelRef>,
    fail_selftest: bool,
    staged: Option<Report>,
}

impl Installer for SimInstaller {
    fn check(&self, manifest: &Manifest, _offer: &Offer) -> Result<(), String> {
        match &self.active {
            Some(a) if manifest.version < a.version => Err(format!(
                "downgrade: v{} is not newer than the active v{}",
                manifest.version, a.version
            )),
            _ => Ok(()),
        }
    }

    fn active_version(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.version)
    }

    async fn install(
        &mut self,
        manifest: &Manifest,
        _package: Package,
        staged: Report,
    ) -> Installed {
        self.staged = Some(staged);
        if self.fail_selftest {
            return Installed::Failed("self-test failed (simulated)".into());
        }
        self.active = Some(ModelRef {
            id: manifest.id.clone(),
            version: manifest.version,
            sha256: manifest.weights.sha256.clone(),
        });
        Installed::Activated
    }
}

struct SimDevice {
    id: String,
    line: String,
    groups: Vec<String>,
    topics: Topics,
    receiver: Receiver<MemoryStore>,
    installer: SimInstaller,
    stats: DeviceStats,
}

impl SimDevice {
    fn status(&self, online: bool) -> Status {
        Status {
            device: self.id.clone(),
            line: self.line.clone(),
            groups: self.groups.clone(),
            edge_version: super::models::EDGE_VERSION.to_string(),
            online,
            active: self.installer.active.clone(),
            previous: vec![],
            on_trial: false,
            last_event: None,
            updated_unix: protocol::unix_now(),
        }
    }

    fn connect(&self, broker: &BrokerConfig) -> Result<Connection> {
        let mut broker = broker.clone();
        if broker.password.is_some() {
            broker.username = Some(self.id.clone());
        }
        let mut options = broker.options(&format!("sim-{}-{}", self.topics.site(), self.id))?;
        // A clean session: what a device missed while away comes from the publisher's repair,
        // not from the broker's queue.
        options.set_clean_session(true);
        options.set_last_will(LastWill::new(
            self.topics.up(&self.line, &self.id, UpKind::Status),
            self.status(false).encode(),
            QoS::AtLeastOnce,
            true,
        ));
        let mut targets = vec![Target::Device(self.id.clone()), Target::Fleet];
        targets.extend(self.groups.iter().map(|g| Target::Group(g.clone())));
        let subs = targets
            .iter()
            .map(|t| (self.topics.down_filter(t), QoS::AtLeastOnce))
            .collect();
        Ok(Connection::start_device(options, subs))
    }

    async fn send(&mut self, conn: &Connection) {
        if let Some(r) = self.installer.staged.take() {
            self.publish_report(conn, r).await;
        }
        for out in self.receiver.take_outbound() {
            match out {
                Outbound::Report(r) => {
                    let final_report = r.state.is_final();
                    if final_report {
                        self.stats.outcome = Some(format!("{:?}", r.state).to_lowercase());
                    }
                    self.publish_report(conn, r).await;
                    if final_report {
                        self.publish_status(conn).await;
                    }
                }
                Outbound::Subscribe(f) => {
                    let _ = conn.client.subscribe(f, QoS::AtLeastOnce).await;
                }
                Outbound::Unsubscribe(f) => {
                    let _ = conn.client.unsubscribe(f).await;
                }
            }
        }
    }

    /// Connected (again): the status, and where a transfer under way stands.
    async fn on_up(&mut self, conn: &Connection) {
        self.publish_status(conn).await;
        self.receiver.on_connected();
        self.send(conn).await;
    }

    async fn publish_report(&mut self, conn: &Connection, r: Report) {
        self.stats.reports += 1;
        *self
            .stats
            .report_states
            .entry(format!("{:?}", r.state).to_lowercase())
            .or_default() += 1;
        let topic = self.topics.up(&self.line, &self.id, UpKind::Report);
        let _ = conn.publish(topic, r.encode(), false).await;
    }

    async fn publish_status(&self, conn: &Connection) {
        let topic = self.topics.up(&self.line, &self.id, UpKind::Status);
        let _ = conn.publish(topic, self.status(true).encode(), true).await;
    }
}

/// Whether a device is among `percent` of the fleet, chosen by a hash of its id salted by `what`.
fn chosen(id: &str, what: &str, percent: f64) -> bool {
    let h = protocol::sha256_hex(format!("{what}/{id}").as_bytes());
    let x = u64::from_str_radix(&h[..12], 16).expect("hex") as f64 / (1u64 << 48) as f64;
    x * 100.0 < percent
}

pub fn run(args: Args) -> Result<()> {
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .context("--broker: HOST:PORT")?;
    let mut broker = BrokerConfig::plain(host, port.parse().context("--broker: port")?);
    broker.keep_alive_s = args.keep_alive_s;
    broker.password = args.password.clone();
    let key = std::fs::read_to_string(&args.trusted)
        .with_context(|| format!("reading {}", args.trusted.display()))?;
    let trusted: Vec<VerifyingKey> = vec![
        parse_public_key(&key).map_err(|e| anyhow::anyhow!("{}: {e}", args.trusted.display()))?,
    ];
    let topics = Topics::new(&args.site)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shared = SharedChunks::default();
    let start = Instant::now();
    let stats = runtime.block_on(async {
        let mut tasks = vec![];
        for i in 0..args.devices {
            let id = format!("{}-{i:04}", args.prefix);
            let store = MemoryStore::new(shared.clone());
            let device = SimDevice {
                line: format!("line{}", i % 20),
                groups: args.groups.clone(),
                topics: topics.clone(),
                receiver: Receiver::new(&id, topics.clone(), trusted.clone(), store),
                installer: SimInstaller {
                    active: Some(ModelRef {
                        id: "sim".into(),
                        version: args.active_version,
                        sha256: "0".repeat(64),
                    }),
                    fail_selftest: chosen(&id, "selftest", args.fail_selftest),
                    staged: None,
                },
                stats: DeviceStats {
                    id: id.clone(),
                    killed: chosen(&id, "kill", args.kill),
                    offline_at_start: chosen(&id, "offline", args.offline),
                    ..Default::default()
                },
                id,
            };
            let plan = Plan {
                broker: broker.clone(),
                kill_at: args.kill_at,
                down: Duration::from_secs_f64(args.down_s),
                offline: Duration::from_secs_f64(args.offline_s),
                until: start + Duration::from_secs_f64(args.run_s),
                linger: Duration::from_secs_f64(args.linger_s),
            };
            tasks.push(tokio::spawn(run_device(device, plan)));
            // Connections ramp up rather than all at one instant.
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut stats = vec![];
        for t in tasks {
            if let Ok(s) = t.await {
                stats.push(s);
            }
        }
        stats
    });
    let summary = summarize(&stats, start.elapsed());
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

struct Plan {
    broker: BrokerConfig,
    kill_at: f64,
    down: Duration,
    offline: Duration,
    until: Instant,
    linger: Duration,
}

async fn run_device(mut dev: SimDevice, plan: Plan) -> DeviceStats {
    let mut since = Instant::now();
    if dev.stats.offline_at_start {
        // Known to the fleet, then gone: connect once, drop the connection (the last will
        // marks it offline), come back later.
        if let Ok(mut conn) = dev.connect(&plan.broker)
            && conn.wait_connected(Duration::from_secs(60)).await.is_ok()
        {
            dev.publish_status(&conn).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop_connection(conn);
        }
        tokio::time::sleep(plan.offline).await;
        since = Instant::now();
    }
    let mut kill_pending = dev.stats.killed;
    let mut finished_at: Option<Instant> = None;
    loop {
        let Ok(mut conn) = dev.connect(&plan.broker) else {
            return dev.stats;
        };
        if conn.wait_connected(Duration::from_secs(60)).await.is_err() {
            return dev.stats;
        }
        dev.on_up(&conn).await;
        let mut lost_at: Option<Instant> = None;
        let killed = loop {
            if Instant::now() >= plan.until
                || finished_at.is_some_and(|t| t.elapsed() >= plan.linger)
            {
                break false;
            }
            tokio::select! {
                changed = conn.connected.changed() => {
                    if changed.is_err() {
                        break false;
                    }
                    let up = *conn.connected.borrow();
                    if up {
                        // Connected again (the first connection was awaited above); the loss
                        // itself is missed when it came and went while the device was busy.
                        dev.stats.reconnects += 1;
                        if let Some(t) = lost_at.take() {
                            dev.stats.reconnects_s.push(t.elapsed().as_secs_f64());
                        }
                        dev.on_up(&conn).await;
                    } else if lost_at.is_none() {
                        lost_at = Some(Instant::now());
                    }
                }
                msg = conn.incoming.recv() => {
                    let Some(msg) = msg else { break false };
                    let is_chunk = dev
                        .topics
                        .parse_transfer(&msg.topic)
                        .map(|(_, k)| k)
                        .or_else(|| dev.topics.parse_down(&msg.topic).map(|(_, k)| k))
                        == Some(protocol::topics::DownKind::Chunk);
                    if is_chunk {
                        let n = msg.payload.len().saturating_sub(protocol::messages::CHUNK_HEADER) as u64;
                        dev.stats.chunk_bytes += n;
                        if dev.stats.killed && !kill_pending {
                            dev.stats.resent_bytes += n;
                        }
                    }
                    dev.receiver.handle(&msg.topic, &msg.payload, &mut dev.installer).await;
                    dev.send(&conn).await;
                    if dev.stats.outcome.is_some() && finished_at.is_none() {
                        finished_at = Some(Instant::now());
                        dev.stats.final_after_s = Some(since.elapsed().as_secs_f64());
                    }
                    if kill_pending
                        && let Some((manifest, have, count)) = dev.receiver.under_way()
                        && have as f64 >= plan.kill_at * count as f64
                    {
                        let chunk = manifest.weights.size.div_ceil(count.max(1) as u64);
                        dev.stats.missed_bytes = (count - have) as u64 * chunk;
                        kill_pending = false;
                        break true;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        };
        if killed {
            drop_connection(conn);
            tokio::time::sleep(plan.down).await;
            since = Instant::now();
            continue;
        }
        // Leaving: say so (a clean disconnect sends no last will).
        let topic = dev.topics.up(&dev.line, &dev.id, UpKind::Status);
        let _ = conn.publish(topic, dev.status(false).encode(), true).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.close().await;
        return dev.stats;
    }
}

/// Drops a connection without a DISCONNECT: the broker sees the socket close and sends the
/// last will, as for a device that lost power.
fn drop_connection(conn: Connection) {
    conn.abort();
}

#[derive(Serialize)]
struct Summary {
    devices: usize,
    activated: usize,
    failed: usize,
    refused: usize,
    unfinished: usize,
    reports_max: u32,
    reports_mean: f64,
    reports_by_state: std::collections::BTreeMap<String, u32>,
    chunk_bytes: u64,
    killed: usize,
    killed_missed_bytes: u64,
    killed_resent_bytes: u64,
    offline_at_start: usize,
    /// Slowest final report after a device came back (offline-at-start and killed devices).
    returned_final_max_s: Option<f64>,
    reconnects: usize,
    devices_reconnected: usize,
    reconnect_max_s: Option<f64>,
    elapsed_s: f64,
    per_device: Vec<DeviceStats>,
}

fn summarize(stats: &[DeviceStats], elapsed: Duration) -> Summary {
    let count = |o: &str| {
        stats
            .iter()
            .filter(|s| s.outcome.as_deref() == Some(o))
            .count()
    };
    let killed: Vec<&DeviceStats> = stats.iter().filter(|s| s.killed).collect();
    let returned = stats
        .iter()
        .filter(|s| s.killed || s.offline_at_start)
        .filter_map(|s| s.final_after_s)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let reconnects: Vec<f64> = stats.iter().flat_map(|s| s.reconnects_s.clone()).collect();
    Summary {
        devices: stats.len(),
        activated: count("activated"),
        failed: count("failed"),
        refused: count("refused"),
        unfinished: stats.iter().filter(|s| s.outcome.is_none()).count(),
        reports_max: stats.iter().map(|s| s.reports).max().unwrap_or(0),
        reports_mean: stats.iter().map(|s| s.reports as f64).sum::<f64>()
            / stats.len().max(1) as f64,
        reports_by_state: stats.iter().fold(Default::default(), |mut all, s| {
            for (k, v) in &s.report_states {
                *all.entry(k.clone()).or_default() += v;
            }
            all
        }),
        chunk_bytes: stats.iter().map(|s| s.chunk_bytes).sum(),
        killed: killed.len(),
        killed_missed_bytes: killed.iter().map(|s| s.missed_bytes).sum(),
        killed_resent_bytes: killed.iter().map(|s| s.resent_bytes).sum(),
        offline_at_start: stats.iter().filter(|s| s.offline_at_start).count(),
        returned_final_max_s: returned,
        reconnects: stats.iter().map(|s| s.reconnects as usize).sum(),
        devices_reconnected: stats.iter().filter(|s| s.reconnects > 0).count(),
        reconnect_max_s: reconnects
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        elapsed_s: elapsed.as_secs_f64(),
        per_device: stats.to_vec(),
    }
}
