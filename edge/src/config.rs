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
    /// Where frames come from; absent: the daemon only manages models.
    #[serde(default)]
    pub source: Option<SourceConfig>,
    #[serde(default)]
    pub pipeline: crate::pipeline::PipelineConfig,
    #[serde(default)]
    pub rules: crate::pipeline::Rules,
    #[serde(default)]
    pub store: crate::store::StoreConfig,
    /// HTTP endpoints (health, metrics, verdicts, frames); absent: no HTTP server.
    #[serde(default)]
    pub http: Option<HttpSection>,
    /// The review queue and labeling page (served under [http]); absent: no queue.
    #[serde(default)]
    pub review: Option<crate::review::ReviewConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address to listen on, e.g. "0.0.0.0:8080".
    pub listen: String,
}

/// Frame sources, chosen by `kind`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Replays JPEG/PNG/BMP files from a folder (sorted by name).
    Folder {
        path: PathBuf,
        /// Frames per second; 0: as fast as the pipeline takes them.
        #[serde(default)]
        fps: f64,
        /// Start again after the last file.
        #[serde(default, rename = "loop")]
        looped: bool,
    },
    /// A synthetic steel strip with NEU-style defects at known positions.
    Synthetic {
        /// Strip width in 200-pixel tiles.
        #[serde(default = "one")]
        tiles: usize,
        /// Lines per frame and lines shared by consecutive frames.
        #[serde(default = "two_hundred")]
        frame_height: usize,
        #[serde(default)]
        overlap: usize,
        /// Probability that a 200x200 tile carries defects.
        #[serde(default = "defect_rate")]
        defect_rate: f64,
        #[serde(default)]
        seed: u64,
        #[serde(default)]
        fps: f64,
        /// Stop after this many frames (absent: endless).
        #[serde(default)]
        frames: Option<u64>,
    },
    /// A V4L2/UVC camera (cargo feature `camera`, on by default).
    Camera {
        /// Device index (/dev/videoN).
        #[serde(default)]
        index: u32,
        width: u32,
        height: u32,
        #[serde(default = "thirty")]
        fps: u32,
        /// What the camera sends; frames are converted to grey either way.
        #[serde(default)]
        pixel_format: PixelFormat,
    },
}

/// Camera pixel formats (V4L2 fourcc).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    #[default]
    Mjpeg,
    Yuyv,
    Nv12,
    Gray,
    Rgb,
}

fn one() -> usize {
    1
}
fn two_hundred() -> usize {
    200
}
fn defect_rate() -> f64 {
    0.3
}
fn thirty() -> u32 {
    30
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
        self.trusted_keys()?;
        if self.models.keep < 2 {
            return Err(
                "models.keep: at least 2 (the active model and one to roll back to)".into(),
            );
        }
        if self.models.max_package_mb == 0 {
            return Err("models.max_package_mb: must be positive".into());
        }
        if self.pipeline.max_batch == 0 || self.pipeline.queue == 0 {
            return Err("pipeline.max_batch and pipeline.queue: must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.rules.min_score) {
            return Err(format!(
                "rules.min_score {}: must be within 0..1",
                self.rules.min_score
            ));
        }
        if self.models.max_trial_boots == 0 {
            return Err("models.max_trial_boots: must be at least 1".into());
        }
        if let Some(review) = &self.review {
            review.validate()?;
            if self.http.is_none() {
                return Err("review: the labeling page is served over HTTP: add [http]".into());
            }
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
