//! The device side of a transfer, shared by the edge daemon and the fleet simulator: an offer
//! checked before a byte is stored, chunks stored as they come (resumed after any restart),
//! missing ranges reported, then the whole package verified and handed to the device to install.
//!
//! Storage and installation are the device's ([`TransferStore`], [`Installer`]); this module
//! owns the protocol. It sends few reports: one answering the offer (what is missing), one half
//! way, one when the package is staged and the final one; more only when asked (a probe, a
//! repeated offer) or after a reconnect. From the offer on, the device listens on the transfer's
//! own topic ([`Topics::transfer`]), where the publisher broadcasts the chunks once to every
//! device that answered the offer.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::messages::{Message, to_ranges, transfer_hex, transfer_id};
use crate::package::{Manifest, Package, VerifyingKey, check_weights, verify_signature};
use crate::topics::{DownKind, Topics};
use crate::{Chunk, Complete, Offer, Report, ReportState, sha256_hex};

/// Stored offers with their transfer ids.
pub type StoredOffers = Vec<([u8; 32], Vec<u8>)>;

/// Where a device keeps transfers: offers, chunks and the final reports of finished transfers.
/// Errors are readable sentences.
pub trait TransferStore {
    /// Every stored offer with its transfer id.
    fn offers(&self) -> Result<StoredOffers, String>;
    fn put_offer(&mut self, id: &[u8; 32], offer: &[u8]) -> Result<(), String>;
    fn put_chunk(&mut self, id: &[u8; 32], index: u32, data: &[u8]) -> Result<(), String>;
    /// Indices of the chunks held for a transfer.
    fn chunk_indices(&self, id: &[u8; 32]) -> Result<Vec<u32>, String>;
    /// The chunks of a transfer concatenated in index order.
    fn weights(&self, id: &[u8; 32], size: u64) -> Result<Vec<u8>, String>;
    /// Forgets a transfer's offer and chunks.
    fn drop_transfer(&mut self, id: &[u8; 32]) -> Result<(), String>;
    fn finished(&self, id: &[u8; 32]) -> Option<Vec<u8>>;
    fn put_finished(&mut self, id: &[u8; 32], report: &[u8]);
    fn remove_finished(&mut self, id: &[u8; 32]);
    /// Makes what was stored durable (called at every tenth of a transfer).
    fn flush(&mut self);
}

/// Chunk data shared by the [`MemoryStore`]s of many simulated devices: one copy of each chunk.
pub type SharedChunks = Arc<Mutex<HashMap<([u8; 32], u32), Arc<Vec<u8>>>>>;

/// Transfers kept in memory (the fleet simulator's devices, tests): they survive whatever the
/// process keeps the store through, like a device's disk through a power loss.
#[derive(Default)]
pub struct MemoryStore {
    shared: SharedChunks,
    offers: HashMap<[u8; 32], Vec<u8>>,
    have: HashMap<[u8; 32], BTreeSet<u32>>,
    finished: HashMap<[u8; 32], Vec<u8>>,
}

impl MemoryStore {
    /// A store whose chunk data lives in `shared` (one copy for every store that shares it).
    pub fn new(shared: SharedChunks) -> Self {
        Self {
            shared,
            ..Default::default()
        }
    }
}

impl TransferStore for MemoryStore {
    fn offers(&self) -> Result<StoredOffers, String> {
        Ok(self.offers.iter().map(|(k, v)| (*k, v.clone())).collect())
    }
    fn put_offer(&mut self, id: &[u8; 32], offer: &[u8]) -> Result<(), String> {
        self.offers.insert(*id, offer.to_vec());
        Ok(())
    }
    fn put_chunk(&mut self, id: &[u8; 32], index: u32, data: &[u8]) -> Result<(), String> {
        self.shared
            .lock()
            .map_err(|_| "chunk cache poisoned")?
            .entry((*id, index))
            .or_insert_with(|| Arc::new(data.to_vec()));
        self.have.entry(*id).or_default().insert(index);
        Ok(())
    }
    fn chunk_indices(&self, id: &[u8; 32]) -> Result<Vec<u32>, String> {
        Ok(self
            .have
            .get(id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default())
    }
    fn weights(&self, id: &[u8; 32], size: u64) -> Result<Vec<u8>, String> {
        let shared = self.shared.lock().map_err(|_| "chunk cache poisoned")?;
        let mut out = Vec::with_capacity(size as usize);
        for i in self.have.get(id).into_iter().flatten() {
            out.extend_from_slice(
                shared
                    .get(&(*id, *i))
                    .ok_or("chunk missing from the cache")?,
            );
        }
        Ok(out)
    }
    fn drop_transfer(&mut self, id: &[u8; 32]) -> Result<(), String> {
        self.offers.remove(id);
        self.have.remove(id);
        Ok(())
    }
    fn finished(&self, id: &[u8; 32]) -> Option<Vec<u8>> {
        self.finished.get(id).cloned()
    }
    fn put_finished(&mut self, id: &[u8; 32], report: &[u8]) {
        self.finished.insert(*id, report.to_vec());
    }
    fn remove_finished(&mut self, id: &[u8; 32]) {
        self.finished.remove(id);
    }
    fn flush(&mut self) {}
}

/// How installing a verified package ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Installed {
    /// Self-test passed; the model is active.
    Activated,
    /// Stored, but loading or the self-test failed: the previous model stays.
    Failed(String),
    /// Could not be stored or switched to.
    Refused(String),
}

/// What the device decides beyond the protocol: its own policy for offers and how a verified
/// package becomes the active model.
pub trait Installer {
    /// The device's policy for a correctly signed offer (size limit, edge version, downgrades,
    /// refused versions); the error is the reason reported.
    fn check(&self, manifest: &Manifest, offer: &Offer) -> Result<(), String>;
    /// The active model's version.
    fn active_version(&self) -> Option<u64>;
    /// Stores, self-tests and activates a package whose signature and digest were verified.
    /// Once the package is stored, before the self-test, the device sends `staged` (a report).
    fn install(
        &mut self,
        manifest: &Manifest,
        package: Package,
        staged: Report,
    ) -> impl Future<Output = Installed>;
    /// Called at each durable step of a transfer (`offer`, `chunk-K`, `finalize`,
    /// `transfer-dropped`): the edge's fault injection aborts there.
    fn step(&mut self, _name: &str) {}
}

/// What the receiver asks its device to send or (un)subscribe.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    Report(Report),
    Subscribe(String),
    Unsubscribe(String),
}

/// A package being received.
struct Transfer {
    id: [u8; 32],
    hex: String,
    offer: Offer,
    manifest: Manifest,
    have: Vec<bool>,
    have_count: u32,
    half_reported: bool,
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

/// The device side of the transfer protocol for one device.
pub struct Receiver<S> {
    device: String,
    topics: Topics,
    trusted: Vec<VerifyingKey>,
    store: S,
    current: Option<Transfer>,
    out: Vec<Outbound>,
}

impl<S: TransferStore> Receiver<S> {
    pub fn new(device: &str, topics: Topics, trusted: Vec<VerifyingKey>, store: S) -> Self {
        Self {
            device: device.to_string(),
            topics,
            trusted,
            store,
            current: None,
            out: vec![],
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The store back (a device that restarts opens a new receiver on it).
    pub fn into_store(self) -> S {
        self.store
    }

    /// What to send and (un)subscribe since the last call.
    pub fn take_outbound(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.out)
    }

    /// The transfer under way: (id, version, chunks held, chunk count).
    pub fn under_way(&self) -> Option<(&Manifest, u32, u32)> {
        self.current
            .as_ref()
            .map(|t| (&t.manifest, t.have_count, t.count()))
    }

    /// Picks up the newest valid stored transfer (after a restart); drops the others.
    pub fn restore(&mut self, installer: &impl Installer) -> Result<(), String> {
        let mut found = None;
        for (id, bytes) in self.store.offers()? {
            let parsed = Offer::decode(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|offer| self.check_offer(&offer, installer).map(|m| (offer, m)));
            match parsed {
                Ok((offer, manifest))
                    if found.is_none() && transfer_id(&offer.transfer).ok() == Some(id) =>
                {
                    found = Some((id, offer, manifest));
                }
                Ok(_) => self.store.drop_transfer(&id)?,
                Err(e) => {
                    tracing::warn!("dropping a stored transfer: {e}");
                    self.store.drop_transfer(&id)?
                }
            }
        }
        if let Some((id, offer, manifest)) = found {
            let count = offer.chunks.len();
            let mut have = vec![false; count];
            let mut have_count = 0;
            for index in self.store.chunk_indices(&id)? {
                let index = index as usize;
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
                // Past half way already: that report was sent before the restart.
                half_reported: have_count as usize >= count / 2,
                have_count,
            });
        }
        Ok(())
    }

    /// (Re)connected: say where the transfer under way stands. The publisher sends what is
    /// missing to this device's own topic (a broadcast under way may carry chunks this device
    /// already has), so the transfer's topic is not subscribed again here.
    pub fn on_connected(&mut self) {
        if let Some(t) = &self.current {
            let report = self.progress_report(t, t.missing());
            self.out.push(Outbound::Report(report));
        }
    }

    /// Handles a message on a downward topic addressed to this device or on a transfer topic
    /// (offers, chunks, probes); `false` for anything else (commands are the device's).
    pub async fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        installer: &mut impl Installer,
    ) -> bool {
        let (kind, broadcast) = match self.topics.parse_down(topic) {
            Some((_, kind)) => (kind, false),
            None => match self.topics.parse_transfer(topic) {
                Some((_, kind)) => (kind, true),
                None => return false,
            },
        };
        // A transfer restored with every chunk here (the process died after the last chunk,
        // before its store forgot the transfer): it finishes before anything else is answered.
        if self
            .current
            .as_ref()
            .is_some_and(|t| t.have_count == t.count())
        {
            self.finalize(installer).await;
        }
        match kind {
            DownKind::Chunk => self.on_chunk(payload, installer).await,
            DownKind::Offer if !broadcast => match Offer::decode(payload) {
                Ok(offer) => self.on_offer(offer, installer).await,
                Err(e) => tracing::warn!("{topic}: {e}"),
            },
            DownKind::Complete => match Complete::decode(payload) {
                Ok(c) => self.on_complete(c, installer, broadcast),
                Err(e) => tracing::warn!("{topic}: {e}"),
            },
            _ => return false,
        }
        true
    }

    fn base_report(&self, transfer: &str, version: Option<u64>, state: ReportState) -> Report {
        Report {
            device: self.device.clone(),
            transfer: Some(transfer.to_string()),
            version,
            state,
            have: 0,
            missing: vec![],
            reason: None,
        }
    }

    fn progress_report(&self, t: &Transfer, missing: Vec<[u32; 2]>) -> Report {
        Report {
            have: t.have_count,
            missing,
            ..self.base_report(&t.hex, Some(t.manifest.version), ReportState::Receiving)
        }
    }

    /// The final report of a finished transfer, unless it no longer holds (an activated model
    /// that was rolled back since: offering it again installs it again).
    fn finished_report(&mut self, id: &[u8; 32], installer: &impl Installer) -> Option<Report> {
        let report = Report::decode(&self.store.finished(id)?).ok()?;
        if report.state == ReportState::Activated && installer.active_version() != report.version {
            self.store.remove_finished(id);
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

    /// Sends a final report. Activations and self-test failures are remembered (a repeated offer
    /// gets the same answer); refusals are not, as the same transfer may arrive intact next time.
    fn finish(&mut self, report: Report) {
        if let Some(t) = &report.transfer
            && matches!(report.state, ReportState::Activated | ReportState::Failed)
            && let Ok(id) = transfer_id(t)
        {
            self.store.put_finished(&id, &report.encode());
        }
        self.out.push(Outbound::Report(report));
    }

    /// Everything an offer must satisfy before a byte of it is stored.
    fn check_offer(&self, offer: &Offer, installer: &impl Installer) -> Result<Manifest, String> {
        let signature = hex::decode(&offer.signature).map_err(|e| format!("signature: {e}"))?;
        if transfer_hex(offer.manifest.as_bytes(), &signature) != offer.transfer {
            return Err("transfer id is not the digest of manifest and signature".into());
        }
        verify_signature(offer.manifest.as_bytes(), &signature, &self.trusted)
            .map_err(|e| e.to_string())?;
        let manifest = Manifest::from_json(offer.manifest.as_bytes()).map_err(|e| e.to_string())?;
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
        installer.check(&manifest, offer)?;
        Ok(manifest)
    }

    pub async fn on_offer(&mut self, offer: Offer, installer: &mut impl Installer) {
        let Ok(id) = transfer_id(&offer.transfer) else {
            tracing::warn!("offer with a malformed transfer id `{}`", offer.transfer);
            return;
        };
        if let Some(report) = self.finished_report(&id, installer) {
            self.out.push(Outbound::Report(report));
            return;
        }
        if let Some(t) = &self.current
            && t.id == id
        {
            // Listening again costs nothing and covers a subscription lost with the broker.
            self.out
                .push(Outbound::Subscribe(self.topics.transfer_filter(&t.hex)));
            let report = self.progress_report(t, t.missing());
            self.out.push(Outbound::Report(report));
            return;
        }
        let manifest = match self.check_offer(&offer, installer) {
            Ok(m) => m,
            Err(reason) => {
                let version = Manifest::from_json(offer.manifest.as_bytes())
                    .ok()
                    .map(|m| m.version);
                self.refuse(&offer.transfer, version, reason);
                return;
            }
        };
        if installer.active_version() == Some(manifest.version) {
            // Already running exactly this model (the check refused a different one).
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
            self.out
                .push(Outbound::Unsubscribe(self.topics.transfer_filter(&t.hex)));
            let _ = self.store.drop_transfer(&t.id);
        }
        if let Err(e) = self.store.put_offer(&id, &offer.encode()) {
            tracing::error!("transfer store: {e}");
            return;
        }
        installer.step("offer");
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
            half_reported: false,
        };
        // Subscribed before the answer goes out: the broker handles one client's packets in
        // order, so by the time the publisher reads the answer the broadcast reaches us.
        self.out
            .push(Outbound::Subscribe(self.topics.transfer_filter(&t.hex)));
        let report = self.progress_report(&t, t.missing());
        self.out.push(Outbound::Report(report));
        let empty = t.count() == 0;
        self.current = Some(t);
        if empty {
            self.finalize(installer).await;
        }
    }

    pub async fn on_chunk(&mut self, payload: &[u8], installer: &mut impl Installer) {
        let chunk = match Chunk::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("chunk refused: {e}");
                return;
            }
        };
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
            let t = self.current.as_ref().expect("checked above");
            let report = self.progress_report(t, vec![[chunk.index, chunk.index]]);
            self.out.push(Outbound::Report(report));
            return;
        }
        if let Err(e) = self.store.put_chunk(&t.id, chunk.index, chunk.data) {
            tracing::error!("transfer store: {e}");
            return;
        }
        t.have[index] = true;
        t.have_count += 1;
        let (have, count) = (t.have_count, t.count());
        installer.step(&format!("chunk-{have}"));
        if have == count {
            self.finalize(installer).await;
            return;
        }
        if have % (count / 10).max(1) == 0 {
            // At each tenth, what arrived becomes durable: a kill -9 loses at most a tenth.
            self.store.flush();
        }
        if count >= 4 && have >= count / 2 && !t.half_reported {
            t.half_reported = true;
            let t = self.current.as_ref().expect("checked above");
            let report = self.progress_report(t, vec![]);
            self.out.push(Outbound::Report(report));
        }
    }

    /// "All sent: what do you miss?" On the transfer's topic only devices that miss something
    /// answer; addressed to the device (a probe), it always answers.
    pub fn on_complete(&mut self, complete: Complete, installer: &impl Installer, broadcast: bool) {
        let Ok(id) = transfer_id(&complete.transfer) else {
            return;
        };
        if broadcast {
            if let Some(t) = self.current.as_ref().filter(|t| t.id == id)
                && t.have_count < t.count()
            {
                let report = self.progress_report(t, t.missing());
                self.out.push(Outbound::Report(report));
            }
            return;
        }
        if let Some(report) = self.finished_report(&id, installer) {
            self.out.push(Outbound::Report(report));
            return;
        }
        let report = match &self.current {
            Some(t) if t.id == id => self.progress_report(t, t.missing()),
            _ => self.base_report(&complete.transfer, None, ReportState::NeedOffer),
        };
        self.out.push(Outbound::Report(report));
    }

    /// All chunks are in: verify, hand to the installer, report.
    async fn finalize(&mut self, installer: &mut impl Installer) {
        let Some(t) = self.current.take() else {
            return;
        };
        self.out
            .push(Outbound::Unsubscribe(self.topics.transfer_filter(&t.hex)));
        installer.step("finalize");
        let weights = self.store.weights(&t.id, t.offer.size);
        let _ = self.store.drop_transfer(&t.id);
        installer.step("transfer-dropped");
        let version = Some(t.manifest.version);
        let weights = match weights {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("transfer store: {e}");
                self.refuse(&t.hex, version, "transfer store unreadable".into());
                return;
            }
        };
        if let Err(e) = check_weights(&t.manifest, &weights) {
            self.refuse(&t.hex, version, e.to_string());
            return;
        }
        let Some(signature) = hex::decode(&t.offer.signature)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
        else {
            self.refuse(&t.hex, version, "signature is not 64 bytes".into());
            return;
        };
        let package = Package {
            manifest_bytes: t.offer.manifest.as_bytes().to_vec(),
            signature,
            weights,
        };
        let staged = self.base_report(&t.hex, version, ReportState::Staged);
        let outcome = installer.install(&t.manifest, package, staged).await;
        let report = match outcome {
            Installed::Activated => self.base_report(&t.hex, version, ReportState::Activated),
            Installed::Failed(reason) => Report {
                reason: Some(reason),
                ..self.base_report(&t.hex, version, ReportState::Failed)
            },
            Installed::Refused(reason) => return self.refuse(&t.hex, version, reason),
        };
        self.finish(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{SigningKey, WeightsRef};
    use crate::topics::Target;

    struct Inst {
        active: Option<u64>,
        installed: usize,
    }

    impl Inst {
        fn on_version_1() -> Self {
            Inst {
                active: Some(1),
                installed: 0,
            }
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    impl Installer for Inst {
        fn check(&self, m: &Manifest, _offer: &Offer) -> Result<(), String> {
            match self.active {
                Some(a) if m.version < a => Err("downgrade".into()),
                _ => Ok(()),
            }
        }
        fn active_version(&self) -> Option<u64> {
            self.active
        }
        async fn install(&mut self, m: &Manifest, p: Package, _staged: Report) -> Installed {
            check_weights(m, &p.weights).unwrap();
            self.installed += 1;
            self.active = Some(m.version);
            Installed::Activated
        }
    }

    fn package(key: &SigningKey, size: usize) -> Package {
        let weights: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let manifest = Manifest {
            format: crate::package::MANIFEST_FORMAT,
            id: "m".into(),
            version: 2,
            created_unix: 0,
            architecture: serde_json::json!({}),
            classes: vec![],
            input: crate::package::InputSpec {
                width: 1,
                height: 1,
                channels: 3,
                resize: "stretch".into(),
            },
            quantization: "none".into(),
            pruning: None,
            metrics: Default::default(),
            weights: WeightsRef {
                format: "safetensors".into(),
                sha256: crate::sha256_hex(&weights),
                size: size as u64,
            },
            min_edge_version: "0.0.0".into(),
            golden: vec![],
            golden_tolerance: Default::default(),
        };
        Package::build(&manifest, weights, key).unwrap()
    }

    fn reports(out: &[Outbound]) -> Vec<(ReportState, u32, Vec<[u32; 2]>)> {
        out.iter()
            .filter_map(|o| match o {
                Outbound::Report(r) => Some((r.state, r.have, r.missing.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn four_reports_resume_after_restart_and_a_repeated_offer_is_answered() {
        let key = crate::package::generate_key().unwrap();
        let pkg = package(&key, 20 * MIN);
        let topics = Topics::new("t").unwrap();
        let offer = crate::rollout::offer_for(&pkg, &Target::Fleet, MIN).unwrap();
        let id = crate::messages::transfer_id(&offer.transfer).unwrap();
        let frames: Vec<Vec<u8>> = pkg
            .weights
            .chunks(MIN)
            .enumerate()
            .map(|(i, data)| {
                Chunk {
                    transfer: id,
                    index: i as u32,
                    count: 20,
                    data,
                }
                .encode()
            })
            .collect();
        let mem = MemoryStore::default();
        let mut inst = Inst::on_version_1();
        runtime().block_on(async {
            let trusted = vec![key.verifying_key()];
            let mem = {
                let mut rx = Receiver::new("d", topics.clone(), trusted.clone(), mem);
                rx.on_offer(offer.clone(), &mut inst).await;
                for f in &frames[..12] {
                    rx.on_chunk(f, &mut inst).await;
                }
                let out = rx.take_outbound();
                assert_eq!(
                    out[0],
                    Outbound::Subscribe(topics.transfer_filter(&offer.transfer))
                );
                assert_eq!(
                    reports(&out),
                    vec![
                        (ReportState::Receiving, 0, vec![[0, 19]]),
                        (ReportState::Receiving, 10, vec![]),
                    ]
                );
                rx.into_store()
            };
            // A restart: a new receiver on the same store resumes at chunk 12.
            let mut rx = Receiver::new("d", topics.clone(), trusted, mem);
            rx.restore(&inst).unwrap();
            rx.on_connected();
            assert_eq!(
                reports(&rx.take_outbound()),
                vec![(ReportState::Receiving, 12, vec![[12, 19]])]
            );
            // A corrupted chunk is asked for again and not stored.
            let mut bad = frames[12].clone();
            *bad.last_mut().unwrap() ^= 1;
            rx.on_chunk(&bad, &mut inst).await;
            assert_eq!(
                reports(&rx.take_outbound()),
                vec![(ReportState::Receiving, 12, vec![[12, 12]])]
            );
            for f in &frames[12..] {
                rx.on_chunk(f, &mut inst).await;
            }
            assert_eq!(
                reports(&rx.take_outbound()),
                vec![(ReportState::Activated, 0, vec![])]
            );
            assert_eq!(inst.installed, 1);
            // The same offer again gets the stored answer; nothing is installed twice.
            rx.on_offer(offer.clone(), &mut inst).await;
            assert_eq!(
                reports(&rx.take_outbound()),
                vec![(ReportState::Activated, 0, vec![])]
            );
            assert_eq!(inst.installed, 1);
        });
    }

    /// A restart found every chunk of the transfer stored (the process died in `finalize`,
    /// before the store's drop was durable): the next message for the device (here a probe)
    /// finishes it, and the probe is answered with the final report.
    #[test]
    fn a_transfer_restored_complete_finishes_on_the_next_message() {
        let key = crate::package::generate_key().unwrap();
        let pkg = package(&key, 4 * MIN);
        let topics = Topics::new("t").unwrap();
        let offer = crate::rollout::offer_for(&pkg, &Target::Fleet, MIN).unwrap();
        let id = crate::messages::transfer_id(&offer.transfer).unwrap();
        let mut mem = MemoryStore::default();
        mem.put_offer(&id, &offer.encode()).unwrap();
        for (i, data) in pkg.weights.chunks(MIN).enumerate() {
            mem.put_chunk(&id, i as u32, data).unwrap();
        }
        let mut inst = Inst::on_version_1();
        runtime().block_on(async {
            let mut rx = Receiver::new("d", topics.clone(), vec![key.verifying_key()], mem);
            rx.restore(&inst).unwrap();
            rx.on_connected();
            assert_eq!(
                reports(&rx.take_outbound()),
                vec![(ReportState::Receiving, 4, vec![])]
            );
            let probe = Complete {
                transfer: offer.transfer.clone(),
                chunks: 4,
            }
            .encode();
            let handled = rx
                .handle(
                    &topics.down(&Target::Device("d".into()), DownKind::Complete),
                    &probe,
                    &mut inst,
                )
                .await;
            assert!(handled);
            assert_eq!(inst.installed, 1);
            let finals: Vec<_> = reports(&rx.take_outbound())
                .into_iter()
                .filter(|r| r.0 == ReportState::Activated)
                .collect();
            assert!(!finals.is_empty(), "no final report");
        });
    }

    const MIN: usize = crate::messages::MIN_CHUNK;
}
