//! The daemon's control side: model lifecycle (boot checks, factory default, trial and
//! confirmation, rollback) and receiving packages over MQTT (chunks stored durably in sled,
//! resumed after any interruption, verified, self-tested, activated).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use burn::prelude::*;
use protocol::messages::{Message, to_ranges, transfer_id};
use protocol::mqtt::{Connection, Incoming};
use protocol::package::{Manifest, Package, VerifyingKey, check_weights, verify_signature};
use protocol::topics::{DownKind, Target, Topics, UpKind};
use protocol::{
    Chunk, Command, CommandAction, Complete, Offer, Report, ReportState, SignedCommand, Status,
    sha256_hex, unix_now, version_at_least,
};
use rumqttc::{AsyncClient, LastWill, QoS};

use crate::config::{EdgeConfig, SourceConfig};
use crate::models::{Installed, ModelStore};
use crate::pipeline::{BoundedQueue, Decision, PipelineStats};
use crate::source::{FolderSource, FrameSource, SourceError, SyntheticStrip};
use crate::store::VerdictStore;
use edge_detector::Detector;
use edge_detector::golden;

pub const EDGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The model the inspection pipeline uses; swapped atomically on activation and rollback.
pub type ActiveModel = Arc<RwLock<Option<(Installed, Arc<Detector>)>>>;

/// A package being received.
struct Transfer {
    id: [u8; 32],
    hex: String,
    offer: Offer,
    manifest: Manifest,
    have: Vec<bool>,
    have_count: u32,
    last_report: Instant,
}

impl Transfer {
    fn count(&self) -> u32 {
        self.have.len() as u32
    }

    fn missing(&self) -> Vec<[u32; 2]> {
        to_ranges(
            self.have
                .iter()
                .enumerate()
                .filter(|(_, h)| !**h)
                .map(|(i, _)| i as u32),
        )
    }
}

pub struct Daemon {
    config: EdgeConfig,
    trusted: Vec<VerifyingKey>,
    topics: Topics,
    store: ModelStore,
    transfers: sled::Tree,
    chunks: sled::Tree,
    finished: sled::Tree,
    db: sled::Db,
    current: Option<Transfer>,
    pub active: ActiveModel,
    device: Device,
    client: Option<AsyncClient>,
    trial_deadline: Option<tokio::time::Instant>,
    pub verdicts: Arc<VerdictStore>,
    /// Frames waiting for a quality engineer (`[review]`).
    pub review: Option<Arc<crate::review::ReviewQueue>>,
    pub stats: Arc<PipelineStats>,
    outbox_notify: Arc<tokio::sync::Notify>,
    pub metrics: Arc<crate::http::Metrics>,
    queue_handle: Arc<std::sync::Mutex<Option<Arc<BoundedQueue<crate::source::Frame>>>>>,
}

fn new_report(device: &str, transfer: &str, version: Option<u64>, state: ReportState) -> Report {
    Report {
        device: device.to_string(),
        transfer: Some(transfer.to_string()),
        version,
        state,
        have: 0,
        missing: vec![],
        reason: None,
    }
}

/// A "receiving" report for a transfer, with the given missing ranges.
fn receiving(device: &str, t: &Transfer, missing: Vec<[u32; 2]>) -> Report {
    Report {
        have: t.have_count,
        missing,
        ..new_report(
            device,
            &t.hex,
            Some(t.manifest.version),
            ReportState::Receiving,
        )
    }
}

fn chunk_key(id: &[u8; 32], index: u32) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..32].copy_from_slice(id);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

impl Daemon {
    /// Opens the state directory and brings up the active model: counts a trial boot (and rolls
    /// back after too many), installs the factory package when there is no model, falls back to
    /// earlier models while the active one fails to load.
    pub fn open(config: EdgeConfig, device: Device) -> anyhow::Result<Self> {
        let trusted = config.trusted_keys().map_err(anyhow::Error::msg)?;
        let topics = Topics::new(&config.device.site)?;
        std::fs::create_dir_all(&config.storage.dir)?;
        let mut store = ModelStore::open(&config.storage.dir.join("models"), config.models.keep)?;
        // Transfers hold at most a package or two: a small page cache.
        let db = sled::Config::new()
            .path(config.storage.dir.join("transfers.sled"))
            .cache_capacity(16 << 20)
            .open()?;
        let verdicts = Arc::new(VerdictStore::open(
            &config.storage.dir.join("verdicts.sled"),
            config.store.clone(),
        )?);
        let removed = verdicts.enforce_retention(crate::source::now_ms())?;
        if removed > 0 {
            tracing::info!("retention: removed {removed} old verdicts");
        }
        let review = match &config.review {
            Some(r) => Some(Arc::new(crate::review::ReviewQueue::open(
                &config.storage.dir.join("review.sled"),
                r.clone(),
            )?)),
            None => None,
        };
        let mut daemon = Self {
            verdicts,
            review,
            stats: Arc::new(PipelineStats::default()),
            outbox_notify: Arc::new(tokio::sync::Notify::new()),
            metrics: Arc::new(crate::http::Metrics::default()),
            queue_handle: Default::default(),
            trusted,
            topics,
            transfers: db.open_tree("transfers")?,
            chunks: db.open_tree("chunks")?,
            finished: db.open_tree("finished")?,
            db,
            current: None,
            active: Arc::new(RwLock::new(None)),
            device,
            client: None,
            trial_deadline: None,
            store: {
                if let Some(boots) = store.count_boot(config.models.max_trial_boots)? {
                    let reason = format!(
                        "crash loop: {boots} starts without {} s of healthy running",
                        config.models.confirm_after_s
                    );
                    match store.rollback(None, &reason) {
                        Ok((_, to)) => tracing::warn!("{reason}: back to v{}", to.version),
                        Err(e) => {
                            tracing::error!("{e}");
                            store.confirm()?;
                        }
                    }
                }
                store
            },
            config,
        };
        daemon.install_factory()?;
        daemon.load_active();
        daemon.restore_transfer()?;
        Ok(daemon)
    }

    fn install_factory(&mut self) -> anyhow::Result<()> {
        if self.store.state.active.is_some() {
            return Ok(());
        }
        let Some(path) = self.config.models.factory.clone() else {
            return Ok(());
        };
        let package = Package::read(&path)?;
        let manifest = package
            .verify(&self.trusted)
            .map_err(|e| anyhow::anyhow!("factory package {}: {e}", path.display()))?;
        let installed = self.store.install(&manifest, &package)?;
        self.store.switch_to(installed, false)?;
        self.store.set_event(format!(
            "installed factory model {} v{}",
            manifest.id, manifest.version
        ))?;
        tracing::info!(
            "installed factory model {} v{}",
            manifest.id,
            manifest.version
        );
        Ok(())
    }

    /// Loads the active model; on failure goes back through the kept models.
    fn load_active(&mut self) {
        loop {
            let Some(active) = self.store.state.active.clone() else {
                tracing::warn!("no model installed: waiting for a package");
                *self.active.write().expect("lock") = None;
                return;
            };
            let loaded = self
                .store
                .read(&active, &self.trusted)
                .map_err(|e| e.to_string())
                .and_then(|(manifest, package)| {
                    golden::load_and_check(
                        &manifest,
                        package.weights,
                        &self.store.path_of(&active).display().to_string(),
                        &self.device,
                    )
                });
            match loaded {
                Ok(detector) => {
                    tracing::info!("active model {} v{}", active.id, active.version);
                    *self.active.write().expect("lock") = Some((active, Arc::new(detector)));
                    if self.store.state.trial.is_some() {
                        self.trial_deadline = Some(
                            tokio::time::Instant::now()
                                + Duration::from_secs(self.config.models.confirm_after_s),
                        );
                    }
                    return;
                }
                Err(e) => {
                    let reason = format!("active model v{} failed to load: {e}", active.version);
                    tracing::error!("{reason}");
                    if let Err(e) = self.store.rollback(None, &reason) {
                        tracing::error!("{e}");
                        *self.active.write().expect("lock") = None;
                        let _ = self.store.set_event(reason);
                        return;
                    }
                }
            }
        }
    }

    fn restore_transfer(&mut self) -> anyhow::Result<()> {
        let mut found = None;
        for entry in self.transfers.iter() {
            let (key, value) = entry?;
            let stale = found.is_some();
            let parsed = Offer::decode(&value)
                .map_err(|e| e.to_string())
                .and_then(|offer| self.check_offer(&offer).map(|m| (offer, m)));
            match parsed {
                Ok((offer, manifest)) if !stale => {
                    let id: [u8; 32] = key.as_ref().try_into()?;
                    found = Some((id, offer, manifest));
                }
                _ => {
                    self.drop_transfer_key(&key)?;
                }
            }
        }
        if let Some((id, offer, manifest)) = found {
            let count = offer.chunks.len();
            let mut have = vec![false; count];
            let mut have_count = 0;
            for entry in self.chunks.scan_prefix(id) {
                let (key, _) = entry?;
                let index = u32::from_be_bytes(key[32..36].try_into()?) as usize;
                if index < count && !have[index] {
                    have[index] = true;
                    have_count += 1;
                }
            }
            tracing::info!(
                "resuming transfer of {} v{}: {have_count} of {count} chunks already here",
                manifest.id,
                manifest.version
            );
            self.current = Some(Transfer {
                id,
                hex: offer.transfer.clone(),
                offer,
                manifest,
                have,
                have_count,
                last_report: Instant::now(),
            });
        }
        Ok(())
    }

    fn drop_transfer_key(&self, key: &[u8]) -> anyhow::Result<()> {
        self.transfers.remove(key)?;
        for entry in self.chunks.scan_prefix(key) {
            let (k, _) = entry?;
            self.chunks.remove(k)?;
        }
        Ok(())
    }

    pub fn status(&self, online: bool) -> Status {
        let d = &self.config.device;
        Status {
            device: d.id.clone(),
            line: d.line.clone(),
            groups: d.groups.clone(),
            edge_version: EDGE_VERSION.to_string(),
            online,
            active: self.store.state.active.as_ref().map(Installed::model_ref),
            previous: self
                .store
                .state
                .previous
                .iter()
                .map(Installed::model_ref)
                .collect(),
            on_trial: self.store.state.trial.is_some(),
            last_event: self.store.state.last_event.clone(),
            updated_unix: unix_now(),
        }
    }

    fn up_topic(&self, kind: UpKind) -> String {
        let d = &self.config.device;
        self.topics.up(&d.line, &d.id, kind)
    }

    fn publish_status(&self) {
        if let Some(client) = &self.client {
            let topic = self.up_topic(UpKind::Status);
            if let Err(e) =
                client.try_publish(topic, QoS::AtLeastOnce, true, self.status(true).encode())
            {
                tracing::warn!("status not published: {e}");
            }
        }
    }

    fn report(&self, report: Report) {
        tracing::debug!("report: {report:?}");
        if let Some(client) = &self.client {
            let topic = self.up_topic(UpKind::Report);
            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, report.encode()) {
                tracing::warn!("report not published: {e}");
            }
        }
    }

    fn base_report(&self, transfer: &str, version: Option<u64>, state: ReportState) -> Report {
        new_report(&self.config.device.id, transfer, version, state)
    }

    fn progress_report(&self, t: &Transfer) -> Report {
        receiving(&self.config.device.id, t, t.missing())
    }

    /// Records and sends a final report. Activations and self-test failures are remembered (a
    /// repeated offer gets the same answer); refusals are not, as the same transfer may arrive
    /// intact next time.
    fn finish(&mut self, report: Report) {
        if let Some(t) = &report.transfer
            && matches!(report.state, ReportState::Activated | ReportState::Failed)
            && let Ok(id) = transfer_id(t)
        {
            let _ = self.finished.insert(id, report.encode());
        }
        if matches!(
            report.state,
            ReportState::Refused | ReportState::Failed | ReportState::RolledBack
        ) && let Some(reason) = &report.reason
        {
            let event = format!(
                "{:?} v{}: {reason}",
                report.state,
                report.version.map(|v| v.to_string()).unwrap_or("?".into())
            )
            .to_lowercase();
            let _ = self.store.set_event(event);
        }
        self.report(report);
        self.publish_status();
    }

    /// The final report of a finished transfer, unless it no longer holds (an activated model
    /// that was rolled back since: offering it again installs it again).
    fn finished_report(&self, id: &[u8; 32]) -> Option<Report> {
        let report = Report::decode(&self.finished.get(id).ok()??).ok()?;
        let active = self.store.state.active.as_ref().map(|m| m.version);
        if report.state == ReportState::Activated && active != report.version {
            let _ = self.finished.remove(id);
            return None;
        }
        Some(report)
    }

    fn refuse(&mut self, transfer: &str, version: Option<u64>, reason: String) {
        tracing::warn!("refused package (transfer {transfer}): {reason}");
        let report = Report {
            reason: Some(reason),
            ..self.base_report(transfer, version, ReportState::Refused)
        };
        self.finish(report);
    }

    /// Everything an offer must satisfy before a byte of it is stored.
    fn check_offer(&self, offer: &Offer) -> Result<Manifest, String> {
        let signature = hex::decode(&offer.signature).map_err(|e| format!("signature: {e}"))?;
        if protocol::messages::transfer_hex(offer.manifest.as_bytes(), &signature) != offer.transfer
        {
            return Err("transfer id is not the digest of manifest and signature".into());
        }
        verify_signature(offer.manifest.as_bytes(), &signature, &self.trusted)
            .map_err(|e| e.to_string())?;
        let manifest = Manifest::from_json(offer.manifest.as_bytes()).map_err(|e| e.to_string())?;
        let limit = self.config.models.max_package_mb << 20;
        if offer.size > limit {
            return Err(format!(
                "too large: {} bytes, the limit is {limit} (models.max_package_mb)",
                offer.size
            ));
        }
        if offer.size != manifest.weights.size {
            return Err(format!(
                "offer size {} differs from the manifest's {}",
                offer.size, manifest.weights.size
            ));
        }
        let expected_chunks = offer.size.div_ceil(offer.chunk_size.max(1) as u64);
        if offer.chunk_size == 0 || offer.chunks.len() as u64 != expected_chunks {
            return Err(format!(
                "{} chunk digests for {} bytes in chunks of {}",
                offer.chunks.len(),
                offer.size,
                offer.chunk_size
            ));
        }
        match version_at_least(EDGE_VERSION, &manifest.min_edge_version) {
            Some(true) => {}
            Some(false) => {
                return Err(format!(
                    "needs edge {} or newer, this is {EDGE_VERSION}",
                    manifest.min_edge_version
                ));
            }
            None => {
                return Err(format!(
                    "min_edge_version `{}` is not a version",
                    manifest.min_edge_version
                ));
            }
        }
        if let Some(active) = &self.store.state.active
            && (manifest.version < active.version
                || (manifest.version == active.version && manifest.weights.sha256 != active.sha256))
        {
            return Err(format!(
                "downgrade: v{} is not newer than the active v{} (a signed rollback command can go back)",
                manifest.version, active.version
            ));
        }
        Ok(manifest)
    }

    async fn on_offer(&mut self, offer: Offer) {
        let Ok(id) = transfer_id(&offer.transfer) else {
            tracing::warn!("offer with a malformed transfer id `{}`", offer.transfer);
            return;
        };
        if let Some(report) = self.finished_report(&id) {
            self.report(report);
            return;
        }
        if let Some(t) = &self.current
            && t.id == id
        {
            let report = self.progress_report(t);
            self.report(report);
            return;
        }
        let manifest = match self.check_offer(&offer) {
            Ok(m) => m,
            Err(reason) => {
                let version = Manifest::from_json(offer.manifest.as_bytes())
                    .ok()
                    .map(|m| m.version);
                self.refuse(&offer.transfer, version, reason);
                return;
            }
        };
        if let Some(active) = &self.store.state.active
            && active.version == manifest.version
        {
            // Already running exactly this model.
            let report = self.base_report(
                &offer.transfer,
                Some(manifest.version),
                ReportState::Activated,
            );
            self.finish(report);
            return;
        }
        if let Some(t) = self.current.take() {
            if t.manifest.version > manifest.version {
                let reason = format!(
                    "a newer package (v{}) is being received",
                    t.manifest.version
                );
                self.current = Some(t);
                self.refuse(&offer.transfer, Some(manifest.version), reason);
                return;
            }
            tracing::info!(
                "dropping the transfer of v{} for v{}",
                t.manifest.version,
                manifest.version
            );
            let _ = self.drop_transfer_key(&t.id);
        }
        if let Err(e) = self.transfers.insert(id, offer.encode()) {
            tracing::error!("transfer store: {e}");
            return;
        }
        tracing::info!(
            "receiving {} v{}: {} bytes in {} chunks",
            manifest.id,
            manifest.version,
            offer.size,
            offer.chunks.len()
        );
        let t = Transfer {
            id,
            hex: offer.transfer.clone(),
            have: vec![false; offer.chunks.len()],
            have_count: 0,
            manifest,
            offer,
            last_report: Instant::now(),
        };
        let report = self.progress_report(&t);
        self.current = Some(t);
        self.report(report);
        if self.current.as_ref().is_some_and(|t| t.count() == 0) {
            self.finalize().await;
        }
    }

    async fn on_chunk(&mut self, payload: &[u8]) {
        let chunk = match Chunk::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("chunk refused: {e}");
                return;
            }
        };
        let device = self.config.device.id.clone();
        let Some(t) = self.current.as_mut().filter(|t| t.id == chunk.transfer) else {
            tracing::debug!("chunk of an unknown transfer: ignored");
            return;
        };
        let index = chunk.index as usize;
        if chunk.count != t.count() || index >= t.have.len() {
            tracing::warn!(
                "chunk {}/{} does not fit the offer ({} chunks)",
                chunk.index,
                chunk.count,
                t.count()
            );
            return;
        }
        if t.have[index] {
            return; // duplicate
        }
        if sha256_hex(chunk.data) != t.offer.chunks[index] {
            tracing::warn!(
                "chunk {index} of {} v{}: digest mismatch (corrupted in transit): asking again",
                t.manifest.id,
                t.manifest.version
            );
            let report = receiving(&device, t, vec![[chunk.index, chunk.index]]);
            self.report(report);
            return;
        }
        if let Err(e) = self
            .chunks
            .insert(chunk_key(&t.id, chunk.index), chunk.data)
        {
            tracing::error!("transfer store: {e}");
            return;
        }
        t.have[index] = true;
        t.have_count += 1;
        if t.have_count == t.count() {
            self.finalize().await;
        } else if t.have_count % (t.count() / 10).max(1) == 0
            || t.last_report.elapsed() > Duration::from_secs(2)
        {
            t.last_report = Instant::now();
            // sled flushes on its own every 500 ms; at each progress step make what arrived
            // durable, so a kill -9 loses at most one step.
            if let Err(e) = self.db.flush() {
                tracing::error!("transfer store flush: {e}");
            }
            let report = receiving(&device, t, vec![]);
            self.report(report);
        }
    }

    fn on_complete(&mut self, complete: Complete) {
        let Ok(id) = transfer_id(&complete.transfer) else {
            return;
        };
        if let Some(report) = self.finished_report(&id) {
            self.report(report);
            return;
        }
        match &self.current {
            Some(t) if t.id == id => {
                let report = self.progress_report(t);
                self.report(report);
            }
            _ => {
                let report = self.base_report(&complete.transfer, None, ReportState::NeedOffer);
                self.report(report);
            }
        }
    }

    /// All chunks are in: verify, store, self-test, switch.
    async fn finalize(&mut self) {
        let Some(t) = self.current.take() else {
            return;
        };
        let mut weights = Vec::with_capacity(t.offer.size as usize);
        let mut read_ok = true;
        for entry in self.chunks.scan_prefix(t.id) {
            match entry {
                Ok((_, v)) => weights.extend_from_slice(&v),
                Err(e) => {
                    tracing::error!("transfer store: {e}");
                    read_ok = false;
                }
            }
        }
        let _ = self.drop_transfer_key(&t.id);
        let version = Some(t.manifest.version);
        if !read_ok {
            self.refuse(&t.hex, version, "transfer store unreadable".into());
            return;
        }
        if let Err(e) = check_weights(&t.manifest, &weights) {
            self.refuse(&t.hex, version, e.to_string());
            return;
        }
        let package = Package {
            manifest_bytes: t.offer.manifest.as_bytes().to_vec(),
            signature: match hex::decode(&t.offer.signature)
                .ok()
                .and_then(|s| <[u8; 64]>::try_from(s).ok())
            {
                Some(s) => s,
                None => {
                    self.refuse(&t.hex, version, "signature is not 64 bytes".into());
                    return;
                }
            },
            weights,
        };
        let installed = match self.store.install(&t.manifest, &package) {
            Ok(i) => i,
            Err(e) => {
                self.refuse(&t.hex, version, format!("cannot store the package: {e}"));
                return;
            }
        };
        self.report(self.base_report(&t.hex, version, ReportState::Staged));
        tracing::info!(
            "staged {} v{}: self-test",
            t.manifest.id,
            t.manifest.version
        );
        let origin = self.store.path_of(&installed).display().to_string();
        let device = self.device.clone();
        let manifest = t.manifest.clone();
        let checked = tokio::task::block_in_place(|| {
            golden::load_and_check(&manifest, package.weights, &origin, &device)
        });
        match checked {
            Ok(detector) => {
                let previous = self.store.state.active.as_ref().map(|m| m.version);
                if let Err(e) = self.store.switch_to(installed.clone(), true) {
                    self.refuse(&t.hex, version, format!("cannot switch: {e}"));
                    return;
                }
                let _ = self.store.set_event(format!(
                    "activated {} v{} (was {})",
                    installed.id,
                    installed.version,
                    previous.map(|v| format!("v{v}")).unwrap_or("none".into())
                ));
                *self.active.write().expect("lock") = Some((installed, Arc::new(detector)));
                self.trial_deadline = Some(
                    tokio::time::Instant::now()
                        + Duration::from_secs(self.config.models.confirm_after_s),
                );
                tracing::info!("activated {} v{}", t.manifest.id, t.manifest.version);
                let report = self.base_report(&t.hex, version, ReportState::Activated);
                self.finish(report);
            }
            Err(e) => {
                self.store.discard(&installed);
                let kept = self
                    .store
                    .state
                    .active
                    .as_ref()
                    .map(|m| format!("v{}", m.version))
                    .unwrap_or("no model".into());
                let reason = format!("self-test failed, kept {kept}: {e}");
                tracing::error!("{} v{}: {reason}", t.manifest.id, t.manifest.version);
                let report = Report {
                    reason: Some(reason),
                    ..self.base_report(&t.hex, version, ReportState::Failed)
                };
                self.finish(report);
            }
        }
    }

    fn on_command(&mut self, signed: SignedCommand) {
        let device = self.config.device.id.clone();
        let refuse = |this: &mut Self, reason: String| {
            tracing::warn!("command refused: {reason}");
            this.report(Report {
                device: device.clone(),
                transfer: None,
                version: None,
                state: ReportState::Refused,
                have: 0,
                missing: vec![],
                reason: Some(format!("command: {reason}")),
            });
        };
        let signature = match hex::decode(&signed.signature) {
            Ok(s) => s,
            Err(e) => return refuse(self, format!("signature: {e}")),
        };
        if let Err(e) = verify_signature(signed.command.as_bytes(), &signature, &self.trusted) {
            return refuse(self, e.to_string());
        }
        let command: Command = match serde_json::from_str(&signed.command) {
            Ok(c) => c,
            Err(e) => return refuse(self, format!("malformed: {e}")),
        };
        if !command
            .target
            .includes(&self.config.device.id, &self.config.device.groups)
        {
            return;
        }
        if command.issued_ms <= self.store.state.last_command_ms {
            return refuse(
                self,
                format!(
                    "replayed or stale (issued {} ms, last obeyed {} ms)",
                    command.issued_ms, self.store.state.last_command_ms
                ),
            );
        }
        self.store.state.last_command_ms = command.issued_ms;
        match command.action {
            CommandAction::Rollback { to_version } => {
                match self.store.rollback(to_version, "rollback command") {
                    Ok((_, to)) => {
                        tracing::warn!("rollback command: back to v{}", to.version);
                        self.load_active();
                        self.report(Report {
                            device,
                            transfer: None,
                            version: Some(to.version),
                            state: ReportState::RolledBack,
                            have: 0,
                            missing: vec![],
                            reason: Some("rollback command".into()),
                        });
                        self.publish_status();
                    }
                    Err(e) => {
                        let _ = self.store.save();
                        refuse(self, e.to_string())
                    }
                }
            }
        }
    }

    async fn handle(&mut self, msg: Incoming) {
        let Some((target, kind)) = self.topics.parse_down(&msg.topic) else {
            return;
        };
        if !target.includes(&self.config.device.id, &self.config.device.groups) {
            return;
        }
        match kind {
            DownKind::Chunk => self.on_chunk(&msg.payload).await,
            DownKind::Offer => match Offer::decode(&msg.payload) {
                Ok(offer) => self.on_offer(offer).await,
                Err(e) => tracing::warn!("{}: {e}", msg.topic),
            },
            DownKind::Complete => match Complete::decode(&msg.payload) {
                Ok(c) => self.on_complete(c),
                Err(e) => tracing::warn!("{}: {e}", msg.topic),
            },
            DownKind::Command => match SignedCommand::decode(&msg.payload) {
                Ok(c) => self.on_command(c),
                Err(e) => tracing::warn!("{}: {e}", msg.topic),
            },
        }
    }

    /// Runs until `shutdown` resolves: MQTT (when configured), trial confirmation.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        // The source is opened first: a missing camera or folder stops the daemon right here.
        let inspection = match self.config.source.clone() {
            Some(cfg) => Some(self.start_inspection(open_source(&cfg)?)?),
            None => None,
        };
        let outbox = self.start_outbox()?;
        let (http_stop, http_stopped) = tokio::sync::watch::channel(false);
        let http = match self.config.http.clone() {
            Some(h) => {
                let listener = tokio::net::TcpListener::bind(&h.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("http.listen {}: {e}", h.listen))?;
                tracing::info!("http: listening on {}", listener.local_addr()?);
                let state = crate::http::AppState {
                    metrics: self.metrics.clone(),
                    stats: self.stats.clone(),
                    store: self.verdicts.clone(),
                    active: self.active.clone(),
                    queue: self.queue_handle.clone(),
                    review: self.review.clone(),
                    has_source: self.config.source.is_some(),
                    last_scrape: Arc::new(std::sync::Mutex::new((Instant::now(), 0))),
                };
                let labeling = self
                    .review
                    .clone()
                    .map(|queue| crate::labeling::LabelingState {
                        queue,
                        active: self.active.clone(),
                        device: self.config.device.id.clone(),
                        tile: self.config.pipeline.tile,
                        tile_overlap: self.config.pipeline.tile_overlap,
                        heatmap_lock: Default::default(),
                    });
                let mut stopped = http_stopped.clone();
                Some(tokio::spawn(async move {
                    let serve = axum::serve(listener, crate::http::router(state, labeling))
                        .with_graceful_shutdown(async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        });
                    if let Err(e) = serve.await {
                        tracing::error!("http: {e}");
                    }
                }))
            }
            None => None,
        };
        let mut conn = match self.config.mqtt.clone() {
            Some(broker) => {
                let d = &self.config.device;
                let mut options = broker.options(&format!("edge-{}-{}", d.site, d.id))?;
                options.set_clean_session(false);
                options.set_last_will(LastWill::new(
                    self.up_topic(UpKind::Status),
                    self.status(false).encode(),
                    QoS::AtLeastOnce,
                    true,
                ));
                let mut subs = vec![
                    (
                        self.topics.down_filter(&Target::Device(d.id.clone())),
                        QoS::AtLeastOnce,
                    ),
                    (self.topics.down_filter(&Target::Fleet), QoS::AtLeastOnce),
                ];
                for g in &d.groups {
                    subs.push((
                        self.topics.down_filter(&Target::Group(g.clone())),
                        QoS::AtLeastOnce,
                    ));
                }
                let conn = Connection::start(options, subs);
                self.client = Some(conn.client.clone());
                Some(conn)
            }
            None => None,
        };
        let mut connected = conn.as_ref().map(|c| c.connected.clone());
        loop {
            let trial = self.trial_deadline;
            tokio::select! {
                _ = &mut shutdown => break,
                _ = async { tokio::time::sleep_until(trial.expect("guarded")).await }, if trial.is_some() => {
                    self.trial_deadline = None;
                    if self.store.confirm().unwrap_or(false) {
                        tracing::info!("model confirmed after {} s", self.config.models.confirm_after_s);
                        self.publish_status();
                    }
                }
                changed = async { connected.as_mut().expect("guarded").changed().await }, if connected.is_some() => {
                    if changed.is_err() {
                        connected = None;
                    } else if connected.as_ref().is_some_and(|c| *c.borrow()) {
                        tracing::info!("mqtt: connected");
                        self.publish_status();
                        if let Some(t) = &self.current {
                            let report = self.progress_report(t);
                            self.report(report);
                        }
                    }
                }
                msg = async { conn.as_mut().expect("guarded").incoming.recv().await }, if conn.is_some() => {
                    match msg {
                        Some(m) => self.handle(m).await,
                        None => break,
                    }
                }
            }
        }
        if let Some(inspection) = inspection {
            inspection.stop().await;
        }
        let _ = http_stop.send(true);
        if let Some(h) = http {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        if let Some(outbox) = outbox {
            outbox.drain(Duration::from_secs(5)).await;
        }
        let _ = self.verdicts.flush();
        let _ = self.db.flush_async().await;
        if let Some(conn) = conn {
            let topic = self.up_topic(UpKind::Status);
            let _ = conn
                .client
                .publish(topic, QoS::AtLeastOnce, true, self.status(false).encode())
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.close().await;
        }
        Ok(())
    }
}

/// Opens the configured source; a source that cannot work is an error naming it.
pub fn open_source(config: &SourceConfig) -> anyhow::Result<Box<dyn FrameSource>> {
    let fatal = |e: SourceError| anyhow::anyhow!("source: {e}");
    Ok(match config {
        SourceConfig::Folder { path, fps, looped } => {
            Box::new(FolderSource::new(path, *fps, *looped).map_err(fatal)?)
        }
        SourceConfig::Synthetic {
            tiles,
            frame_height,
            overlap,
            defect_rate,
            seed,
            fps,
            frames,
        } => Box::new(
            SyntheticStrip::new(
                *tiles,
                *frame_height,
                *overlap,
                *defect_rate,
                *seed,
                *fps,
                *frames,
            )
            .map_err(fatal)?,
        ),
        #[cfg(feature = "camera")]
        SourceConfig::Camera {
            index,
            width,
            height,
            fps,
            pixel_format,
        } => Box::new(
            crate::camera::CameraSource::open(*index, *width, *height, *fps, *pixel_format)
                .map_err(fatal)?,
        ),
        #[cfg(not(feature = "camera"))]
        SourceConfig::Camera { index, .. } => anyhow::bail!(
            "source: camera /dev/video{index}: this edge was built without the `camera` feature; rebuild with default features or use kind = \"folder\" or \"synthetic\""
        ),
    })
}

/// The running inspection threads.
struct Inspection {
    stop: Arc<std::sync::atomic::AtomicBool>,
    queue: Arc<BoundedQueue<crate::source::Frame>>,
    source: std::thread::JoinHandle<()>,
    inference: std::thread::JoinHandle<()>,
}

impl Inspection {
    /// Stops the source, lets the detector finish the queued frames, waits for both.
    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.queue.close();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = self.source.join();
            let _ = self.inference.join();
        })
        .await;
    }
}

/// The verdict publisher task.
struct Outbox {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    store: Arc<VerdictStore>,
}

impl Outbox {
    /// Gives pending verdicts up to `grace` to go out, then stops.
    async fn drain(self, grace: Duration) {
        let until = Instant::now() + grace;
        while self.store.pending() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

impl Daemon {
    fn start_inspection(&self, mut source: Box<dyn FrameSource>) -> anyhow::Result<Inspection> {
        use std::sync::atomic::{AtomicBool, Ordering};
        tracing::info!("source: {}", source.describe());
        let pipeline = self.config.pipeline.clone();
        let rules = self.config.rules.clone();
        let queue = Arc::new(BoundedQueue::new(pipeline.queue, pipeline.on_full));
        *self.queue_handle.lock().expect("lock") = Some(queue.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let stats = self.stats.clone();
        let source_thread = {
            let (queue, stop, stats) = (queue.clone(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("source".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match source.next_frame() {
                            Ok(Some(frame)) => {
                                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                                if let Some(old) = queue.push(frame) {
                                    tracing::warn!("queue full: dropped frame {}", old.seq);
                                }
                            }
                            Ok(None) => {
                                tracing::info!("source finished");
                                break;
                            }
                            Err(SourceError::BadFrame(e)) => {
                                stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!("bad frame skipped: {e}");
                            }
                            Err(SourceError::Fatal(e)) => {
                                tracing::error!("source failed: {e}");
                                break;
                            }
                        }
                    }
                    queue.close();
                })?
        };
        let inference = {
            let (queue, active, store) =
                (queue.clone(), self.active.clone(), self.verdicts.clone());
            let review = self.review.clone();
            let device = self.config.device.id.clone();
            let notify = self.outbox_notify.clone();
            let metrics = self.metrics.clone();
            std::thread::Builder::new()
                .name("inference".into())
                .spawn(move || {
                    crate::pipeline::run_inference(
                        &pipeline,
                        &rules,
                        &queue,
                        &active,
                        &stats,
                        |d: Decision| {
                            let id = match store.next_id() {
                                Ok(id) => id,
                                Err(e) => {
                                    tracing::error!("{e}");
                                    return;
                                }
                            };
                            let verdict = protocol::Verdict {
                                id,
                                device: device.clone(),
                                frame: d.frame.seq,
                                line: d.frame.line,
                                origin: d.frame.origin.clone(),
                                width: d.frame.image.width(),
                                height: d.frame.image.height(),
                                captured_ms: d.frame.captured_ms,
                                decided_ms: crate::source::now_ms(),
                                latency_ms: d.latency_ms,
                                pass: d.pass,
                                defects: d.defects,
                                model: d.model,
                            };
                            if let Err(e) = store.record(&verdict, &d.frame.image) {
                                tracing::error!("verdict {} not stored: {e}", verdict.id);
                                return;
                            }
                            if let Some(review) = &review
                                && let Err(e) = review.consider(&verdict, &d.frame.image)
                            {
                                tracing::error!("review queue: frame {}: {e}", verdict.id);
                            }
                            // Retention walks from the oldest verdict: keep it off every frame.
                            if verdict.id.is_multiple_of(64)
                                && let Err(e) = store.enforce_retention(verdict.decided_ms)
                            {
                                tracing::error!("retention: {e}");
                            }
                            let result = if verdict.pass { "pass" } else { "fail" };
                            metrics
                                .verdicts
                                .get_or_create(&crate::http::ResultLabel { result })
                                .inc();
                            metrics.latency.observe(verdict.latency_ms / 1e3);
                            tracing::info!(
                                "verdict {} frame {} line {}: {} ({} failing defects, {:.0} ms)",
                                verdict.id,
                                verdict.frame,
                                verdict.line,
                                if verdict.pass { "PASS" } else { "FAIL" },
                                verdict.defects.iter().filter(|x| x.fails).count(),
                                verdict.latency_ms
                            );
                            notify.notify_one();
                        },
                    );
                })?
        };
        Ok(Inspection {
            stop,
            queue,
            source: source_thread,
            inference,
        })
    }

    /// Publishes stored verdicts in order over their own MQTT session, one at a time: a
    /// verdict leaves the outbox only when the broker has acknowledged it (QoS 1), so a broker
    /// outage or a crash delays verdicts but loses none (a consumer may see one twice after a
    /// crash and deduplicates on the id).
    fn start_outbox(&self) -> anyhow::Result<Option<Outbox>> {
        let Some(broker) = self.config.mqtt.clone() else {
            return Ok(None);
        };
        let d = &self.config.device;
        let mut options = broker.options(&format!("edge-{}-{}-verdicts", d.site, d.id))?;
        options.set_clean_session(false);
        let (mut conn, mut acks) = Connection::start_with_acks(options, vec![]);
        let topic = self.up_topic(UpKind::Verdict);
        let store = self.verdicts.clone();
        let notify = self.outbox_notify.clone();
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let task = {
            let store = store.clone();
            tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        break;
                    }
                    let next = match store.next_pending() {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::error!("{e}");
                            None
                        }
                    };
                    let Some((id, payload)) = next else {
                        tokio::select! {
                            _ = notify.notified() => {}
                            _ = stop.changed() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    };
                    if conn.wait_connected(Duration::from_secs(1)).await.is_err() {
                        continue;
                    }
                    while acks.try_recv().is_ok() {}
                    if conn
                        .client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    let acked = tokio::time::timeout(Duration::from_secs(5), async {
                        let mut pkid = None;
                        while let Some(ev) = acks.recv().await {
                            match ev {
                                protocol::mqtt::AckEvent::Sent(p) if pkid.is_none() => {
                                    pkid = Some(p)
                                }
                                protocol::mqtt::AckEvent::Acked(p) if Some(p) == pkid => {
                                    return true;
                                }
                                _ => {}
                            }
                        }
                        false
                    })
                    .await;
                    if acked == Ok(true) {
                        if let Err(e) = store.delivered(id) {
                            tracing::error!("{e}");
                        }
                    } else {
                        tracing::warn!("verdict {id}: no acknowledgement yet, sending again");
                    }
                }
                conn.close().await;
            })
        };
        Ok(Some(Outbox {
            task,
            stop: stop_tx,
            store,
        }))
    }
}
