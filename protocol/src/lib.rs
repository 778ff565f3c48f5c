//! The contract between the trainer and the edge fleet, with no deep-learning dependency:
//!
//! - [`topics`]: the MQTT topic layout (site / line / device upward, device / group / fleet
//!   downward);
//! - [`messages`]: every payload, versioned; decoders refuse unknown versions and malformed
//!   bytes with an error, never a panic;
//! - [`package`]: the signed model package (manifest + ed25519 signature + weights) and keys;
//! - [`device`]: the device side of a transfer (offer, chunks, resume, verification, reports),
//!   shared by the edge daemon and the fleet simulator;
//! - [`mqtt`] (feature `mqtt`, default): broker settings (TLS with client certificates, credentials) shared by both sides;
//! - [`rollout`] (feature `mqtt`): the publisher — waves, offers, broadcast chunks, repair per device, abort, a durable record;
//! - [`acl`]: the fleet list and the mosquitto ACL generated from it.

pub mod acl;
pub mod device;
#[cfg(all(test, feature = "mqtt"))]
mod fuzz_seeds;
pub mod messages;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod package;
#[cfg(feature = "mqtt")]
pub mod rollout;
pub mod topics;

pub use messages::{
    Chunk, Command, CommandAction, Complete, Defect, ModelRef, Offer, Report, ReportState,
    SignedCommand, Status, Undecided, UndecidedCause, Verdict,
};
pub use package::{GoldenSample, Manifest, Package, SigningKey, VerifyingKey};
pub use topics::{Target, Topics};

/// Everything that can be wrong with a message, a package, a key or a topic.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("unsupported {what} version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        what: &'static str,
        got: u64,
        supported: u64,
    },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("signature check failed: {0}")]
    Signature(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mqtt: {0}")]
    Mqtt(String),
}

impl ProtocolError {
    pub(crate) fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Compares dotted numeric versions ("0.1.0"); `None` when either is not of that form.
pub fn version_at_least(have: &str, need: &str) -> Option<bool> {
    let parse = |s: &str| -> Option<Vec<u64>> {
        s.trim().split('.').map(|p| p.parse::<u64>().ok()).collect()
    };
    let (mut a, mut b) = (parse(have)?, parse(need)?);
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    Some(a >= b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_at_least("0.10.0", "0.9.3"), Some(true));
        assert_eq!(version_at_least("0.1", "0.1.0"), Some(true));
        assert_eq!(version_at_least("0.1.0", "0.1.1"), Some(false));
        assert_eq!(version_at_least("0.1.x", "0.1.1"), None);
    }
}
