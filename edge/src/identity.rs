//! Who this device is on the fleet (`[device]`): the topic levels it publishes under and the
//! rollout groups it belongs to.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Unique device id (one MQTT topic level).
    pub id: String,
    pub site: String,
    pub line: String,
    /// Rollout groups this device belongs to (e.g. "canary").
    #[serde(default)]
    pub groups: Vec<String>,
}
