//! The edge's half of receiving a package: the protocol itself is `protocol::device`; here are
//! where its transfers live (sled: offers, chunks and finished reports, flushed at every tenth)
//! and how a verified package becomes the active model (the package store, the golden-sample
//! self-test, the switch with its trial).

use std::sync::Arc;
use std::time::Duration;

use edge_detector::golden;
use protocol::device::{Installed, Installer, TransferStore};
use protocol::messages::Message;
use protocol::package::{Manifest, Package};
use protocol::{Offer, Report, version_at_least};
use rumqttc::{AsyncClient, QoS};

use super::store::ModelStore;
use super::{ActiveModel, EDGE_VERSION, ModelsConfig};

/// Transfers in sled: `transfers` (offer by transfer id), `chunks` (id ++ index BE), `finished`
/// (final report by transfer id).
pub(super) struct SledTransfers {
    pub(super) db: sled::Db,
    transfers: sled::Tree,
    chunks: sled::Tree,
    finished: sled::Tree,
}

fn chunk_key(id: &[u8; 32], index: u32) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..32].copy_from_slice(id);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

impl SledTransfers {
    pub(super) fn open(db: sled::Db) -> sled::Result<Self> {
        Ok(Self {
            transfers: db.open_tree("transfers")?,
            chunks: db.open_tree("chunks")?,
            finished: db.open_tree("finished")?,
            db,
        })
    }
}

impl TransferStore for SledTransfers {
    fn offers(&self) -> Result<protocol::device::StoredOffers, String> {
        let mut out = vec![];
        for entry in self.transfers.iter() {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            match <[u8; 32]>::try_from(key.as_ref()) {
                Ok(id) => out.push((id, value.to_vec())),
                Err(_) => {
                    let _ = self.transfers.remove(key);
                }
            }
        }
        Ok(out)
    }

    fn put_offer(&mut self, id: &[u8; 32], offer: &[u8]) -> Result<(), String> {
        self.transfers
            .insert(id, offer)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn put_chunk(&mut self, id: &[u8; 32], index: u32, data: &[u8]) -> Result<(), String> {
        self.chunks
            .insert(chunk_key(id, index), data)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn chunk_indices(&self, id: &[u8; 32]) -> Result<Vec<u32>, String> {
        self.chunks
            .scan_prefix(id)
            .keys()
            .map(|k| {
                let k = k.map_err(|e| e.to_string())?;
                Ok(u32::from_be_bytes(
                    k[32..36].try_into().map_err(|_| "chunk key too short")?,
                ))
            })
            .collect()
    }

    fn weights(&self, id: &[u8; 32], size: u64) -> Result<Vec<u8>, String> {
        let mut weights = Vec::with_capacity(size as usize);
        for entry in self.chunks.scan_prefix(id).values() {
            weights.extend_from_slice(&entry.map_err(|e| e.to_string())?);
        }
        Ok(weights)
    }

    fn drop_transfer(&mut self, id: &[u8; 32]) -> Result<(), String> {
        self.transfers.remove(id).map_err(|e| e.to_string())?;
        for key in self.chunks.scan_prefix(id).keys() {
            let key = key.map_err(|e| e.to_string())?;
            self.chunks.remove(key).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn finished(&self, id: &[u8; 32]) -> Option<Vec<u8>> {
        self.finished.get(id).ok()?.map(|v| v.to_vec())
    }

    fn put_finished(&mut self, id: &[u8; 32], report: &[u8]) {
        if let Err(e) = self.finished.insert(id, report) {
            tracing::error!("transfer store: {e}");
        }
    }

    fn remove_finished(&mut self, id: &[u8; 32]) {
        let _ = self.finished.remove(id);
    }

    fn flush(&mut self) {
        // sled flushes on its own every 500 ms; this bounds what a kill -9 can lose.
        if let Err(e) = self.db.flush() {
            tracing::error!("transfer store flush: {e}");
        }
    }
}

/// The model side of an install: borrowed from [`super::ModelLifecycle`] for one message.
pub(super) struct EdgeInstaller<'a> {
    pub(super) config: &'a ModelsConfig,
    pub(super) store: &'a mut ModelStore,
    pub(super) active: &'a ActiveModel,
    pub(super) device: &'a burn::prelude::Device,
    pub(super) client: Option<&'a AsyncClient>,
    pub(super) report_topic: String,
    pub(super) trial_deadline: &'a mut Option<tokio::time::Instant>,
}

impl Installer for EdgeInstaller<'_> {
    fn check(&self, manifest: &Manifest, offer: &Offer) -> Result<(), String> {
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
        Ok(())
    }

    fn active_version(&self) -> Option<u64> {
        self.store.state.active.as_ref().map(|m| m.version)
    }

    async fn install(
        &mut self,
        manifest: &Manifest,
        package: Package,
        staged: Report,
    ) -> Installed {
        let installed = match self.store.install(manifest, &package) {
            Ok(i) => i,
            Err(e) => return Installed::Refused(format!("cannot store the package: {e}")),
        };
        crate::faults::point("package-written");
        if let Some(client) = self.client
            && let Err(e) = client.try_publish(
                self.report_topic.clone(),
                QoS::AtLeastOnce,
                false,
                staged.encode(),
            )
        {
            tracing::warn!("report not published: {e}");
        }
        crate::faults::point("staged");
        tracing::info!("staged {} v{}: self-test", manifest.id, manifest.version);
        let origin = self.store.path_of(&installed).display().to_string();
        let device = self.device.clone();
        let checked = tokio::task::block_in_place(|| {
            golden::load_and_check(manifest, package.weights, &origin, &device)
        });
        match checked {
            Ok(detector) => {
                crate::faults::point("self-tested");
                let previous = self.active_version();
                if let Err(e) = self.store.switch_to(installed.clone(), true) {
                    return Installed::Refused(format!("cannot switch: {e}"));
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
                *self.trial_deadline = Some(
                    tokio::time::Instant::now() + Duration::from_secs(self.config.confirm_after_s),
                );
                tracing::info!("activated {} v{}", manifest.id, manifest.version);
                Installed::Activated
            }
            Err(e) => {
                self.store.discard(&installed);
                let kept = self
                    .active_version()
                    .map(|v| format!("v{v}"))
                    .unwrap_or("no model".into());
                let reason = format!("self-test failed, kept {kept}: {e}");
                tracing::error!("{} v{}: {reason}", manifest.id, manifest.version);
                Installed::Failed(reason)
            }
        }
    }

    fn step(&mut self, name: &str) {
        crate::faults::point(name);
    }
}
