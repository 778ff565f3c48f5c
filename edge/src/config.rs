//! The daemon's TOML configuration. Every key is documented in `configs/edge.toml`; unknown keys
//! and bad values are refused with the file, the key and what was expected.

use std::path::{Path, PathBuf};

use protocol::mqtt::BrokerConfig;
use protocol::package::{VerifyingKey, parse_public_key};
use protocol::topics::check_segment;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub device: DeviceSection,
    pub storage: StorageSection,
    /// Absent: the daemon runs offline (no verdict publishing, no remote updates).
    #[serde(default)]
    pub mqtt: Option<BrokerConfig>,
    pub models: ModelsSection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// Unique device id (one MQTT topic level).
    pub id: String,
    pub site: String,
    pub line: String,
    /// Rollout groups this device belongs to (e.g. "canary").
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// State directory: models, transfers, verdict store.
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSection {
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

#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl EdgeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut config: EdgeConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        config.validate().map_err(err)?;
        // Relative paths are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        config.storage.dir = base.join(&config.storage.dir);
        if let Some(f) = &config.models.factory {
            config.models.factory = Some(base.join(f));
        }
        if let Some(tls) = config.mqtt.as_mut().and_then(|m| m.tls.as_mut()) {
            tls.ca = base.join(&tls.ca);
            tls.cert = tls.cert.as_ref().map(|c| base.join(c));
            tls.key = tls.key.as_ref().map(|k| base.join(k));
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let seg = |v: &str, key: &str| check_segment(v, key).map_err(|e| e.to_string());
        seg(&self.device.id, "device.id")?;
        seg(&self.device.site, "device.site")?;
        seg(&self.device.line, "device.line")?;
        for g in &self.device.groups {
            seg(g, "device.groups")?;
        }
        self.trusted_keys()?;
        if self.models.keep < 2 {
            return Err(
                "models.keep: at least 2 (the active model and one to roll back to)".into(),
            );
        }
        if self.models.max_package_mb == 0 {
            return Err("models.max_package_mb: must be positive".into());
        }
        if self.models.max_trial_boots == 0 {
            return Err("models.max_trial_boots: must be at least 1".into());
        }
        Ok(())
    }

    pub fn trusted_keys(&self) -> Result<Vec<VerifyingKey>, String> {
        if self.models.trusted_keys.is_empty() {
            return Err("models.trusted_keys: list at least one public key".into());
        }
        self.models
            .trusted_keys
            .iter()
            .enumerate()
            .map(|(i, k)| parse_public_key(k).map_err(|e| format!("models.trusted_keys[{i}]: {e}")))
            .collect()
    }
}
