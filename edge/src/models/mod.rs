//! The model lifecycle beside the inspection pipeline: the active model the pipeline reads
//! ([`active`]), the package store with its trial and rollback state ([`store`]), packages
//! received over MQTT (the protocol's device side, `protocol::device`, with `transfer`: chunks
//! stored durably in sled, resumed after any interruption, self-tested on golden samples,
//! activated) and signed commands (`commands`). [`ModelLifecycle`] owns all of it; the daemon hands it the MQTT messages
//! addressed to this device.

pub mod active;
mod commands;
pub mod store;
mod transfer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::prelude::*;
use edge_detector::golden;
use protocol::device::{Outbound, Receiver};
use protocol::messages::Message;
use protocol::mqtt::Incoming;
use protocol::package::{Package, VerifyingKey, parse_public_key};
use protocol::topics::{DownKind, Target, Topics, UpKind};
use protocol::{Report, ReportState, SignedCommand, Status, unix_now};
use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;

use crate::identity::DeviceConfig;
pub use active::ActiveModel;
use store::{Installed, ModelStore};
use transfer::{EdgeInstaller, SledTransfers};

/// This build's version: packages name the oldest edge that may run them.
pub const EDGE_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Hex ed25519 public keys whose signatures this device accepts.
    pub trusted_keys: Vec<String>,
    /// Models kept on disk: the active one and `keep - 1` earlier ones to roll back to.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Largest package accepted, in MiB.
    #[serde(default = "default_max_package_mb")]
    pub max_package_mb: u64,
    /// A new model is on trial until the daemon has run this long with it.
    #[serde(default = "default_confirm_after")]
    pub confirm_after_s: u64,
    /// Starts allowed on a trial model; one more and the daemon goes back to the previous model.
    #[serde(default = "default_trial_boots")]
    pub max_trial_boots: u32,
    /// Package installed when no model is active yet (the factory default).
    #[serde(default)]
    pub factory: Option<PathBuf>,
}

fn default_keep() -> usize {
    3
}
fn default_max_package_mb() -> u64 {
    512
}
fn default_confirm_after() -> u64 {
    120
}
fn default_trial_boots() -> u32 {
    3
}

impl ModelsConfig {
    pub fn trusted_keys(&self) -> Result<Vec<VerifyingKey>, String> {
        if self.trusted_keys.is_empty() {
            return Err("models.trusted_keys: list at least one public key".into());
        }
        self.trusted_keys
            .iter()
            .enumerate()
            .map(|(i, k)| parse_public_key(k).map_err(|e| format!("models.trusted_keys[{i}]: {e}")))
            .collect()
    }

    /// What `[models]` must satisfy; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.trusted_keys()?;
        if self.keep < 2 {
            return Err(
                "models.keep: at least 2 (the active model and one to roll back to)".into(),
            );
        }
        if self.max_package_mb == 0 {
            return Err("models.max_package_mb: must be positive".into());
        }
        if self.max_trial_boots == 0 {
            return Err("models.max_trial_boots: must be at least 1".into());
        }
        Ok(())
    }
}

/// The device's models: store, active model, the package being received, trial and commands.
pub struct ModelLifecycle {
    config: ModelsConfig,
    identity: DeviceConfig,
    trusted: Vec<VerifyingKey>,
    topics: Topics,
    store: ModelStore,
    receiver: Receiver<SledTransfers>,
    active: ActiveModel,
    device: Device,
    client: Option<AsyncClient>,
    trial_deadline: Option<tokio::time::Instant>,
}

impl ModelLifecycle {
    /// Opens the model store under `state_dir` and brings up the active model: counts a trial
    /// boot (and rolls back after too many), installs the factory package when there is no
    /// model, falls back to earlier models while the active one fails to load, and picks up a
    /// transfer that was under way.
    pub fn open(
        config: ModelsConfig,
        identity: DeviceConfig,
        state_dir: &Path,
        device: Device,
    ) -> anyhow::Result<Self> {
        let trusted = config.trusted_keys().map_err(anyhow::Error::msg)?;
        let topics = Topics::new(&identity.site)?;
        let mut store = ModelStore::open(&state_dir.join("models"), config.keep)?;
        if let Some(boots) = store.count_boot(config.max_trial_boots)? {
            let reason = format!(
                "crash loop: {boots} starts without {} s of healthy running",
                config.confirm_after_s
            );
            match store.rollback(None, &reason) {
                Ok((_, to)) => tracing::warn!("{reason}: back to v{}", to.version),
                Err(e) => {
                    tracing::error!("{e}");
                    store.confirm()?;
                }
            }
        }
        // Transfers hold at most a package or two: a small page cache.
        let db = sled::Config::new()
            .path(state_dir.join("transfers.sled"))
            .cache_capacity(16 << 20)
            .open()?;
        let receiver = Receiver::new(
            &identity.id,
            topics.clone(),
            trusted.clone(),
            SledTransfers::open(db)?,
        );
        let mut models = Self {
            trusted,
            topics,
            store,
            receiver,
            active: ActiveModel::default(),
            device,
            client: None,
            trial_deadline: None,
            config,
            identity,
        };
        models.install_factory()?;
        models.load_active();
        let (receiver, installer) = models.parts();
        receiver
            .restore(&installer)
            .map_err(|e| anyhow::anyhow!("transfer store: {e}"))?;
        Ok(models)
    }

    /// The handle the pipeline and the labeling page read the active model through.
    pub fn active(&self) -> ActiveModel {
        self.active.clone()
    }

    /// The MQTT subscriptions this device needs: its own, its groups' and the fleet's downward
    /// topics.
    pub fn subscriptions(&self) -> Vec<(String, QoS)> {
        let d = &self.identity;
        let mut targets = vec![Target::Device(d.id.clone()), Target::Fleet];
        targets.extend(d.groups.iter().map(|g| Target::Group(g.clone())));
        targets
            .iter()
            .map(|t| (self.topics.down_filter(t), QoS::AtLeastOnce))
            .collect()
    }

    /// Where reports and status go from now on.
    pub fn set_client(&mut self, client: AsyncClient) {
        self.client = Some(client);
    }

    /// When the model on trial is due to be confirmed, if one is.
    pub fn trial_deadline(&self) -> Option<tokio::time::Instant> {
        self.trial_deadline
    }

    /// The trial is over: the active model has run long enough.
    pub fn confirm_trial(&mut self) {
        self.trial_deadline = None;
        if self.store.confirm().unwrap_or(false) {
            crate::faults::point("confirmed");
            tracing::info!("model confirmed after {} s", self.config.confirm_after_s);
            self.publish_status();
        }
    }

    /// (Re)connected to the broker: announce the status and a transfer under way.
    pub fn on_connected(&mut self) {
        self.publish_status();
        self.receiver.on_connected();
        self.send_outbound();
    }

    /// Makes received chunks durable (at shutdown).
    pub async fn flush(&self) {
        let _ = self.receiver.store().db.flush_async().await;
    }

    /// The receiver and the installer it hands packages to, borrowed side by side.
    fn parts(&mut self) -> (&mut Receiver<SledTransfers>, EdgeInstaller<'_>) {
        let d = &self.identity;
        let installer = EdgeInstaller {
            config: &self.config,
            store: &mut self.store,
            active: &self.active,
            device: &self.device,
            client: self.client.as_ref(),
            report_topic: self.topics.up(&d.line, &d.id, UpKind::Report),
            trial_deadline: &mut self.trial_deadline,
        };
        (&mut self.receiver, installer)
    }

    /// Sends what the receiver asked for; a final report also becomes the status's last event.
    fn send_outbound(&mut self) {
        for out in self.receiver.take_outbound() {
            match out {
                Outbound::Report(r) if r.state.is_final() => self.finish(r),
                Outbound::Report(r) => self.report(r),
                Outbound::Subscribe(filter) => {
                    if let Some(c) = &self.client
                        && let Err(e) = c.try_subscribe(&filter, QoS::AtLeastOnce)
                    {
                        tracing::warn!("subscribe {filter}: {e}");
                    }
                }
                Outbound::Unsubscribe(filter) => {
                    if let Some(c) = &self.client
                        && let Err(e) = c.try_unsubscribe(&filter)
                    {
                        tracing::warn!("unsubscribe {filter}: {e}");
                    }
                }
            }
        }
    }

    fn install_factory(&mut self) -> anyhow::Result<()> {
        if self.store.state.active.is_some() {
            return Ok(());
        }
        let Some(path) = self.config.factory.clone() else {
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
                                + Duration::from_secs(self.config.confirm_after_s),
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

    pub fn status(&self, online: bool) -> Status {
        let d = &self.identity;
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

    pub fn up_topic(&self, kind: UpKind) -> String {
        let d = &self.identity;
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

    /// Sends a final report and records its event.
    fn finish(&mut self, report: Report) {
        let activated = report.state == ReportState::Activated;
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
            if report.state == ReportState::Refused {
                // Refusals are what junk and hostile offers get: they cost no disk write (the
                // event is saved with the next real change of state).
                self.store.state.last_event = Some(event);
            } else {
                let _ = self.store.set_event(event);
            }
        }
        self.report(report);
        if activated {
            crate::faults::point("reported");
        }
        self.publish_status();
    }

    /// Handles a message on one of [`Self::subscriptions`] or on a transfer's topic.
    pub async fn handle(&mut self, msg: Incoming) {
        if let Some((target, kind)) = self.topics.parse_down(&msg.topic) {
            if !target.includes(&self.identity.id, &self.identity.groups) {
                return;
            }
            if kind == DownKind::Command {
                match SignedCommand::decode(&msg.payload) {
                    Ok(c) => self.on_command(c),
                    Err(e) => tracing::warn!("{}: {e}", msg.topic),
                }
                return;
            }
        }
        let (receiver, mut installer) = self.parts();
        receiver
            .handle(&msg.topic, &msg.payload, &mut installer)
            .await;
        self.send_outbound();
    }
}
