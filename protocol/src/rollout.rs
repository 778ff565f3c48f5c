//! The publishing side of a rollout, for one device or a fleet of thousands: devices learned from
//! their retained statuses, split into waves; each wave offered (at a set rate), its chunks
//! broadcast once on the transfer's topic to the devices receiving it, what one device misses
//! repaired on that device's own topic, quiet devices probed one by one, and every device's
//! verdict collected. The next wave starts when the previous one reached its success threshold;
//! the rollout aborts when the failure rate passes the abort threshold. Devices offline at the
//! start are served when their status says they are back. With a record file the publisher can
//! be restarted and continue the same rollout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::messages::{Chunk, Complete, Message, Offer, Report, ReportState, Status, from_ranges};
use crate::mqtt::{BrokerConfig, Connection};
use crate::package::{Manifest, Package, VerifyingKey};
use crate::topics::{DownKind, Target, Topics, UpKind};
use crate::{ProtocolError, sha256_hex};

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

/// Where a device is in the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// Not offered yet (its wave has not started, the rate limit, or it is offline).
    Waiting,
    Offered,
    Receiving,
    Done,
}

struct Dev {
    online: bool,
    phase: Phase,
    outcome: Option<DeviceOutcome>,
    offered_at: Option<Instant>,
    last_heard: Instant,
    next_probe: Instant,
    probe_every: Duration,
    /// Chunks the device said it misses that no queued send covers yet.
    missing: BTreeSet<u32>,
    /// Whether it listens on the transfer's topic: it answered an offer (it subscribes before
    /// answering) and has not reconnected since (it does not subscribe again then).
    subscribed: bool,
    /// Chunks sent to it on its own topic: queue position and when.
    sent: HashMap<u32, (u64, Instant)>,
    /// Queue position of the last send meant for it (chunks or probe).
    last_send: u64,
}

/// The durable part of a rollout (`RolloutOptions::record`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    transfer: String,
    target: String,
    waves: Vec<Vec<String>>,
    wave: usize,
    halted: Option<String>,
    finished: BTreeMap<String, DeviceOutcome>,
}

/// What the send task publishes, in order.
enum Job {
    Chunk { topic: String, index: u32 },
    Message { topic: String, payload: Vec<u8> },
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
    fn start(conn: &Connection, pieces: Arc<Vec<Vec<u8>>>, transfer: [u8; 32]) -> Self {
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

/// Publishes `package` (verified first against `trusted`, when given) and runs the rollout.
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
    let chunk_size = options
        .chunk_size
        .clamp(crate::messages::MIN_CHUNK, crate::messages::MAX_CHUNK);
    let client_id = format!("publisher-{}-{}", std::process::id(), crate::unix_now_ms());
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

    // Who is there: retained statuses arrive at once after the subscription; stop listening
    // when they stop coming.
    let mut statuses: BTreeMap<String, Status> = BTreeMap::new();
    let mut early_reports = vec![];
    let until = Instant::now() + options.discovery;
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

    let offer = offer_for(package, &options.target, chunk_size)?;
    let transfer_hex = offer.transfer.clone();
    let transfer = crate::messages::transfer_id(&transfer_hex)?;
    let count = offer.chunks.len() as u32;

    // The plan: from the record when it is this rollout's, else from the statuses.
    let previous = match &options.record {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path).map_err(|e| ProtocolError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
            let record: Record = serde_json::from_str(&text).map_err(|e| {
                ProtocolError::Invalid(format!("rollout record {}: {e}", path.display()))
            })?;
            if record.transfer != transfer_hex || record.target != options.target.to_string() {
                return Err(ProtocolError::Invalid(format!(
                    "rollout record {} is of another rollout (transfer {}, target {}): \
                     remove it or name another --record",
                    path.display(),
                    &record.transfer[..16.min(record.transfer.len())],
                    record.target
                )));
            }
            Some(record)
        }
        _ => None,
    };
    let mut record = match previous {
        Some(r) => {
            progress(&format!(
                "continuing the recorded rollout: wave {}/{}, {} device(s) finished",
                r.wave + 1,
                r.waves.len(),
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
            Record {
                transfer: transfer_hex.clone(),
                target: options.target.to_string(),
                waves: plan_waves(&members, &options.waves, &statuses),
                wave: 0,
                halted: None,
                finished: BTreeMap::new(),
            }
        }
    };
    let wave_labels = wave_labels(&options.waves, record.waves.len());

    let now = Instant::now();
    let mut devs: HashMap<String, Dev> = HashMap::new();
    for ids in record.waves.iter() {
        for id in ids {
            let outcome = record.finished.get(id).cloned();
            devs.insert(
                id.clone(),
                Dev {
                    // A device addressed by id without a status yet is tried at once.
                    online: statuses.get(id).is_none_or(|s| s.online),
                    phase: if outcome.is_some() {
                        Phase::Done
                    } else {
                        Phase::Waiting
                    },
                    outcome,
                    offered_at: None,
                    last_heard: now,
                    next_probe: now,
                    probe_every: options.probe_after,
                    missing: BTreeSet::new(),
                    subscribed: false,
                    sent: HashMap::new(),
                    last_send: 0,
                },
            );
        }
    }
    progress(&format!(
        "rolling out {} v{} ({} bytes in {count} chunks of {} KiB) to {} device(s) of {} in {} wave(s): {}",
        manifest.id,
        manifest.version,
        package.weights.len(),
        chunk_size >> 10,
        devs.len(),
        options.target,
        record.waves.len(),
        record
            .waves
            .iter()
            .zip(&wave_labels)
            .map(|(w, l)| format!("{l} {}", w.len()))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let pieces: Arc<Vec<Vec<u8>>> = Arc::new(
        package
            .weights
            .chunks(chunk_size)
            .map(<[u8]>::to_vec)
            .collect(),
    );
    let mut sender = Sender::start(&conn, pieces.clone(), transfer);
    let chunk_topic = topics.transfer(&transfer_hex, DownKind::Chunk);
    let complete = Complete {
        transfer: transfer_hex.clone(),
        chunks: count,
    }
    .encode();
    let offer_bytes = |id: &str| {
        let mut o = offer.clone();
        o.target = Target::Device(id.to_string());
        o.encode()
    };

    // The broadcast under way: chunk index -> queue position.
    let mut round: HashMap<u32, u64> = HashMap::new();
    // Devices that answered their offer and wait for a broadcast, since when.
    let mut gather_since: Option<Instant> = None;
    let mut last_answer = Instant::now();
    // The last report from any device: while reports keep coming the broker is still
    // delivering a broadcast, and a device that has not spoken yet is not lost.
    let mut heard_any = Instant::now();
    // The devices of the broadcast the broker may still be delivering.
    let mut delivering: Option<Vec<String>> = None;
    let mut tokens = options
        .max_per_minute
        .map(|m| (m.max(1) as f64 / 60.0).max(1.0));
    let mut last_refill = Instant::now();
    let mut repair_bytes = 0u64;
    let mut record_dirty = true;
    let mut record_saved = Instant::now() - Duration::from_secs(10);
    let mut wave_announced: Option<usize> = None;
    let deadline = start + options.timeout;

    for msg in early_reports {
        take_in(
            &topics,
            &msg.topic,
            &msg.payload,
            msg.retain,
            &transfer_hex,
            count,
            &mut devs,
            &mut record,
            progress,
        );
    }

    loop {
        let now = Instant::now();

        // 1. Timeouts, abort.
        for (id, d) in devs.iter_mut() {
            if matches!(d.phase, Phase::Offered | Phase::Receiving)
                && d.offered_at
                    .is_some_and(|t| now.duration_since(t) >= options.device_timeout)
            {
                let o = DeviceOutcome {
                    device: id.clone(),
                    state: None,
                    reason: Some(format!(
                        "timed out: no final report {} s after the offer",
                        options.device_timeout.as_secs()
                    )),
                };
                progress(&format!("{id}: timed out"));
                record.finished.insert(id.clone(), o.clone());
                d.outcome = Some(o);
                d.phase = Phase::Done;
                record_dirty = true;
            }
        }
        if record.halted.is_none()
            && let Some(abort) = options.abort
        {
            let finished = record.finished.len();
            let failed = record.finished.values().filter(|o| !o.succeeded()).count();
            if finished >= abort.min_finished.max(1)
                && failed as f64 >= abort.failure_fraction * finished as f64
            {
                record.halted = Some(format!(
                    "aborted: {failed} of {finished} finished device(s) failed, the threshold is {:.0}% after {}",
                    abort.failure_fraction * 100.0,
                    abort.min_finished
                ));
            }
        }

        // 2. Waves.
        if record.halted.is_none() {
            while record.wave < record.waves.len() {
                let members = &record.waves[record.wave];
                let settled = members.iter().all(|id| {
                    let d = &devs[id];
                    d.phase == Phase::Done || (d.phase == Phase::Waiting && !d.online)
                });
                if !settled {
                    break;
                }
                let finished: Vec<&DeviceOutcome> = members
                    .iter()
                    .filter_map(|id| devs[id].outcome.as_ref())
                    .collect();
                let ok = finished.iter().filter(|o| o.succeeded()).count();
                if !finished.is_empty()
                    && (ok as f64) < options.wave_success * finished.len() as f64
                {
                    record.halted = Some(format!(
                        "{} reached {ok} of {} activated, under the {:.0}% success threshold",
                        wave_labels[record.wave],
                        finished.len(),
                        options.wave_success * 100.0
                    ));
                    break;
                }
                if record.wave + 1 == record.waves.len() {
                    break;
                }
                progress(&format!(
                    "{}: {ok} of {} activated{}",
                    wave_labels[record.wave],
                    finished.len(),
                    match members.len() - finished.len() {
                        0 => String::new(),
                        n => format!(", {n} offline (served when back)"),
                    }
                ));
                record.wave += 1;
                record_dirty = true;
            }
        }
        if let Some(why) = &record.halted {
            sender.stop.store(true, Ordering::Relaxed);
            progress(&format!("rollout halted: {why}"));
            break;
        }
        if wave_announced != Some(record.wave) {
            wave_announced = Some(record.wave);
            let ids = &record.waves[record.wave];
            progress(&format!(
                "{}: offering to {} device(s): {}",
                wave_labels[record.wave],
                ids.len(),
                preview(ids)
            ));
        }

        // 3. Offers: devices of open waves, online, within the rate limit.
        if let Some(t) = tokens.as_mut() {
            let per_s = options.max_per_minute.unwrap_or(60) as f64 / 60.0;
            *t = (*t + per_s * now.duration_since(last_refill).as_secs_f64()).min(per_s.max(1.0));
            last_refill = now;
        }
        let mut offered = 0;
        for w in 0..=record.wave {
            for id in &record.waves[w] {
                let d = devs.get_mut(id).expect("planned");
                if d.phase != Phase::Waiting || !d.online {
                    continue;
                }
                if let Some(t) = tokens.as_mut() {
                    if *t < 1.0 {
                        break;
                    }
                    *t -= 1.0;
                }
                d.last_send = sender.push(Job::Message {
                    topic: topics.down(&Target::Device(id.clone()), DownKind::Offer),
                    payload: offer_bytes(id),
                });
                d.phase = Phase::Offered;
                d.offered_at.get_or_insert(now);
                d.last_heard = now;
                d.next_probe = now + options.probe_after;
                d.probe_every = options.probe_after;
                offered += 1;
            }
        }
        if offered > 0 {
            record_dirty = true;
        }

        // 4. Chunks: one broadcast for devices that answered together, repairs one by one.
        let done = sender.done();
        round.retain(|_, pos| *pos >= done);
        let mut waiting: Vec<String> = vec![];
        for (id, d) in devs.iter_mut() {
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
                waiting.push(id.clone());
            }
        }
        if !waiting.is_empty() {
            let mut continue_gathering = false;
            let since = *gather_since.get_or_insert(now);
            let answered_all = devs
                .values()
                .all(|d| d.phase != Phase::Offered || !d.online);
            // Answers to a wave's offers come over a second or two: wait until they stop coming
            // (or all are in) so that one broadcast serves them.
            let gathered = answered_all
                || now.duration_since(last_answer) >= Duration::from_millis(300)
                || now.duration_since(since) >= Duration::from_secs(3);
            // Only devices on the transfer's topic can share a broadcast.
            let listening = waiting.iter().filter(|id| devs[*id].subscribed).count();
            if round.is_empty() && gathered && listening >= 2 {
                let (listening, alone): (Vec<String>, Vec<String>) =
                    waiting.into_iter().partition(|id| devs[id].subscribed);
                waiting = listening;
                repair(
                    &mut devs,
                    alone,
                    &pieces,
                    &topics,
                    &mut sender,
                    &mut repair_bytes,
                    now,
                );
                let mut union = BTreeSet::new();
                for id in &waiting {
                    union.extend(std::mem::take(
                        &mut devs.get_mut(id).expect("listed").missing,
                    ));
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
                delivering = Some(waiting.clone());
                for id in &waiting {
                    let d = devs.get_mut(id).expect("listed");
                    d.last_send = end;
                    d.next_probe = now + d.probe_every;
                }
            } else if !round.is_empty() || gathered {
                // One device, or late for the broadcast under way: its own topic.
                repair(
                    &mut devs,
                    waiting,
                    &pieces,
                    &topics,
                    &mut sender,
                    &mut repair_bytes,
                    now,
                );
            } else {
                // Devices that do not listen on the transfer's topic need not wait.
                let alone: Vec<String> = waiting
                    .into_iter()
                    .filter(|id| !devs[id].subscribed)
                    .collect();
                repair(
                    &mut devs,
                    alone,
                    &pieces,
                    &topics,
                    &mut sender,
                    &mut repair_bytes,
                    now,
                );
                continue_gathering = true;
            }
            if !continue_gathering {
                gather_since = None;
            }
        } else {
            gather_since = None;
        }

        // 5. Probes: a device quiet after everything meant for it went out, once the fleet
        // has gone quiet too (or after a minute).
        // A broadcast reaches every device at about the same pace: until one of them has it
        // all, silence means the broker is still delivering, not that a device is lost.
        if delivering
            .as_ref()
            .is_some_and(|ids| ids.iter().any(|id| devs[id].phase == Phase::Done))
        {
            delivering = None;
        }
        let fleet_quiet =
            delivering.is_none() && now.duration_since(heard_any) >= options.probe_after;
        for (id, d) in devs.iter_mut() {
            let quiet = now.duration_since(d.last_heard);
            if !matches!(d.phase, Phase::Offered | Phase::Receiving)
                || !d.online
                || d.last_send >= done
                || now < d.next_probe
                || quiet < d.probe_every
                || (!fleet_quiet && quiet < Duration::from_secs(60))
            {
                continue;
            }
            let device = Target::Device(id.clone());
            d.last_send = if d.phase == Phase::Offered {
                sender.push(Job::Message {
                    topic: topics.down(&device, DownKind::Offer),
                    payload: offer_bytes(id),
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

        // 6. The record; the end.
        if record_dirty && (record_saved.elapsed() >= Duration::from_secs(1)) {
            save_record(options, &record);
            record_dirty = false;
            record_saved = Instant::now();
        }
        let all_done = devs.values().all(|d| d.phase == Phase::Done);
        let last_wave = record.wave + 1 == record.waves.len();
        if all_done && last_wave {
            break;
        }
        if now >= deadline {
            progress(&format!(
                "rollout timeout ({} s) reached",
                options.timeout.as_secs()
            ));
            break;
        }
        // Take in what arrives for one tick, then decide again: the decisions walk every
        // device, so they run at a fixed rate, not once per message.
        let tick_end = Instant::now() + Duration::from_millis(25);
        while let Ok(msg) = tokio::time::timeout_at(tick_end.into(), conn.incoming.recv()).await {
            let Some(msg) = msg else {
                return Err(ProtocolError::Mqtt("connection closed".into()));
            };
            let absorbed = take_in(
                &topics,
                &msg.topic,
                &msg.payload,
                msg.retain,
                &transfer_hex,
                count,
                &mut devs,
                &mut record,
                progress,
            );
            match absorbed {
                Absorbed::Finished => record_dirty = true,
                Absorbed::Answered => last_answer = Instant::now(),
                Absorbed::Heard | Absorbed::Nothing => {}
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
    save_record(options, &record);
    let waves = record
        .waves
        .iter()
        .zip(&wave_labels)
        .map(|(ids, label)| WaveReport {
            label: label.clone(),
            devices: ids
                .iter()
                .map(|id| {
                    let d = &devs[id];
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
        halted: record.halted.clone(),
        bytes_sent: sender.bytes.load(Ordering::Relaxed),
        chunks_sent: sender.chunks.load(Ordering::Relaxed),
        repair_bytes,
        elapsed: start.elapsed(),
    };
    conn.close().await;
    Ok(report)
}

/// Sends each device what it misses on its own topic.
fn repair(
    devs: &mut HashMap<String, Dev>,
    ids: Vec<String>,
    pieces: &[Vec<u8>],
    topics: &Topics,
    sender: &mut Sender,
    repair_bytes: &mut u64,
    now: Instant,
) {
    for id in ids {
        let d = devs.get_mut(&id).expect("listed");
        let device = Target::Device(id.clone());
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
    topic: &str,
    payload: &[u8],
    retained: bool,
    transfer: &str,
    count: u32,
    devs: &mut HashMap<String, Dev>,
    record: &mut Record,
    progress: &(dyn Fn(&str) + Sync),
) -> Absorbed {
    let Some((_, device, kind)) = topics.parse_up(topic) else {
        return Absorbed::Nothing;
    };
    if kind == UpKind::Status {
        if let (Ok(s), Some(d)) = (Status::decode(payload), devs.get_mut(device)) {
            let was = d.online;
            d.online = s.online;
            if d.phase == Phase::Receiving && !retained {
                // Gone, or (re)connected: either way no longer on the transfer's topic (a
                // retained status is an old one, replayed to this publisher's subscription).
                d.subscribed = false;
            }
            if s.online && !was && d.phase == Phase::Offered {
                // Back before it answered its offer: offer again at once.
                d.phase = Phase::Waiting;
            }
        }
        return Absorbed::Nothing;
    }
    if kind != UpKind::Report {
        return Absorbed::Nothing;
    }
    let report = match Report::decode(payload) {
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
    let Some(d) = devs.get_mut(device) else {
        return Absorbed::Nothing;
    };
    if d.phase == Phase::Done {
        return Absorbed::Nothing;
    }
    let now = Instant::now();
    d.last_heard = now;
    match report.state {
        ReportState::NeedOffer => {
            d.phase = Phase::Waiting;
            Absorbed::Heard
        }
        s if s.is_final() => {
            let o = DeviceOutcome {
                device: device.to_string(),
                state: Some(s),
                reason: report.reason.clone(),
            };
            progress(&format!(
                "{device}: {}{}",
                format!("{s:?}").to_lowercase(),
                o.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
            record.finished.insert(device.to_string(), o.clone());
            d.outcome = Some(o);
            d.phase = Phase::Done;
            d.missing.clear();
            Absorbed::Finished
        }
        ReportState::Staged => Absorbed::Heard,
        _ => {
            if d.phase == Phase::Offered {
                d.subscribed = true;
            }
            d.phase = Phase::Receiving;
            d.offered_at.get_or_insert(now);
            d.missing.extend(from_ranges(&report.missing, count));
            d.next_probe = now + d.probe_every;
            Absorbed::Answered
        }
    }
}

/// Splits the target's devices into waves.
fn plan_waves(
    members: &[String],
    waves: &[Wave],
    statuses: &BTreeMap<String, Status>,
) -> Vec<Vec<String>> {
    // Percent waves take devices in the order of a hash of their ids: spread over lines and
    // sites, the same on every run.
    let mut order: Vec<&String> = members.iter().collect();
    order.sort_by_key(|id| sha256_hex(id.as_bytes()));
    let mut taken: BTreeSet<&String> = BTreeSet::new();
    let mut plan = vec![];
    let n = members.len() as f64;
    let mut cumulative = 0.0;
    for wave in waves {
        let ids: Vec<String> = match wave {
            Wave::Percent(p) => {
                cumulative += p;
                let upto = ((cumulative / 100.0 * n).round() as usize).min(members.len());
                let free: Vec<&String> = order
                    .iter()
                    .copied()
                    .filter(|id| !taken.contains(id))
                    .collect();
                let want = upto.saturating_sub(taken.len());
                free.into_iter().take(want).cloned().collect()
            }
            Wave::Target(t) => order
                .iter()
                .copied()
                .filter(|id| !taken.contains(id))
                .filter(|id| {
                    statuses
                        .get(*id)
                        .is_some_and(|s| t.includes(&s.device, &s.groups))
                        || matches!(t, Target::Device(d) if d == *id)
                })
                .cloned()
                .collect(),
        };
        for id in &ids {
            taken.insert(members.iter().find(|m| *m == id).expect("member"));
        }
        plan.push(ids);
    }
    let rest: Vec<String> = order
        .iter()
        .filter(|id| !taken.contains(*id))
        .map(|id| (*id).clone())
        .collect();
    if !rest.is_empty() || plan.is_empty() {
        plan.push(rest);
    }
    for ids in &mut plan {
        ids.sort();
    }
    plan
}

fn wave_labels(waves: &[Wave], planned: usize) -> Vec<String> {
    (0..planned)
        .map(|i| {
            let what = match waves.get(i) {
                Some(Wave::Percent(p)) => format!(" ({p}%)"),
                Some(Wave::Target(t)) => format!(" ({t})"),
                None if !waves.is_empty() => " (the rest)".into(),
                None => String::new(),
            };
            format!("wave {}/{planned}{what}", i + 1)
        })
        .collect()
}

fn preview(ids: &[String]) -> String {
    if ids.len() <= 8 {
        ids.join(", ")
    } else {
        format!("{}, ... ({} more)", ids[..6].join(", "), ids.len() - 6)
    }
}

fn save_record(options: &RolloutOptions, record: &Record) {
    if let Some(path) = &options.record {
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        if let Err(e) = crate::package::write_atomic(path, &bytes) {
            tracing::error!("rollout record: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, groups: &[&str]) -> Status {
        Status {
            device: id.into(),
            line: "l".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            edge_version: "0".into(),
            online: true,
            active: None,
            previous: vec![],
            on_trial: false,
            last_event: None,
            updated_unix: 0,
        }
    }

    #[test]
    fn waves_split_by_percent_and_by_target() {
        let ids: Vec<String> = (0..100).map(|i| format!("d{i:03}")).collect();
        let statuses: BTreeMap<String, Status> = ids
            .iter()
            .map(|id| {
                let g: &[&str] = if id.ends_with('7') { &["canary"] } else { &[] };
                (id.clone(), status(id, g))
            })
            .collect();
        let plan = plan_waves(
            &ids,
            &[
                "5%".parse().unwrap(),
                "15%".parse().unwrap(),
                "80%".parse().unwrap(),
            ],
            &statuses,
        );
        assert_eq!(
            plan.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![5, 15, 80]
        );
        let all: BTreeSet<&String> = plan.iter().flatten().collect();
        assert_eq!(all.len(), 100);
        let plan = plan_waves(&ids, &["group:canary".parse().unwrap()], &statuses);
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 90]);
        assert!(plan[0].iter().all(|id| id.ends_with('7')));
        let plan = plan_waves(&ids, &[], &statuses);
        assert_eq!(plan.len(), 1);
        assert!("0%".parse::<Wave>().is_err());
        assert!("x%".parse::<Wave>().is_err());
        assert!("robot:1".parse::<Wave>().is_err());
    }
}
