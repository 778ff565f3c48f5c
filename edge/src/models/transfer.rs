//! Receiving a package: the offer checked before a byte is stored, chunks kept in sled (flushed
//! at each progress step) and resumed after a restart, missing ranges reported, then the whole
//! verified, stored, self-tested on its golden samples and activated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_detector::golden;
use protocol::messages::{Message, to_ranges, transfer_id};
use protocol::package::{Manifest, Package, check_weights, verify_signature};
use protocol::{Chunk, Complete, Offer, Report, ReportState, sha256_hex, version_at_least};

use super::{EDGE_VERSION, ModelLifecycle};

/// A package being received.
pub(super) struct Transfer {
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

impl ModelLifecycle {
    pub(super) fn restore_transfer(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn drop_transfer_key(&self, key: &[u8]) -> anyhow::Result<()> {
        self.transfers.remove(key)?;
        for entry in self.chunks.scan_prefix(key) {
            let (k, _) = entry?;
            self.chunks.remove(k)?;
        }
        Ok(())
    }

    pub(super) fn base_report(
        &self,
        transfer: &str,
        version: Option<u64>,
        state: ReportState,
    ) -> Report {
        new_report(&self.identity.id, transfer, version, state)
    }

    pub(super) fn progress_report(&self, t: &Transfer) -> Report {
        receiving(&self.identity.id, t, t.missing())
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

    pub(super) fn refuse(&mut self, transfer: &str, version: Option<u64>, reason: String) {
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
        if self
            .store
            .state
            .refused_versions
            .contains(&manifest.version)
        {
            return Err(format!(
                "v{} was rolled back by a signed command; a signed allow command (`trainer allow`) admits it again",
                manifest.version
            ));
        }
        let limit = self.config.max_package_mb << 20;
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

    pub(super) async fn on_offer(&mut self, offer: Offer) {
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
        crate::faults::point("offer");
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

    pub(super) async fn on_chunk(&mut self, payload: &[u8]) {
        let chunk = match Chunk::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("chunk refused: {e}");
                return;
            }
        };
        let device = self.identity.id.clone();
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
        if crate::faults::COMPILED_IN {
            crate::faults::point(&format!("chunk-{}", t.have_count));
        }
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

    pub(super) fn on_complete(&mut self, complete: Complete) {
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
        crate::faults::point("finalize");
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
        crate::faults::point("transfer-dropped");
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
        crate::faults::point("package-written");
        self.report(self.base_report(&t.hex, version, ReportState::Staged));
        crate::faults::point("staged");
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
                crate::faults::point("self-tested");
                let previous = self.store.state.active.as_ref().map(|m| m.version);
                if let Err(e) = self.store.switch_to(installed.clone(), true) {
                    self.refuse(&t.hex, version, format!("cannot switch: {e}"));
                    return;
                }
                crate::faults::point("state-saved");
                let _ = self.store.set_event(format!(
                    "activated {} v{} (was {})",
                    installed.id,
                    installed.version,
                    previous.map(|v| format!("v{v}")).unwrap_or("none".into())
                ));
                crate::faults::point("event-saved");
                *self.active.write().expect("lock") = Some((installed, Arc::new(detector)));
                crate::faults::point("activated");
                self.trial_deadline = Some(
                    tokio::time::Instant::now() + Duration::from_secs(self.config.confirm_after_s),
                );
                tracing::info!("activated {} v{}", t.manifest.id, t.manifest.version);
                let report = self.base_report(&t.hex, version, ReportState::Activated);
                self.finish(report);
                crate::faults::point("reported");
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
}
