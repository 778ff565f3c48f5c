//! The publishing side of a rollout: offer a signed package to a target, send its chunks, repair
//! what devices report missing, wait for every device's verdict; with a canary group first, halt
//! when a canary fails.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::messages::{Chunk, Complete, Message, Offer, Report, ReportState, Status, from_ranges};
use crate::mqtt::{BrokerConfig, Connection};
use crate::package::{Manifest, Package, VerifyingKey};
use crate::topics::{DownKind, Target, Topics, UpKind};
use crate::{ProtocolError, sha256_hex};

/// How a rollout runs.
#[derive(Clone, Debug)]
pub struct RolloutOptions {
    pub site: String,
    pub target: Target,
    /// Sent to first; the rollout halts if any canary device does not activate the package.
    pub canary: Option<Target>,
    pub chunk_size: usize,
    /// Give up on devices that have not finished after this long (per stage).
    pub timeout: Duration,
    /// Probe devices that have said nothing for this long.
    pub retry_after: Duration,
    /// How long retained device statuses are collected to learn group membership.
    pub discovery: Duration,
}

impl RolloutOptions {
    pub fn new(site: &str, target: Target) -> Self {
        Self {
            site: site.to_string(),
            target,
            canary: None,
            chunk_size: 256 << 10,
            timeout: Duration::from_secs(600),
            retry_after: Duration::from_secs(3),
            discovery: Duration::from_millis(1500),
        }
    }
}

/// How one device ended.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceOutcome {
    pub device: String,
    pub state: Option<ReportState>,
    pub reason: Option<String>,
}

impl DeviceOutcome {
    pub fn succeeded(&self) -> bool {
        self.state == Some(ReportState::Activated)
    }
}

/// Result of one stage (canary or main).
#[derive(Clone, Debug)]
pub struct StageReport {
    pub target: Target,
    pub devices: Vec<DeviceOutcome>,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub elapsed: Duration,
}

impl StageReport {
    pub fn all_succeeded(&self) -> bool {
        !self.devices.is_empty() && self.devices.iter().all(DeviceOutcome::succeeded)
    }
}

/// Result of a rollout; `halted` when the canary stage failed and the main stage did not run.
#[derive(Clone, Debug)]
pub struct RolloutReport {
    pub version: u64,
    pub stages: Vec<StageReport>,
    pub halted: bool,
}

impl RolloutReport {
    pub fn succeeded(&self) -> bool {
        !self.halted && self.stages.iter().all(StageReport::all_succeeded)
    }
}

/// Publishes `package` (verified first against `trusted`, when given) and waits for the devices.
pub async fn rollout(
    broker: &BrokerConfig,
    package: &Package,
    trusted: &[VerifyingKey],
    options: &RolloutOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RolloutReport, ProtocolError> {
    let manifest = if trusted.is_empty() {
        Manifest::from_json(&package.manifest_bytes)?
    } else {
        package.verify(trusted)?
    };
    let topics = Topics::new(&options.site)?;
    let client_id = format!("publisher-{}-{}", std::process::id(), crate::unix_now());
    let mut mqtt_options = broker.options(&client_id)?;
    mqtt_options.set_clean_session(true);
    let mut conn = Connection::start(
        mqtt_options,
        vec![
            (topics.up_all(UpKind::Status), QoS::AtLeastOnce),
            (topics.up_all(UpKind::Report), QoS::AtLeastOnce),
        ],
    );
    conn.wait_connected(Duration::from_secs(15)).await?;

    let mut fleet = Fleet::default();
    let until = Instant::now() + options.discovery;
    while let Ok(Some(msg)) = tokio::time::timeout_at(until.into(), conn.incoming.recv()).await {
        fleet.observe(&topics, &msg.topic, &msg.payload);
    }

    let mut stages = Vec::new();
    let mut halted = false;
    let plan: Vec<Target> = options
        .canary
        .iter()
        .cloned()
        .chain(std::iter::once(options.target.clone()))
        .collect();
    for (i, target) in plan.iter().enumerate() {
        let is_canary = options.canary.is_some() && i == 0;
        let mut stage = send_stage(
            &mut conn, &topics, &mut fleet, package, &manifest, target, options, progress,
        )
        .await?;
        if is_canary {
            // Devices done in the canary stage need nothing more.
            fleet.done.extend(
                stage
                    .devices
                    .iter()
                    .filter(|d| d.succeeded())
                    .map(|d| d.device.clone()),
            );
        }
        stage.devices.sort_by(|a, b| a.device.cmp(&b.device));
        let ok = stage.all_succeeded();
        stages.push(stage);
        if is_canary && !ok {
            progress(&format!("canary {target} failed: rollout halted"));
            halted = true;
            break;
        }
    }
    conn.close().await;
    Ok(RolloutReport {
        version: manifest.version,
        stages,
        halted,
    })
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

/// What the publisher knows about devices from their retained statuses.
#[derive(Default)]
struct Fleet {
    status: BTreeMap<String, Status>,
    reports: Vec<Report>,
    /// Devices already served (canary stage).
    done: BTreeSet<String>,
}

impl Fleet {
    fn observe(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        let Some((_, device, kind)) = topics.parse_up(topic) else {
            return;
        };
        match kind {
            UpKind::Status => match Status::decode(payload) {
                Ok(s) => {
                    self.status.insert(device.to_string(), s);
                }
                Err(e) => tracing::warn!("status from {device}: {e}"),
            },
            UpKind::Report => match Report::decode(payload) {
                Ok(r) if r.device == device => self.reports.push(r),
                Ok(r) => tracing::warn!(
                    "report on {device}'s topic claims to come from {}: ignored",
                    r.device
                ),
                Err(e) => tracing::warn!("report from {device}: {e}"),
            },
            UpKind::Verdict => {}
        }
    }

    /// Devices a target addresses, as far as their statuses tell.
    fn members(&self, target: &Target) -> BTreeSet<String> {
        match target {
            Target::Device(id) => [id.clone()].into(),
            _ => self
                .status
                .values()
                .filter(|s| s.online && target.includes(&s.device, &s.groups))
                .map(|s| s.device.clone())
                .collect(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_stage(
    conn: &mut Connection,
    topics: &Topics,
    fleet: &mut Fleet,
    package: &Package,
    manifest: &Manifest,
    target: &Target,
    options: &RolloutOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<StageReport, ProtocolError> {
    let start = Instant::now();
    let members: BTreeSet<String> = fleet
        .members(target)
        .difference(&fleet.done)
        .cloned()
        .collect();
    if members.is_empty() {
        return Err(ProtocolError::Invalid(format!(
            "no online device reported itself in {target}"
        )));
    }
    let chunk_size = options
        .chunk_size
        .clamp(crate::messages::MIN_CHUNK, crate::messages::MAX_CHUNK);
    let pieces: Vec<&[u8]> = package.weights.chunks(chunk_size).collect();
    let count = pieces.len() as u32;
    let offer = offer_for(package, target, chunk_size)?;
    let transfer_hex = offer.transfer.clone();
    let transfer = crate::messages::transfer_id(&transfer_hex)?;
    progress(&format!(
        "{target}: offering {} v{} ({} bytes in {count} chunks) to {} device(s): {}",
        manifest.id,
        manifest.version,
        package.weights.len(),
        members.len(),
        members.iter().cloned().collect::<Vec<_>>().join(", ")
    ));

    let mut st = StageState::default();
    let mut bytes_sent = 0u64;
    let mut chunks_sent = 0u64;
    let chunk_topic = topics.down(target, DownKind::Chunk);
    let complete = Complete {
        transfer: transfer_hex.clone(),
        chunks: count,
    };

    conn.publish(topics.down(target, DownKind::Offer), offer.encode(), false)
        .await?;
    // Devices answer an offer with what they miss: a resumed transfer sends only that.
    let first_wait = Instant::now() + options.retry_after;
    while st.wanted.len() + st.outcome.len() < members.len() {
        match tokio::time::timeout_at(first_wait.into(), conn.incoming.recv()).await {
            Ok(Some(msg)) => {
                fleet.observe(topics, &msg.topic, &msg.payload);
                st.absorb(fleet, &transfer_hex, &members, count);
            }
            Ok(None) => return Err(ProtocolError::Mqtt("connection closed".into())),
            Err(_) => break,
        }
    }
    let mut to_send: BTreeSet<u32> = if st.wanted.len() + st.outcome.len() == members.len() {
        st.wanted.values().flatten().copied().collect()
    } else {
        (0..count).collect()
    };
    let mut last_sent: HashMap<u32, Instant> = HashMap::new();
    let mut last_offer = Instant::now();
    let deadline = start + options.timeout;
    loop {
        if !to_send.is_empty() {
            let n = to_send.len();
            for index in std::mem::take(&mut to_send) {
                let data = pieces[index as usize];
                let frame = Chunk {
                    transfer,
                    index,
                    count,
                    data,
                }
                .encode();
                bytes_sent += data.len() as u64;
                chunks_sent += 1;
                last_sent.insert(index, Instant::now());
                conn.publish(chunk_topic.clone(), frame, false).await?;
            }
            conn.publish(
                topics.down(target, DownKind::Complete),
                complete.encode(),
                false,
            )
            .await?;
            progress(&format!("{target}: sent {n} chunk(s)"));
        }
        if members.iter().all(|m| st.outcome.contains_key(m)) {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wake = (now + options.retry_after).min(deadline);
        match tokio::time::timeout_at(wake.into(), conn.incoming.recv()).await {
            Ok(Some(msg)) => {
                fleet.observe(topics, &msg.topic, &msg.payload);
                let before: BTreeSet<String> = st.outcome.keys().cloned().collect();
                st.absorb(fleet, &transfer_hex, &members, count);
                for o in st.outcome.values().filter(|o| !before.contains(&o.device)) {
                    progress(&format!(
                        "{}: {:?}{}",
                        o.device,
                        o.state.unwrap_or(ReportState::Receiving),
                        o.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ));
                }
                if std::mem::take(&mut st.need_offer)
                    && last_offer.elapsed() >= options.retry_after / 2
                {
                    last_offer = Instant::now();
                    conn.publish(topics.down(target, DownKind::Offer), offer.encode(), false)
                        .await?;
                }
                // Repair: resend what devices still miss, unless just sent.
                let now = Instant::now();
                for set in st.wanted.values_mut() {
                    for &i in set.iter() {
                        let recent = last_sent
                            .get(&i)
                            .is_some_and(|t| now.duration_since(*t) < options.retry_after / 2);
                        if !recent {
                            to_send.insert(i);
                        }
                    }
                    set.clear();
                }
            }
            Ok(None) => return Err(ProtocolError::Mqtt("connection closed".into())),
            Err(_) => {
                // Quiet devices get a probe; they answer with their state.
                let now = Instant::now();
                let quiet = members.iter().any(|m| {
                    !st.outcome.contains_key(m)
                        && st
                            .last_heard
                            .get(m)
                            .is_none_or(|t| now.duration_since(*t) >= options.retry_after)
                });
                if quiet {
                    conn.publish(
                        topics.down(target, DownKind::Complete),
                        complete.encode(),
                        false,
                    )
                    .await?;
                }
            }
        }
    }
    let devices = members
        .iter()
        .map(|m| {
            st.outcome.get(m).cloned().unwrap_or(DeviceOutcome {
                device: m.clone(),
                state: None,
                reason: Some(format!("no final report within {:?}", options.timeout)),
            })
        })
        .collect();
    Ok(StageReport {
        target: target.clone(),
        devices,
        bytes_sent,
        chunks_sent,
        elapsed: start.elapsed(),
    })
}

/// What the publisher knows of each device during one stage.
#[derive(Default)]
struct StageState {
    /// Devices that gave a final report.
    outcome: HashMap<String, DeviceOutcome>,
    /// Chunks each device still misses (as last reported).
    wanted: HashMap<String, BTreeSet<u32>>,
    last_heard: HashMap<String, Instant>,
    /// Some device heard a probe but never got the offer.
    need_offer: bool,
}

impl StageState {
    /// Folds new reports about this transfer into the per-device state.
    fn absorb(
        &mut self,
        fleet: &mut Fleet,
        transfer: &str,
        members: &BTreeSet<String>,
        count: u32,
    ) {
        for report in fleet.reports.drain(..) {
            if report.transfer.as_deref() != Some(transfer) || !members.contains(&report.device) {
                continue;
            }
            self.last_heard
                .insert(report.device.clone(), Instant::now());
            if report.state == ReportState::NeedOffer {
                self.need_offer = true;
            } else if report.state.is_final() {
                self.outcome.insert(
                    report.device.clone(),
                    DeviceOutcome {
                        device: report.device.clone(),
                        state: Some(report.state),
                        reason: report.reason.clone(),
                    },
                );
                self.wanted.remove(&report.device);
            } else if !self.outcome.contains_key(&report.device) {
                self.wanted
                    .entry(report.device.clone())
                    .or_default()
                    .extend(from_ranges(&report.missing, count));
            }
        }
    }
}
