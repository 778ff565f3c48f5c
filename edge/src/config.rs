//! The daemon's TOML configuration, assembled from each part's own config type (a `[table]`
//! deserializes into the `…Config` of the part it configures; `[rules]` into the pipeline's
//! `Rules`). Every key is documented in `configs/edge.toml`; unknown keys and bad values are
//! refused with the file, the key and what was expected.

use std::path::{Path, PathBuf};

use protocol::mqtt::BrokerConfig;
use protocol::topics::check_segment;
use serde::Deserialize;

use crate::capture::SourceConfig;
use crate::identity::DeviceConfig;
use crate::models::ModelsConfig;
use crate::pipeline::{PipelineConfig, Rules};
use crate::plc::PlcConfig;
use crate::serve::HttpConfig;
use crate::serve::review::ReviewConfig;
use crate::verdicts::store::StoreConfig;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub device: DeviceConfig,
    pub storage: StorageConfig,
    /// Absent: the daemon runs offline (no verdict publishing, no remote updates).
    #[serde(default)]
    pub mqtt: Option<BrokerConfig>,
    pub models: ModelsConfig,
    /// Where frames come from; absent: the daemon only manages models.
    #[serde(default)]
    pub source: Option<SourceConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub rules: Rules,
    #[serde(default)]
    pub store: StoreConfig,
    /// HTTP endpoints (health, metrics, verdicts, frames); absent: no HTTP server.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// The review queue and labeling page (served under [http]); absent: no queue.
    #[serde(default)]
    pub review: Option<ReviewConfig>,
    /// The PLC link (Modbus/TCP): every verdict to the reject gate; absent: no PLC.
    #[serde(default)]
    pub plc: Option<PlcConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// State directory: models, transfers, verdict store.
    pub dir: PathBuf,
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
        if let Some(SourceConfig::Folder { path: p, .. }) = config.source.as_mut() {
            *p = base.join(&*p);
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
        self.models.validate()?;
        if self.pipeline.max_batch == 0 || self.pipeline.queue == 0 {
            return Err("pipeline.max_batch and pipeline.queue: must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.rules.min_score) {
            return Err(format!(
                "rules.min_score {}: must be within 0..1",
                self.rules.min_score
            ));
        }
        if let Some(plc) = &self.plc {
            plc.validate().map_err(|e| format!("plc.{e}"))?;
            if self.source.is_none() {
                return Err("plc: verdicts come from inspection: add [source]".into());
            }
        }
        if let Some(review) = &self.review {
            review.validate()?;
            if self.http.is_none() {
                return Err("review: the labeling page is served over HTTP: add [http]".into());
            }
        }
        Ok(())
    }
}
