//! The publishing side of a rollout, for one device or a fleet of thousands: devices learned from
//! their retained statuses, split into waves; each wave offered (at a set rate), its chunks
//! broadcast once on the transfer's topic to the devices receiving it, what one device misses
//! repaired on that device's own topic, quiet devices probed one by one, and every device's
//! verdict collected. The next wave starts when the previous one reached its success threshold;
//! the rollout aborts when the failure rate passes the abort threshold. Devices offline at the
//! start are served when their status says they are back. With a record file the publisher can
//! be restarted and continue the same rollout.

mod fleet;
mod plan;
mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::messages::{
    Chunk, Complete, Message, ModelRef, Offer, Report, ReportState, Status, from_ranges,
};
use crate::mqtt::{BrokerConfig, Connection, Incoming};
use crate::package::{Manifest, Package, VerifyingKey};
use crate::topics::{DownKind, Target, Topics, UpKind};
use crate::{ProtocolError, sha256_hex};
use fleet::{BUCKETS, Bucket, Dev, Fleet, Phase};
use plan::{plan_waves, wave_labels};
use record::{Journal, Plan, Record};

/// One wave of a rollout plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Wave {
    /// This percentage of the target's devices (spread by a hash of their ids).
    Percent(f64),
    /// The target's devices that this target also addresses (a canary group).
    Target(Target),
}

impl std::str::FromStr for Wave {
    type Err = ProtocolError;
    /// `5%` or a target (`group:canary`, `device:cam1`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| {
                ProtocolError::Invalid(format!("wave `{s}`: not a percentage like 5%"))
            })?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(ProtocolError::Invalid(format!(
                    "wave `{s}`: the percentage must be above 0 and at most 100"
                )));
            }
            return Ok(Wave::Percent(p));
        }
        Ok(Wave::Target(s.parse()?))
    }
}

/// Stop the rollout when this fraction of finished devices failed, once `min_finished` have.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Abort {
    pub failure_fraction: f64,
    pub min_finished: usize,
}

/// How a rollout runs.
#[derive(Clone, Debug)]
pub struct RolloutOptions {
    pub site: String,
    pub target: Target,
    /// The plan; the target's devices that no wave names form a last wave. Empty: one wave.
    pub waves: Vec<Wave>,
    /// A wave is a success when this fraction of its finished devices activated; otherwise the
    /// rollout halts before the next wave.
    pub wave_success: f64,
    /// Offers per minute at most (AWS IoT's `maximumPerMinute`); `None`: no limit.
    pub max_per_minute: Option<u32>,
    pub abort: Option<Abort>,
    pub chunk_size: usize,
    /// The whole rollout: devices that never came online by then are reported as not served.
    pub timeout: Duration,
    /// A device that has not finished this long after its offer timed out (a failure).
    pub device_timeout: Duration,
    /// A device that has said nothing for this long while it should be receiving is asked where
    /// it is (then at twice the interval, up to a minute).
    pub probe_after: Duration,
    /// Longest wait for the retained statuses that tell who is in the fleet.
    pub discovery: Duration,
    /// Where the rollout is recorded; an existing record of the same package and target is
    /// continued.
    pub record: Option<PathBuf>,
}

impl RolloutOptions {
    pub fn new(site: &str, target: Target) -> Self {
        Self {
            site: site.to_string(),
            target,
            waves: vec![],
            wave_success: 1.0,
            max_per_minute: None,
            abort: None,
            chunk_size: 256 << 10,
            timeout: Duration::from_secs(600),
            device_timeout: Duration::from_secs(600),
            probe_after: Duration::from_secs(5),
            discovery: Duration::from_secs(5),
            record: None,
        }
    }
}

/// How one device ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceOutcome {
    pub device: String,
    /// `None`: no final answer (never online, or timed out).
    pub state: Option<ReportState>,
    pub reason: Option<String>,
}

impl DeviceOutcome {
    pub fn succeeded(&self) -> bool {
        self.state == Some(ReportState::Activated)
    }
}

/// `device: state (reason)`, as the publisher's lines and final table show it.
impl std::fmt::Display for DeviceOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.state {
            Some(s) => write!(f, "{}: {}", self.device, format!("{s:?}").to_lowercase())?,
            None => write!(f, "{}: no answer", self.device)?,
        }
        match &self.reason {
            Some(r) => write!(f, " ({r})"),
            None => Ok(()),
        }
    }
}

/// One wave's devices and how they ended.
#[derive(Clone, Debug)]
pub struct WaveReport {
    pub label: String,
    pub devices: Vec<DeviceOutcome>,
}

/// Result of a rollout.
#[derive(Clone, Debug)]
pub struct RolloutReport {
    pub version: u64,
    pub waves: Vec<WaveReport>,
    /// Why the rollout stopped before its end (a wave under its success threshold, the abort
    /// threshold); nothing was offered after.
    pub halted: Option<String>,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    /// Bytes of chunks sent to one device on its own topic (repairs).
    pub repair_bytes: u64,
    pub elapsed: Duration,
}

impl RolloutReport {
    pub fn succeeded(&self) -> bool {
        self.halted.is_none()
            && self
                .waves
                .iter()
                .all(|w| w.devices.iter().all(DeviceOutcome::succeeded))
    }
}

/// The offer for `package` cut into `chunk_size` pieces (`package.weights.chunks(chunk_size)`).
pub fn offer_for(
    package: &Package,
    target: &Target,
    chunk_size: usize,
) -> Result<Offer, ProtocolError> {
    Ok(Offer {
        transfer: crate::messages::transfer_hex(&package.manifest_bytes, &package.signature),
        target: target.clone(),
        manifest: String::from_utf8(package.manifest_bytes.clone())
            .map_err(|_| ProtocolError::malformed("manifest", "not UTF-8"))?,
        signature: hex::encode(package.signature),
        size: package.weights.len() as u64,
        chunk_size: chunk_size as u32,
        chunks: package.weights.chunks(chunk_size).map(sha256_hex).collect(),
    })
}

/// What the send task publishes, in order.
enum Job {
    Chunk {
        topic: String,
        index: u32,
    },
    /// The offer addressed to one device, encoded when it goes out: a wave of thousands of
    /// offers (each carries the manifest) does not sit in the queue in full.
    Offer {
        topic: String,
        device: String,
    },
    Message {
        topic: String,
        payload: Vec<u8>,
    },
}

/// Publishes jobs in order; `done` counts the jobs handed to the client.
struct Sender {
    tx: mpsc::UnboundedSender<Job>,
    queued: u64,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    chunks: Arc<AtomicU64>,
}

impl Sender {
    fn start(
        conn: &Connection,
        pieces: Arc<Vec<Vec<u8>>>,
        transfer: [u8; 32],
        offer: Arc<Offer>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let chunks = Arc::new(AtomicU64::new(0));
        let client = conn.client.clone();
        let (d, s, b, c) = (done.clone(), stop.clone(), bytes.clone(), chunks.clone());
        tokio::spawn(async move {
            let count = pieces.len() as u32;
            while let Some(job) = rx.recv().await {
                if !s.load(Ordering::Relaxed) {
                    let (topic, payload) = match job {
                        Job::Chunk { topic, index } => {
                            let data = &pieces[index as usize];
                            b.fetch_add(data.len() as u64, Ordering::Relaxed);
                            c.fetch_add(1, Ordering::Relaxed);
                            let frame = Chunk {
                                transfer,
                                index,
                                count,
                                data,
                            }
                            .encode();
                            (topic, frame)
                        }
                        Job::Offer { topic, device } => {
                            let mut o = (*offer).clone();
                            o.target = Target::Device(device);
                            (topic, o.encode())
                        }
                        Job::Message { topic, payload } => (topic, payload),
                    };
                    if client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                d.fetch_add(1, Ordering::Release);
            }
        });
        Self {
            tx,
            queued: 0,
            done,
            stop,
            bytes,
            chunks,
        }
    }

    /// Queues a job; returns its position (done once `done() > position`).
    fn push(&mut self, job: Job) -> u64 {
        let _ = self.tx.send(job);
        self.queued += 1;
        self.queued - 1
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    fn idle(&self) -> bool {
        self.done() >= self.queued
    }
}

/// The retained statuses of a site's devices, read until they stop coming (at most `longest`).
pub async fn fleet_statuses(
    broker: &BrokerConfig,
    site: &str,
    longest: Duration,
) -> Result<BTreeMap<String, Status>, ProtocolError> {
    let topics = Topics::new(site)?;
    let client_id = format!("fleet-{}-{}", std::process::id(), crate::unix_now_ms());
    let mut mqtt_options = broker.options(&client_id)?;
    mqtt_options.set_clean_session(true);
    let mut conn = Connection::start_publisher(
        mqtt_options,
        vec![(topics.up_all(UpKind::Status), QoS::AtLeastOnce)],
    );
    conn.wait_connected(Duration::from_secs(15)).await?;
    let (statuses, _) = discover(&mut conn, &topics, longest).await?;
    conn.close().await;
    Ok(statuses)
}

/// Who is there: retained statuses arrive at once after the subscription; stop listening when
/// they stop coming. Reports that arrive meanwhile are kept for the rollout.
async fn discover(
    conn: &mut Connection,
    topics: &Topics,
    longest: Duration,
) -> Result<(BTreeMap<String, Status>, Vec<Incoming>), ProtocolError> {
    let mut statuses: BTreeMap<String, Status> = BTreeMap::new();
    let mut early_reports = vec![];
    let until = Instant::now() + longest;
    let mut quiet = Duration::from_millis(1000);
    loop {
        let wake = (Instant::now() + quiet).min(until);
        match tokio::time::timeout_at(wake.into(), conn.incoming.recv()).await {
            Ok(Some(msg)) => {
                match topics.parse_up(&msg.topic) {
                    Some((_, device, UpKind::Status)) => match Status::decode(&msg.payload) {
                        Ok(s) if s.device == device => {
                            statuses.insert(device.to_string(), s);
                        }
                        Ok(_) => tracing::warn!("{}: status names another device", msg.topic),
                        Err(e) => tracing::warn!("{}: {e}", msg.topic),
                    },
                    Some((_, _, UpKind::Report)) => early_reports.push(msg),
                    _ => {}
                }
                quiet = Duration::from_millis(300);
            }
            Ok(None) => return Err(ProtocolError::Mqtt("connection closed".into())),
            Err(_) => break,
        }
    }
    Ok((statuses, early_reports))
}

/// Room a publish needs besides its payload: fixed header, packet id and the longest topic a
/// chunk goes on (`edgeinsp/SITE/down/device/ID/chunk`, site and id of at most 64 bytes).
const PUBLISH_OVERHEAD: usize = 512;

/// The chunk size to send: the one asked for (within what devices accept), made to fit under
/// the broker's packet limit.
fn fit_chunk(asked: usize, limit: Option<u32>) -> Result<usize, ProtocolError> {
    use crate::messages::{CHUNK_HEADER, MAX_CHUNK, MIN_CHUNK};
    let asked = asked.clamp(MIN_CHUNK, MAX_CHUNK);
    let Some(limit) = limit else {
        return Ok(asked);
    };
    let room = (limit as usize).saturating_sub(PUBLISH_OVERHEAD + CHUNK_HEADER) & !1023;
    if room < MIN_CHUNK {
        return Err(ProtocolError::Invalid(format!(
            "the broker accepts packets of at most {limit} bytes (its MQTT v5 CONNACK), too small \
             for the smallest chunk ({} KiB): raise max_packet_size on the broker",
            MIN_CHUNK >> 10
        )));
    }
    Ok(asked.min(room))
}

/// Publishes `package` (verified first against `trusted`, when given) and runs the rollout.
/// `progress` hears the waves, the devices that fail, and every two seconds the open waves'
/// counts while they change.
pub async fn rollout(
    broker: &BrokerConfig,
    package: &Package,
    trusted: &[VerifyingKey],
    options: &RolloutOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RolloutReport, ProtocolError> {
    let start = Instant::now();
    let manifest = if trusted.is_empty() {
        Manifest::from_json(&package.manifest_bytes)?
    } else {
        package.verify(trusted)?
    };
    let topics = Topics::new(&options.site)?;
    // A broker that states its largest packet (MQTT v5 CONNACK) gets chunks that fit.
    let limit = broker.max_packet_size().await?;
    let chunk_size = fit_chunk(options.chunk_size, limit)?;
    if let Some(limit) = limit {
        let asked = options
            .chunk_size
            .clamp(crate::messages::MIN_CHUNK, crate::messages::MAX_CHUNK);
        progress(&format!(
            "the broker accepts packets of up to {limit} bytes (MQTT v5 CONNACK): chunks of {} KiB{}",
            chunk_size >> 10,
            if chunk_size < asked {
                format!(", not the {} KiB asked for", asked >> 10)
            } else {
                String::new()
            }
        ));
    }
    let client_id = format!("publisher-{}-{}", std::process::id(), crate::unix_now_ms());
    // A broker delivering a large broadcast to thousands answers pings late: a short keep-alive
    // would drop the publisher in the middle of it.
    let mut broker = broker.clone();
    broker.keep_alive_s = broker.keep_alive_s.max(60);
    let mut mqtt_options = broker.options(&client_id)?;
    mqtt_options.set_clean_session(true);
    let mut conn = Connection::start_publisher(
        mqtt_options,
        vec![
            (topics.up_all(UpKind::Status), QoS::AtLeastOnce),
            (topics.up_all(UpKind::Report), QoS::AtLeastOnce),
        ],
    );
    conn.wait_connected(Duration::from_secs(15)).await?;
    let (statuses, early_reports) = discover(&mut conn, &topics, options.discovery).await?;

    let offer = offer_for(package, &options.target, chunk_size)?;
    if let Some(limit) = limit {
        let size = offer.encode().len() + PUBLISH_OVERHEAD;
        if size > limit as usize {
            return Err(ProtocolError::Invalid(format!(
                "the offer for this package needs a {size}-byte packet, more than the broker's \
                 limit of {limit} bytes (its MQTT v5 CONNACK): raise max_packet_size on the broker"
            )));
        }
    }
    let transfer_hex = offer.transfer.clone();
    let transfer = crate::messages::transfer_id(&transfer_hex)?;
    let count = offer.chunks.len() as u32;
    let model = ModelRef {
        id: manifest.id.clone(),
        version: manifest.version,
        sha256: manifest.weights.sha256.clone(),
    };

    // The plan: from the record when it is this rollout's, else from the statuses.
    let previous = match &options.record {
        Some(path) => Record::read(path)?,
        None => None,
    };
    if let (Some(r), Some(path)) = (&previous, &options.record)
        && (r.plan.transfer != transfer_hex || r.plan.target != options.target.to_string())
    {
        return Err(ProtocolError::Invalid(format!(
            "rollout record {} is of another rollout (transfer {}, target {}): \
             remove it or name another --record",
            path.display(),
            &r.plan.transfer[..16.min(r.plan.transfer.len())],
            r.plan.target
        )));
    }
    let existing = previous.is_some();
    let record = match previous {
        Some(r) => {
            progress(&format!(
                "continuing the recorded rollout: wave {}/{}, {} device(s) finished",
                r.wave + 1,
                r.plan.waves.len(),
                r.finished.len()
            ));
            r
        }
        None => {
            let members: Vec<String> = match &options.target {
                Target::Device(id) => vec![id.clone()],
                t => statuses
                    .values()
                    .filter(|s| t.includes(&s.device, &s.groups))
                    .map(|s| s.device.clone())
                    .collect(),
            };
            if members.is_empty() {
                return Err(ProtocolError::Invalid(format!(
                    "no device reported itself in {}",
                    options.target
                )));
            }
            Record::new(Plan {
                transfer: transfer_hex.clone(),
                target: options.target.to_string(),
                waves: plan_waves(&members, &options.waves, &statuses),
            })
        }
    };
    let mut journal = match &options.record {
        Some(path) => Journal::open(path, &record, existing)?,
        None => Journal::none(),
    };
    let waves = &record.plan.waves;
    let mut wave = record.wave;
    let mut halted = record.halted.clone();
    let labels = wave_labels(&options.waves, waves.len());
    let mut fleet = Fleet::new(
        waves.len(),
        waves
            .iter()
            .enumerate()
            .flat_map(|(w, ids)| ids.iter().map(move |id| (w, id)))
            .map(|(w, id)| {
                // A device addressed by id without a status yet is tried at once.
                let online = statuses.get(id).is_none_or(|s| s.online);
                let already = statuses
                    .get(id)
                    .filter(|s| s.active.as_ref() == Some(&model))
                    .map(|_| DeviceOutcome {
                        device: id.clone(),
                        state: Some(ReportState::Activated),
                        reason: Some("already active".into()),
                    });
                let outcome = record.finished.get(id).cloned().or(already);
                let mut d = Dev::new(id, w, online, outcome);
                d.probe_every = options.probe_after;
                d
            })
            .collect(),
    );
    progress(&format!(
        "rolling out {} v{} ({} bytes in {count} chunks of {} KiB) to {} device(s) of {} in {} wave(s): {}",
        manifest.id,
        manifest.version,
        package.weights.len(),
        chunk_size >> 10,
        fleet.len(),
        options.target,
        waves.len(),
        waves
            .iter()
            .zip(&labels)
            .map(|(w, l)| format!("{l} {}", w.len()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let tell = Tell {
        progress,
        each_device: fleet.len() <= 20,
    };

    let pieces: Arc<Vec<Vec<u8>>> = Arc::new(
        package
            .weights
            .chunks(chunk_size)
            .map(<[u8]>::to_vec)
            .collect(),
    );
    let mut sender = Sender::start(&conn, pieces.clone(), transfer, Arc::new(offer.clone()));
    let chunk_topic = topics.transfer(&transfer_hex, DownKind::Chunk);
    let complete = Complete {
        transfer: transfer_hex.clone(),
        chunks: count,
    }
    .encode();

    // The broadcast under way: chunk index -> queue position.
    let mut round: HashMap<u32, u64> = HashMap::new();
    // Devices that answered their offer and wait for a broadcast, since when.
    let mut gather_since: Option<Instant> = None;
    let mut last_answer = Instant::now();
    // The last report from any device: while reports keep coming the broker is still
    // delivering a broadcast, and a device that has not spoken yet is not lost.
    let mut heard_any = Instant::now();
    // The devices of the broadcast the broker may still be delivering.
    let mut delivering: Option<Vec<usize>> = None;
    let mut tokens = options
        .max_per_minute
        .map(|m| (m.max(1) as f64 / 60.0).max(1.0));
    let mut last_refill = Instant::now();
    let mut repair_bytes = 0u64;
    // The connection's ups and downs: after a drop, what was handed to the client may be lost.
    let mut link = conn.connected.clone();
    link.mark_unchanged();
    let mut wave_announced: Option<usize> = None;
    let deadline = start + options.timeout;
    // Timeouts, probes and progress walk the devices in flight: four times a second, not on
    // every tick.
    let mut slow_due = Instant::now();
    let mut told: Vec<[usize; BUCKETS]> = vec![[0; BUCKETS]; waves.len()];
    let mut tell_due = Instant::now() + Duration::from_secs(2);

    for msg in early_reports {
        take_in(
            &topics,
            &msg,
            &transfer_hex,
            &model,
            count,
            &mut fleet,
            &mut journal,
            &tell,
        );
    }

    loop {
        let now = Instant::now();
        let slow = now >= slow_due;
        // 0. This publisher lost the broker (and came back): what it handed to the client
        // meanwhile may be lost, and a restarted broker has forgotten which devices listened on
        // the transfer's topic (their reconnect statuses came while this publisher was away).
        // Everything from here goes to each device's own topic, and quiet devices are probed
        // without waiting for a broadcast that may never arrive.
        if link.has_changed().unwrap_or(false) {
            let up = *link.borrow_and_update();
            round.clear();
            delivering = None;
            gather_since = None;
            for &i in &fleet.active {
                fleet.devs[i].subscribed = false;
            }
            if up {
                tracing::info!("reconnected to the broker: repairs go to each device's own topic");
            }
        }
        if slow {
            slow_due = now + Duration::from_millis(250);
        }

        // 1. Timeouts, abort.
        if slow {
            let expired: Vec<usize> = fleet
                .active
                .iter()
                .copied()
                .filter(|&i| {
                    fleet.devs[i]
                        .offered_at
                        .is_some_and(|t| now.duration_since(t) >= options.device_timeout)
                })
                .collect();
            for i in expired {
                let reason = format!(
                    "timed out: no final report {} s after the offer",
                    options.device_timeout.as_secs()
                );
                finish(&mut fleet, &mut journal, i, None, Some(reason), &tell);
            }
        }
        if halted.is_none()
            && let Some(abort) = options.abort
        {
            let (finished, failed) = fleet.finished();
            if finished >= abort.min_finished.max(1)
                && failed as f64 >= abort.failure_fraction * finished as f64
            {
                let why = format!(
                    "aborted: {failed} of {finished} finished device(s) failed, the threshold is {:.0}% after {}",
                    abort.failure_fraction * 100.0,
                    abort.min_finished
                );
                journal.halted(&why);
                halted = Some(why);
            }
        }

        // 2. Waves.
        if halted.is_none() {
            while wave < waves.len() && fleet.settled(wave) {
                let c = fleet.counts(wave);
                let ok = c[Bucket::Activated as usize];
                let finished = ok + c[Bucket::Failed as usize];
                if finished > 0 && (ok as f64) < options.wave_success * finished as f64 {
                    let why = format!(
                        "{} reached {ok} of {finished} activated, under the {:.0}% success threshold",
                        labels[wave],
                        options.wave_success * 100.0
                    );
                    journal.halted(&why);
                    halted = Some(why);
                    break;
                }
                if wave + 1 == waves.len() {
                    break;
                }
                progress(&format!(
                    "{}: {ok} of {finished} activated{}",
                    labels[wave],
                    match c[Bucket::Offline as usize] {
                        0 => String::new(),
                        n => format!(", {n} offline (served when back)"),
                    }
                ));
                wave += 1;
                journal.wave(wave);
            }
        }
        if let Some(why) = &halted {
            sender.stop.store(true, Ordering::Relaxed);
            progress(&format!("rollout halted: {why}"));
            break;
        }
        if wave_announced != Some(wave) {
            wave_announced = Some(wave);
            progress(&format!(
                "{}: offering to {} device(s): {}",
                labels[wave],
                waves[wave].len(),
                preview(&waves[wave])
            ));
        }

        // 3. Offers: devices of open waves, online, within the rate limit.
        if let Some(t) = tokens.as_mut() {
            let per_s = options.max_per_minute.unwrap_or(60) as f64 / 60.0;
            *t = (*t + per_s * now.duration_since(last_refill).as_secs_f64()).min(per_s.max(1.0));
            last_refill = now;
        }
        'offers: for w in 0..=wave {
            let limit = tokens.map_or(usize::MAX, |t| t as usize);
            let ready: Vec<usize> = fleet.ready[w].iter().copied().take(limit).collect();
            for i in ready {
                if let Some(t) = tokens.as_mut() {
                    if *t < 1.0 {
                        break 'offers;
                    }
                    *t -= 1.0;
                }
                let id = fleet.devs[i].id.clone();
                let pos = sender.push(Job::Offer {
                    topic: topics.down(&Target::Device(id.clone()), DownKind::Offer),
                    device: id,
                });
                fleet.update(i, |d| {
                    d.last_send = pos;
                    d.phase = Phase::Offered;
                    d.offered_at.get_or_insert(now);
                    d.last_heard = now;
                    d.next_probe = now + options.probe_after;
                    d.probe_every = options.probe_after;
                });
            }
        }

        // 4. Chunks: one broadcast for devices that answered together, repairs one by one.
        let done = sender.done();
        round.retain(|_, pos| *pos >= done);
        let needy: Vec<usize> = std::mem::take(&mut fleet.needy).into_iter().collect();
        let mut waiting: Vec<usize> = vec![];
        for &i in &needy {
            let d = &mut fleet.devs[i];
            if d.phase != Phase::Receiving || d.missing.is_empty() {
                continue;
            }
            // What the broadcast under way still carries comes from there (to a subscriber);
            // what was just sent to it on its own topic is on its way.
            let subscribed = d.subscribed;
            let sent = &d.sent;
            d.missing.retain(|i| {
                let coming = subscribed && round.contains_key(i);
                let just_sent = sent.get(i).is_some_and(|(pos, at)| {
                    *pos >= done || now.duration_since(*at) < Duration::from_secs(1)
                });
                !coming && !just_sent
            });
            if !d.missing.is_empty() {
                waiting.push(i);
            }
        }
        if !waiting.is_empty() {
            let since = *gather_since.get_or_insert(now);
            // Answers to a wave's offers come over a second or two: wait until they stop coming
            // (or all are in) so that one broadcast serves them.
            let gathered = fleet.all_answered()
                || now.duration_since(last_answer) >= Duration::from_millis(300)
                || now.duration_since(since) >= Duration::from_secs(3);
            // Only devices on the transfer's topic can share a broadcast.
            let (listening, alone): (Vec<usize>, Vec<usize>) =
                waiting.into_iter().partition(|&i| fleet.devs[i].subscribed);
            if round.is_empty() && gathered && listening.len() >= 2 {
                repair(
                    &mut fleet,
                    &alone,
                    &pieces,
                    &topics,
                    &mut sender,
                    &mut repair_bytes,
                    now,
                );
                let mut union = BTreeSet::new();
                for &i in &listening {
                    union.extend(std::mem::take(&mut fleet.devs[i].missing));
                }
                for &index in &union {
                    round.insert(
                        index,
                        sender.push(Job::Chunk {
                            topic: chunk_topic.clone(),
                            index,
                        }),
                    );
                }
                let end = sender.push(Job::Message {
                    topic: topics.transfer(&transfer_hex, DownKind::Complete),
                    payload: complete.clone(),
                });
                for &i in &listening {
                    let d = &mut fleet.devs[i];
                    d.last_send = end;
                    d.next_probe = now + d.probe_every;
                }
                delivering = Some(listening);
                gather_since = None;
            } else if !round.is_empty() || gathered {
                // One device, or late for the broadcast under way: its own topic.
                let all: Vec<usize> = listening.into_iter().chain(alone).collect();
                repair(
                    &mut fleet,
                    &all,
                    &pieces,
                    &topics,
                    &mut sender,
                    &mut repair_bytes,
                    now,
                );
                gather_since = None;
            } else {
                // Devices that do not listen on the transfer's topic need not wait.
                repair(
                    &mut fleet,
                    &alone,
                    &pieces,
                    &topics,
                    &mut sender,
                    &mut repair_bytes,
                    now,
                );
            }
        } else {
            gather_since = None;
        }
        for i in needy {
            let d = &fleet.devs[i];
            if d.phase == Phase::Receiving && !d.missing.is_empty() {
                fleet.needy.insert(i);
            }
        }

        // 5. Probes: a device quiet after everything meant for it went out, once the fleet
        // has gone quiet too (or after a minute).
        if slow {
            // A broadcast reaches every device at about the same pace: until one of them has
            // it all, silence means the broker is still delivering, not that a device is lost.
            if delivering
                .as_ref()
                .is_some_and(|ids| ids.iter().any(|&i| fleet.devs[i].phase == Phase::Done))
            {
                delivering = None;
            }
            let fleet_quiet =
                delivering.is_none() && now.duration_since(heard_any) >= options.probe_after;
            let Fleet { active, devs, .. } = &mut fleet;
            for &i in active.iter() {
                let d = &mut devs[i];
                let quiet = now.duration_since(d.last_heard);
                // Patience with the fleet's pace is for offers and for a broadcast under way;
                // a device receiving on its own topic alone is probed on its own clock.
                let patient = d.phase != Phase::Receiving
                    || delivering.as_ref().is_some_and(|ids| ids.contains(&i));
                if !d.online
                    || d.last_send >= done
                    || now < d.next_probe
                    || quiet < d.probe_every
                    || (!fleet_quiet && patient && quiet < Duration::from_secs(60))
                {
                    continue;
                }
                let device = Target::Device(d.id.clone());
                d.last_send = if d.phase == Phase::Offered {
                    sender.push(Job::Offer {
                        topic: topics.down(&device, DownKind::Offer),
                        device: d.id.clone(),
                    })
                } else {
                    sender.push(Job::Message {
                        topic: topics.down(&device, DownKind::Complete),
                        payload: complete.clone(),
                    })
                };
                d.probe_every = (d.probe_every * 2).min(Duration::from_secs(60));
                d.next_probe = now + d.probe_every;
            }
        }

        // 6. Progress, the record, the end.
        if now >= tell_due {
            tell_due = now + Duration::from_secs(2);
            for (w, last) in told.iter_mut().enumerate().take(wave + 1) {
                let c = fleet.counts(w);
                if c != *last {
                    *last = c;
                    progress(&counts_line(&labels[w], waves[w].len(), &c));
                }
            }
            let behind = sender.queued - sender.done();
            if behind > 0 {
                progress(&format!("{behind} message(s) waiting to be sent"));
            }
        }
        journal.sync_now_and_then();
        if fleet.all_done() && wave + 1 == waves.len() {
            break;
        }
        if now >= deadline {
            progress(&format!(
                "rollout timeout ({} s) reached",
                options.timeout.as_secs()
            ));
            break;
        }
        // Take in what arrives for one tick, then decide again: decisions run at a fixed
        // rate, not once per message.
        let tick_end = Instant::now() + Duration::from_millis(25);
        while let Ok(msg) = tokio::time::timeout_at(tick_end.into(), conn.incoming.recv()).await {
            let Some(msg) = msg else {
                return Err(ProtocolError::Mqtt("connection closed".into()));
            };
            let absorbed = take_in(
                &topics,
                &msg,
                &transfer_hex,
                &model,
                count,
                &mut fleet,
                &mut journal,
                &tell,
            );
            if matches!(absorbed, Absorbed::Answered) {
                last_answer = Instant::now();
            }
            if !matches!(absorbed, Absorbed::Nothing) {
                heard_any = Instant::now();
            }
        }
    }
    // Let what is queued go out (nothing after a halt).
    let flush_until = Instant::now() + Duration::from_secs(10);
    while !sender.idle() && Instant::now() < flush_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    journal.sync();
    let waves = waves
        .iter()
        .zip(&labels)
        .map(|(ids, label)| WaveReport {
            label: label.clone(),
            devices: ids
                .iter()
                .map(|id| {
                    let d = &fleet.devs[fleet.find(id).expect("planned")];
                    d.outcome.clone().unwrap_or_else(|| DeviceOutcome {
                        device: id.clone(),
                        state: None,
                        reason: Some(match (d.phase, d.online) {
                            (Phase::Waiting, false) => "offline: not served".into(),
                            (Phase::Waiting, true) => {
                                "not offered (the rollout stopped first)".into()
                            }
                            _ => "no final report".into(),
                        }),
                    })
                })
                .collect(),
        })
        .collect();
    let report = RolloutReport {
        version: manifest.version,
        waves,
        halted,
        bytes_sent: sender.bytes.load(Ordering::Relaxed),
        chunks_sent: sender.chunks.load(Ordering::Relaxed),
        repair_bytes,
        elapsed: start.elapsed(),
    };
    conn.close().await;
    Ok(report)
}

/// `wave 2/3 (15%): 150 device(s): 20 offered, 80 downloading, 45 activated, 5 failed, ...`
fn counts_line(label: &str, devices: usize, c: &[usize; BUCKETS]) -> String {
    let mut line = format!(
        "{label}: {devices} device(s): {} offered, {} downloading, {} activated, {} failed",
        c[Bucket::Offered as usize],
        c[Bucket::Receiving as usize],
        c[Bucket::Activated as usize],
        c[Bucket::Failed as usize],
    );
    for (n, what) in [
        (c[Bucket::Waiting as usize], "not offered yet"),
        (c[Bucket::Offline as usize], "offline"),
    ] {
        if n > 0 {
            line.push_str(&format!(", {n} {what}"));
        }
    }
    line
}

/// Where device events are told: failures always, every device's end in a small rollout.
struct Tell<'a> {
    progress: &'a (dyn Fn(&str) + Sync),
    each_device: bool,
}

/// Records how device `i` ended.
fn finish(
    fleet: &mut Fleet,
    journal: &mut Journal,
    i: usize,
    state: Option<ReportState>,
    reason: Option<String>,
    tell: &Tell,
) {
    let o = DeviceOutcome {
        device: fleet.devs[i].id.clone(),
        state,
        reason,
    };
    if tell.each_device || !o.succeeded() {
        (tell.progress)(&o.to_string());
    }
    journal.finished(&o);
    fleet.update(i, |d| {
        d.outcome = Some(o);
        d.phase = Phase::Done;
        d.missing.clear();
    });
}

/// Sends each device what it misses on its own topic.
fn repair(
    fleet: &mut Fleet,
    ids: &[usize],
    pieces: &[Vec<u8>],
    topics: &Topics,
    sender: &mut Sender,
    repair_bytes: &mut u64,
    now: Instant,
) {
    for &i in ids {
        let d = &mut fleet.devs[i];
        let device = Target::Device(d.id.clone());
        for index in std::mem::take(&mut d.missing) {
            *repair_bytes += pieces[index as usize].len() as u64;
            let pos = sender.push(Job::Chunk {
                topic: topics.down(&device, DownKind::Chunk),
                index,
            });
            d.sent.insert(index, (pos, now));
            d.last_send = pos;
        }
        // No "complete" after a repair: the device finishes on its last chunk, and a probe
        // follows if it stays quiet.
        d.next_probe = now + d.probe_every;
    }
}

/// What a message changed.
enum Absorbed {
    Nothing,
    /// A device said something about the transfer.
    Heard,
    /// A device answered its offer (or said again what it misses).
    Answered,
    /// A device finished.
    Finished,
}

/// Folds a status or a report into the device's state.
#[allow(clippy::too_many_arguments)]
fn take_in(
    topics: &Topics,
    msg: &Incoming,
    transfer: &str,
    model: &ModelRef,
    count: u32,
    fleet: &mut Fleet,
    journal: &mut Journal,
    tell: &Tell,
) -> Absorbed {
    let Some((_, device, kind)) = topics.parse_up(&msg.topic) else {
        return Absorbed::Nothing;
    };
    if kind == UpKind::Status {
        if let (Ok(s), Some(i)) = (Status::decode(&msg.payload), fleet.find(device)) {
            if s.active.as_ref() == Some(model) && fleet.devs[i].phase != Phase::Done {
                // Its final report was lost (this publisher was disconnected when it came),
                // or the device already ran the model: its status says it is active.
                let why = "its status shows the model active".to_string();
                finish(
                    fleet,
                    journal,
                    i,
                    Some(ReportState::Activated),
                    Some(why),
                    tell,
                );
                return Absorbed::Finished;
            }
            fleet.update(i, |d| {
                let was = d.online;
                d.online = s.online;
                if d.phase == Phase::Receiving && !msg.retain {
                    // Gone, or (re)connected: either way no longer on the transfer's topic (a
                    // retained status is an old one, replayed to this publisher's
                    // subscription). What was sent to it before may have found no
                    // subscription (a restarted broker forgets them): its next report of what
                    // it misses counts in full.
                    d.subscribed = false;
                    d.sent.clear();
                }
                if s.online && !was && d.phase == Phase::Offered {
                    // Back before it answered its offer: offer again at once.
                    d.phase = Phase::Waiting;
                }
            });
        }
        return Absorbed::Nothing;
    }
    if kind != UpKind::Report {
        return Absorbed::Nothing;
    }
    let report = match Report::decode(&msg.payload) {
        Ok(r) if r.device == device => r,
        Ok(r) => {
            tracing::warn!(
                "report on {device}'s topic claims to come from {}: ignored",
                r.device
            );
            return Absorbed::Nothing;
        }
        Err(e) => {
            tracing::warn!("report from {device}: {e}");
            return Absorbed::Nothing;
        }
    };
    if report.transfer.as_deref() != Some(transfer) {
        return Absorbed::Nothing;
    }
    let Some(i) = fleet.find(device) else {
        return Absorbed::Nothing;
    };
    if fleet.devs[i].phase == Phase::Done {
        return Absorbed::Nothing;
    }
    let now = Instant::now();
    fleet.devs[i].last_heard = now;
    match report.state {
        ReportState::NeedOffer => {
            fleet.update(i, |d| d.phase = Phase::Waiting);
            Absorbed::Heard
        }
        s if s.is_final() => {
            finish(fleet, journal, i, Some(s), report.reason.clone(), tell);
            Absorbed::Finished
        }
        ReportState::Staged => Absorbed::Heard,
        _ => {
            fleet.update(i, |d| {
                if d.phase == Phase::Offered {
                    d.subscribed = true;
                }
                d.phase = Phase::Receiving;
                d.offered_at.get_or_insert(now);
                d.missing.extend(from_ranges(&report.missing, count));
                d.next_probe = now + d.probe_every;
            });
            Absorbed::Answered
        }
    }
}

fn preview(ids: &[String]) -> String {
    if ids.len() <= 8 {
        ids.join(", ")
    } else {
        format!("{}, ... ({} more)", ids[..6].join(", "), ids.len() - 6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_under_the_brokers_packet_limit() {
        assert_eq!(fit_chunk(256 << 10, None).unwrap(), 256 << 10);
        assert_eq!(
            fit_chunk(4 << 20, None).unwrap(),
            crate::messages::MAX_CHUNK
        );
        // AWS IoT: 128 KB packets.
        let c = fit_chunk(256 << 10, Some(131_072)).unwrap();
        assert!(c + PUBLISH_OVERHEAD + crate::messages::CHUNK_HEADER <= 131_072 && c >= 120 << 10);
        assert_eq!(fit_chunk(64 << 10, Some(1 << 20)).unwrap(), 64 << 10);
        let e = fit_chunk(64 << 10, Some(10_000)).unwrap_err().to_string();
        assert!(
            e.contains("10000 bytes") && e.contains("max_packet_size"),
            "{e}"
        );
    }
}
