//! Every payload on the wire. JSON messages carry `"v": 1` and their `"kind"`; a chunk is a
//! binary frame with a versioned magic. Decoders check size, version and kind first and return
//! [`ProtocolError`] for anything else: random bytes never panic (property-tested, fuzzed).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ProtocolError;
use crate::topics::Target;

/// The version this build writes and the only one it reads.
pub const VERSION: u64 = 1;
/// Largest JSON message accepted: an offer carries the manifest (at most
/// [`crate::package::MAX_MANIFEST`], escaped) and one hash per chunk.
pub const MAX_JSON_BYTES: usize = 2 << 20;
/// Largest package chunk on the wire (under EMQX's default 1 MB packet limit with its header,
/// `trainer publish --chunk-kib` at most 1024); the smallest is [`MIN_CHUNK`].
pub const MAX_CHUNK: usize = 1 << 20;
/// Smallest package chunk (keeps an offer's chunk list short).
pub const MIN_CHUNK: usize = 16 << 10;

/// A JSON message type: its `kind` tag on the wire.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: &'static str;

    fn encode(&self) -> Vec<u8> {
        let mut value = serde_json::to_value(self).expect("messages serialize");
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("v".into(), VERSION.into());
            map.insert("kind".into(), Self::KIND.into());
        }
        serde_json::to_vec(&value).expect("messages serialize")
    }

    fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let what = Self::KIND;
        if bytes.len() > MAX_JSON_BYTES {
            return Err(ProtocolError::malformed(
                what,
                format!("{} bytes, more than {MAX_JSON_BYTES}", bytes.len()),
            ));
        }
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ProtocolError::malformed(what, e))?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| ProtocolError::malformed(what, "not a JSON object"))?;
        let version = map
            .remove("v")
            .ok_or_else(|| ProtocolError::malformed(what, "no `v` (version) field"))?;
        let version = version
            .as_u64()
            .ok_or_else(|| ProtocolError::malformed(what, "`v` is not an unsigned integer"))?;
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                what,
                got: version,
                supported: VERSION,
            });
        }
        match map.remove("kind") {
            Some(serde_json::Value::String(k)) if k == what => {}
            Some(other) => {
                return Err(ProtocolError::malformed(
                    what,
                    format!("`kind` is {other}, expected \"{what}\""),
                ));
            }
            None => return Err(ProtocolError::malformed(what, "no `kind` field")),
        }
        serde_json::from_value(value).map_err(|e| ProtocolError::malformed(what, e))
    }
}

/// "Here is a model package": the signed manifest (verbatim, so the signature checks) and how
/// its weights are cut into chunks. Sent to a target; devices answer with a [`Report`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// Transfer id: [`transfer_hex`] of the manifest and signature.
    pub transfer: String,
    pub target: Target,
    /// The manifest JSON exactly as signed.
    pub manifest: String,
    /// Hex ed25519 signature over `manifest`.
    pub signature: String,
    /// Weights size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    /// Hex SHA-256 of every chunk, in order.
    pub chunks: Vec<String>,
}

impl Message for Offer {
    const KIND: &'static str = "offer";
}

/// "All chunks were sent; tell me what you miss." Also the publisher's periodic probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    pub transfer: String,
    pub chunks: u32,
}

impl Message for Complete {
    const KIND: &'static str = "complete";
}

/// Where a device is with a transfer or a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    /// Offer accepted; `missing` lists the chunks still wanted.
    Receiving,
    /// The device heard of the transfer (a probe) but never got its offer: send it again.
    NeedOffer,
    /// All chunks in, digest verified, package stored; activation follows.
    Staged,
    /// Self-test passed and the model is active.
    Activated,
    /// The offer or package was refused (signature, size, digest, downgrade...).
    Refused,
    /// Loading or the self-test failed; the previous model stays (or went back) active.
    Failed,
    /// The device went back to an earlier model (command, crash loop, failed activation).
    RolledBack,
}

impl ReportState {
    /// Whether the transfer is over for this device.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            ReportState::Receiving | ReportState::NeedOffer | ReportState::Staged
        )
    }
}

/// A device's answer about a transfer or command, on `.../{device}/report`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub device: String,
    /// Transfer id the report is about (absent for commands).
    #[serde(default)]
    pub transfer: Option<String>,
    /// Package version concerned.
    #[serde(default)]
    pub version: Option<u64>,
    pub state: ReportState,
    /// Chunks held.
    #[serde(default)]
    pub have: u32,
    /// Missing chunk ranges, `[first, last]` inclusive.
    #[serde(default)]
    pub missing: Vec<[u32; 2]>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Message for Report {
    const KIND: &'static str = "report";
}

/// Identifies an installed model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub id: String,
    pub version: u64,
    pub sha256: String,
}

/// A device's state, retained on `.../{device}/status`; the broker's last will sets
/// `online: false`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub device: String,
    pub line: String,
    pub groups: Vec<String>,
    pub edge_version: String,
    pub online: bool,
    pub active: Option<ModelRef>,
    /// Kept earlier models, newest first (rollback candidates).
    pub previous: Vec<ModelRef>,
    /// `true` while a newly switched model has not yet run long enough to be confirmed.
    #[serde(default)]
    pub on_trial: bool,
    /// The last model event: activation, refusal, failure, rollback, with its reason.
    #[serde(default)]
    pub last_event: Option<String>,
    pub updated_unix: u64,
}

impl Message for Status {
    const KIND: &'static str = "status";
}

/// One detection in a verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defect {
    pub class: String,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in frame pixels.
    pub bbox: [f32; 4],
    /// Whether this detection made the frame fail (the decision rules).
    pub fails: bool,
}

/// Why a frame could not be decided (a fail-safe verdict, see [`Verdict::undecided`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UndecidedCause {
    /// The frame itself was unusable: a corrupt or truncated file, an incomplete camera buffer.
    BadFrame,
    /// No model was active (none installed yet, or the model was being switched).
    NoModel,
    /// The detector returned an error for the batch that held the frame.
    DetectorError,
    /// The inference thread failed (panicked) while the frame was in it; it was restarted.
    InferenceFailed,
    /// Shed under overload: the frame queue was full (drop-oldest policy).
    Overload,
    /// Not decided within `[pipeline] deadline_ms` of its capture.
    Deadline,
}

impl UndecidedCause {
    pub const ALL: [UndecidedCause; 6] = [
        Self::BadFrame,
        Self::NoModel,
        Self::DetectorError,
        Self::InferenceFailed,
        Self::Overload,
        Self::Deadline,
    ];

    /// The snake_case name used on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::NoModel => "no_model",
            Self::DetectorError => "detector_error",
            Self::InferenceFailed => "inference_failed",
            Self::Overload => "overload",
            Self::Deadline => "deadline",
        }
    }
}

/// The cause and the readable reason of an undecided frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Undecided {
    pub cause: UndecidedCause,
    pub reason: String,
}

/// The decision about one frame, on `.../{device}/verdict`. `id` is unique per device and
/// increases across restarts: consumers deduplicate on (device, id); delivery is at least once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    pub id: u64,
    pub device: String,
    /// Source sequence number of the frame.
    pub frame: u64,
    /// Strip position of the frame's first line (line-scan sources).
    pub line: u64,
    pub origin: String,
    pub width: u32,
    pub height: u32,
    pub captured_ms: u64,
    pub decided_ms: u64,
    /// Detector stage time for this frame.
    pub latency_ms: f64,
    pub pass: bool,
    pub defects: Vec<Defect>,
    /// Model that judged the frame: (id, version).
    pub model: Option<(String, u64)>,
    /// Set when the frame could not be decided: `pass` then follows the configured fail-safe
    /// policy (`[rules] undecided`: reject by default), never the detector. Absent on decided
    /// frames, so consumers that predate it read ordinary verdicts unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undecided: Option<Undecided>,
    /// Strip position of the frame's first line in millimetres (line-scan sources with a
    /// configured line pitch); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_mm: Option<f64>,
}

impl Verdict {
    /// "pass", "fail" or "undecided".
    pub fn result(&self) -> &'static str {
        match (&self.undecided, self.pass) {
            (Some(_), _) => "undecided",
            (None, true) => "pass",
            (None, false) => "fail",
        }
    }
}

impl Message for Verdict {
    const KIND: &'static str = "verdict";
}

/// What a command asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandAction {
    /// Go back to a kept earlier model: the newest one, or the given version. The version
    /// left is then refused by the device's offers (a signed floor) until an `Allow` for it.
    Rollback {
        #[serde(default)]
        to_version: Option<u64>,
    },
    /// Admit again a version a rollback command had the device refuse.
    Allow { version: u64 },
}

/// Longest a command may stay valid: `expires_ms - issued_ms` at most one day.
pub const MAX_COMMAND_TTL_MS: u64 = 24 * 3600 * 1000;

/// The signed body of a command. Everything a device checks is inside the signature: the
/// target (device, group or fleet), the site, when it was issued and when it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub action: CommandAction,
    pub target: Target,
    /// The site (first topic level): a command cannot be replayed at another site.
    pub site: String,
    /// Unix milliseconds; a device refuses a command not newer than the last it obeyed
    /// (no replay).
    pub issued_ms: u64,
    /// Unix milliseconds after which devices refuse it (at most [`MAX_COMMAND_TTL_MS`] after
    /// `issued_ms`).
    pub expires_ms: u64,
}

/// A command as sent: the JSON text of [`Command`] and an ed25519 signature over it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCommand {
    pub command: String,
    pub signature: String,
}

impl Message for SignedCommand {
    const KIND: &'static str = "command";
}

impl SignedCommand {
    pub fn sign(command: &Command, key: &crate::package::SigningKey) -> Self {
        let text = serde_json::to_string(command).expect("commands serialize");
        Self {
            signature: hex::encode(crate::package::sign(key, text.as_bytes())),
            command: text,
        }
    }
}

/// One piece of a package's weights. Binary frame:
/// `"EIC" 0x01 | transfer (32 bytes) | index (u32 BE) | count (u32 BE) | data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub transfer: [u8; 32],
    pub index: u32,
    pub count: u32,
    pub data: &'a [u8],
}

const CHUNK_MAGIC: &[u8; 3] = b"EIC";
pub const CHUNK_HEADER: usize = 3 + 1 + 32 + 4 + 4;

impl<'a> Chunk<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHUNK_HEADER + self.data.len());
        out.extend_from_slice(CHUNK_MAGIC);
        out.push(VERSION as u8);
        out.extend_from_slice(&self.transfer);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(self.data);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Self, ProtocolError> {
        let what = "chunk";
        if bytes.len() < CHUNK_HEADER {
            return Err(ProtocolError::malformed(
                what,
                format!(
                    "{} bytes, shorter than the {CHUNK_HEADER}-byte header",
                    bytes.len()
                ),
            ));
        }
        if &bytes[..3] != CHUNK_MAGIC {
            return Err(ProtocolError::malformed(what, "no EIC magic"));
        }
        if bytes[3] as u64 != VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                what,
                got: bytes[3] as u64,
                supported: VERSION,
            });
        }
        let transfer: [u8; 32] = bytes[4..36].try_into().expect("32 bytes");
        let index = u32::from_be_bytes(bytes[36..40].try_into().expect("4 bytes"));
        let count = u32::from_be_bytes(bytes[40..44].try_into().expect("4 bytes"));
        if count == 0 || index >= count {
            return Err(ProtocolError::malformed(
                what,
                format!("index {index} outside 0..{count}"),
            ));
        }
        Ok(Chunk {
            transfer,
            index,
            count,
            data: &bytes[CHUNK_HEADER..],
        })
    }
}

/// The transfer id of a package: hex SHA-256 over its manifest bytes and signature (two
/// packages with one manifest but different signers are different transfers).
pub fn transfer_hex(manifest: &[u8], signature: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(manifest);
    h.update(signature);
    hex::encode(h.finalize())
}

/// Decodes a hex transfer id.
pub fn transfer_id(hex_id: &str) -> Result<[u8; 32], ProtocolError> {
    let bytes = hex::decode(hex_id)
        .map_err(|e| ProtocolError::malformed("transfer id", format!("`{hex_id}`: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| ProtocolError::malformed("transfer id", format!("`{hex_id}` is not 32 bytes")))
}

/// Compresses sorted indices into inclusive ranges.
pub fn to_ranges(indices: impl IntoIterator<Item = u32>) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some(r) if r[1] + 1 == i => r[1] = i,
            _ => out.push([i, i]),
        }
    }
    out
}

/// Expands ranges, clamped to `count` and de-duplicated, in order.
pub fn from_ranges(ranges: &[[u32; 2]], count: u32) -> Vec<u32> {
    let mut set = std::collections::BTreeSet::new();
    for &[a, b] in ranges {
        if a > b || a >= count {
            continue;
        }
        set.extend(a..=b.min(count - 1));
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report() -> Report {
        Report {
            device: "cam1".into(),
            transfer: Some("ab".repeat(32)),
            version: Some(3),
            state: ReportState::Receiving,
            have: 2,
            missing: vec![[4, 9]],
            reason: None,
        }
    }

    #[test]
    fn json_round_trip_and_version_checks() {
        let r = report();
        let bytes = r.encode();
        assert_eq!(Report::decode(&bytes).unwrap(), r);
        let text = String::from_utf8(bytes).unwrap();
        let v2 = text.replace("\"v\":1", "\"v\":2");
        let err = Report::decode(v2.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("unsupported report version 2"), "{err}");
        let err = Complete::decode(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("expected \"complete\""), "{err}");
        let err = Report::decode(b"{\"kind\":\"report\"}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `v`"), "{err}");
        let extra = text.replace("\"have\":2", "\"have\":2,\"evil\":1");
        assert!(Report::decode(extra.as_bytes()).is_err());
    }

    #[test]
    fn commands_round_trip() {
        let c = Command {
            action: CommandAction::Rollback {
                to_version: Some(4),
            },
            target: Target::Group("canary".into()),
            site: "plant-a".into(),
            issued_ms: 17,
            expires_ms: 600_017,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("{\"rollback\":{\"to_version\":4}}"), "{text}");
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), c);
    }

    #[test]
    fn chunk_round_trip_and_errors() {
        let data = [7u8; 10];
        let c = Chunk {
            transfer: [9; 32],
            index: 3,
            count: 5,
            data: &data,
        };
        let bytes = c.encode();
        assert_eq!(Chunk::decode(&bytes).unwrap(), c);
        let mut v2 = bytes.clone();
        v2[3] = 2;
        assert!(matches!(
            Chunk::decode(&v2),
            Err(ProtocolError::UnsupportedVersion { got: 2, .. })
        ));
        let mut out_of_range = bytes.clone();
        out_of_range[39] = 5;
        assert!(Chunk::decode(&out_of_range).is_err());
        assert!(Chunk::decode(&bytes[..20]).is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(to_ranges([0, 1, 2, 5, 7, 8]), vec![[0, 2], [5, 5], [7, 8]]);
        assert_eq!(
            from_ranges(&[[0, 2], [7, 100], [3, 1]], 9),
            vec![0, 1, 2, 7, 8]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Offer::decode(&bytes);
            let _ = Complete::decode(&bytes);
            let _ = Report::decode(&bytes);
            let _ = Status::decode(&bytes);
            let _ = SignedCommand::decode(&bytes);
            let _ = Chunk::decode(&bytes);
            let _ = crate::package::Package::from_bytes(bytes.clone(), "random");
        }

        #[test]
        fn decoders_never_panic_on_mutated_messages(
            flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..6)
        ) {
            let mut bytes = report().encode();
            for (at, b) in flips {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            let _ = Report::decode(&bytes);
            let mut chunk = Chunk { transfer: [1; 32], index: 0, count: 2, data: b"abc" }.encode();
            let n = chunk.len();
            chunk[n / 2] ^= 0xff;
            let _ = Chunk::decode(&chunk);
        }
    }
}
