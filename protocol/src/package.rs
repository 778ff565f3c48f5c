//! The model package and its signing keys.
//!
//! File layout (`.edgepkg`):
//! `"EDGEPKG" 0x01 | manifest length (u32 BE) | manifest JSON | ed25519 signature (64) | weights`.
//! The signature covers the manifest bytes; the manifest holds the weights' SHA-256 and size, so
//! one signature check plus one digest check authenticates the whole package.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use ed25519_dalek::{Signature, Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::{ProtocolError, sha256_hex};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// First bytes of every package file.
pub const MAGIC: &[u8; 8] = b"EDGEPKG\x01";
/// The manifest schema this build reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;
/// Largest manifest (config, golden samples); the factory model's is 14 KB.
pub const MAX_MANIFEST: usize = 1 << 20;

/// Input the model expects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    /// How frames are brought to the input size ("stretch", "letterbox", ...).
    pub resize: String,
}

/// Weights the manifest vouches for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsRef {
    /// "safetensors": the edge's model file (config in the header).
    pub format: String,
    pub size: u64,
    pub sha256: String,
}

/// One expected detection on a golden sample, in image pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedDetection {
    pub class: String,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// An image with the detections the packaged model gives on it; the edge's self-test runs it
/// before switching to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSample {
    pub name: String,
    /// Base64 of the encoded image (JPEG/PNG/BMP).
    pub image: String,
    pub expected: Vec<ExpectedDetection>,
}

impl GoldenSample {
    pub fn image_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.image)
            .map_err(|e| ProtocolError::malformed("golden sample", format!("{}: {e}", self.name)))
    }

    pub fn encode_image(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}

/// How closely the self-test must reproduce the golden detections.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenTolerance {
    /// Detections scoring at least this are expected (and must all be reproduced).
    pub min_score: f32,
    /// Minimum IoU between an expected and a reproduced box.
    pub iou: f32,
    /// Maximum score difference.
    pub score: f32,
}

impl Default for GoldenTolerance {
    fn default() -> Self {
        Self {
            min_score: 0.3,
            iou: 0.9,
            score: 0.05,
        }
    }
}

/// What a package is; signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Model name, e.g. "neu-edge".
    pub id: String,
    /// Monotonic: devices refuse a package not newer than their active one.
    pub version: u64,
    pub created_unix: u64,
    /// The detector configuration (architecture, head, preprocessing, thresholds) as JSON.
    pub architecture: serde_json::Value,
    pub classes: Vec<String>,
    pub input: InputSpec,
    /// "none", or the quantization applied (e.g. "int8-per-channel").
    pub quantization: String,
    /// Pruning applied (per-block widths, FLOPs ratio), if any.
    pub pruning: Option<serde_json::Value>,
    /// Evaluation metrics at packaging time (e.g. "val_map50").
    pub metrics: BTreeMap<String, f64>,
    pub weights: WeightsRef,
    /// Oldest edge release that can run this package.
    pub min_edge_version: String,
    pub golden: Vec<GoldenSample>,
    pub golden_tolerance: GoldenTolerance,
}

impl Manifest {
    /// Parses and checks the manifest's own consistency.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        if bytes.len() > MAX_MANIFEST {
            return Err(ProtocolError::malformed(
                "manifest",
                format!("{} bytes, more than {MAX_MANIFEST}", bytes.len()),
            ));
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ProtocolError::malformed("manifest", e))?;
        match value.get("format").and_then(|f| f.as_u64()) {
            Some(f) if f == MANIFEST_FORMAT as u64 => {}
            Some(f) => {
                return Err(ProtocolError::UnsupportedVersion {
                    what: "manifest",
                    got: f,
                    supported: MANIFEST_FORMAT as u64,
                });
            }
            None => return Err(ProtocolError::malformed("manifest", "no numeric `format`")),
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| ProtocolError::malformed("manifest", e))?;
        if manifest.weights.sha256.len() != 64 || hex::decode(&manifest.weights.sha256).is_err() {
            return Err(ProtocolError::malformed(
                "manifest",
                "weights.sha256 is not 64 hex digits",
            ));
        }
        Ok(manifest)
    }
}

/// A package in memory: the manifest bytes exactly as signed, the signature and the weights.
#[derive(Clone, Debug)]
pub struct Package {
    pub manifest_bytes: Vec<u8>,
    pub signature: [u8; 64],
    pub weights: Vec<u8>,
}

impl Package {
    /// Signs `manifest` (whose weights field must describe `weights`).
    pub fn build(
        manifest: &Manifest,
        weights: Vec<u8>,
        key: &SigningKey,
    ) -> Result<Self, ProtocolError> {
        if manifest.weights.size != weights.len() as u64
            || manifest.weights.sha256 != sha256_hex(&weights)
        {
            return Err(ProtocolError::Invalid(
                "manifest.weights does not describe these weights".into(),
            ));
        }
        let manifest_bytes =
            serde_json::to_vec_pretty(manifest).expect("manifests serialize to JSON");
        let signature = key.sign(&manifest_bytes).to_bytes();
        Ok(Self {
            manifest_bytes,
            signature,
            weights,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(8 + 4 + self.manifest_bytes.len() + 64 + self.weights.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.manifest_bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.manifest_bytes);
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.weights);
        out
    }

    /// Splits a package file; `origin` names it in errors. Checks structure only: call
    /// [`Package::verify`] before trusting it.
    pub fn from_bytes(mut bytes: Vec<u8>, origin: &str) -> Result<Self, ProtocolError> {
        let bad = |reason: String| ProtocolError::Malformed {
            what: "package",
            reason: format!("{origin}: {reason}"),
        };
        if bytes.len() < 12 || bytes[..7] != MAGIC[..7] {
            return Err(bad("not a model package (no EDGEPKG magic)".into()));
        }
        if bytes[7] != MAGIC[7] {
            return Err(ProtocolError::UnsupportedVersion {
                what: "package",
                got: bytes[7] as u64,
                supported: MAGIC[7] as u64,
            });
        }
        let len = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if len > MAX_MANIFEST || bytes.len() < 12 + len + 64 {
            return Err(bad(format!(
                "truncated: manifest of {len} bytes plus signature do not fit in {} bytes",
                bytes.len()
            )));
        }
        let weights = bytes.split_off(12 + len + 64);
        let signature: [u8; 64] = bytes[12 + len..].try_into().expect("64 bytes");
        bytes.truncate(12 + len);
        let manifest_bytes = bytes.split_off(12);
        Ok(Self {
            manifest_bytes,
            signature,
            weights,
        })
    }

    pub fn read(path: &Path) -> Result<Self, ProtocolError> {
        let bytes = std::fs::read(path).map_err(|source| ProtocolError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(bytes, &path.display().to_string())
    }

    /// The same package (manifest and weights byte for byte) signed by `key` instead: key
    /// rotation. Check the old signature first where the old key is known.
    pub fn resigned(self, key: &SigningKey) -> Package {
        Package {
            signature: sign(key, &self.manifest_bytes),
            ..self
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), ProtocolError> {
        write_atomic(path, &self.to_bytes())
    }

    /// Checks the signature against the trusted keys, parses the manifest and checks the weights
    /// against it. Returns the manifest.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<Manifest, ProtocolError> {
        verify_signature(&self.manifest_bytes, &self.signature, trusted)?;
        let manifest = Manifest::from_json(&self.manifest_bytes)?;
        check_weights(&manifest, &self.weights)?;
        Ok(manifest)
    }
}

/// The weights must be exactly what the manifest says.
pub fn check_weights(manifest: &Manifest, weights: &[u8]) -> Result<(), ProtocolError> {
    if weights.len() as u64 != manifest.weights.size {
        return Err(ProtocolError::Invalid(format!(
            "weights are {} bytes, the manifest says {} (truncated or padded)",
            weights.len(),
            manifest.weights.size
        )));
    }
    let digest = sha256_hex(weights);
    if digest != manifest.weights.sha256 {
        return Err(ProtocolError::Invalid(format!(
            "weights digest {digest} differs from the manifest's {}",
            manifest.weights.sha256
        )));
    }
    Ok(())
}

/// Verifies `signature` over `message` with any of the trusted keys.
pub fn verify_signature(
    message: &[u8],
    signature: &[u8],
    trusted: &[VerifyingKey],
) -> Result<(), ProtocolError> {
    let signature = Signature::from_slice(signature)
        .map_err(|e| ProtocolError::Signature(format!("not an ed25519 signature: {e}")))?;
    if trusted.is_empty() {
        return Err(ProtocolError::Signature(
            "no trusted keys configured".into(),
        ));
    }
    if trusted
        .iter()
        .any(|k| k.verify(message, &signature).is_ok())
    {
        Ok(())
    } else {
        Err(ProtocolError::Signature(format!(
            "not signed by any of the {} trusted key(s)",
            trusted.len()
        )))
    }
}

/// Signs with the given key (commands use this too).
pub fn sign(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    key.sign(message).to_bytes()
}

/// A fresh signing key from the OS's randomness.
pub fn generate_key() -> Result<SigningKey, ProtocolError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| ProtocolError::Invalid(format!("no OS randomness: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Public key as 64 hex digits (what edge configs list as trusted).
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

pub fn parse_public_key(text: &str) -> Result<VerifyingKey, ProtocolError> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            ProtocolError::Invalid(format!(
                "public key `{}`: expected 64 hex digits",
                text.trim()
            ))
        })?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| ProtocolError::Invalid(format!("public key `{}`: {e}", text.trim())))
}

/// Reads a secret key file written by [`write_key_pair`] (64 hex digits).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, ProtocolError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProtocolError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            ProtocolError::Invalid(format!(
                "{}: not a signing key (expected 64 hex digits)",
                path.display()
            ))
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `NAME.key` (secret, mode 0600) and `NAME.pub` in `dir`; returns their paths.
pub fn write_key_pair(
    dir: &Path,
    name: &str,
    key: &SigningKey,
) -> Result<(std::path::PathBuf, std::path::PathBuf), ProtocolError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ProtocolError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    if secret.exists() {
        return Err(ProtocolError::Invalid(format!(
            "{} exists: refusing to overwrite a signing key",
            secret.display()
        )));
    }
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&secret).map_err(io(&secret))?;
        writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(io(&secret))?;
    }
    std::fs::write(
        &public,
        format!("{}\n", public_key_hex(&key.verifying_key())),
    )
    .map_err(io(&public))?;
    Ok((secret, public))
}

/// Write to a temporary file, fsync, rename: readers see the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ProtocolError> {
    use std::io::Write;
    let io = |source| ProtocolError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn manifest_for(weights: &[u8], version: u64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            id: "test".into(),
            version,
            created_unix: 0,
            architecture: serde_json::json!({}),
            classes: vec!["a".into()],
            input: InputSpec {
                width: 8,
                height: 8,
                channels: 3,
                resize: "stretch".into(),
            },
            quantization: "none".into(),
            pruning: None,
            metrics: BTreeMap::new(),
            weights: WeightsRef {
                format: "safetensors".into(),
                size: weights.len() as u64,
                sha256: sha256_hex(weights),
            },
            min_edge_version: "0.1.0".into(),
            golden: vec![],
            golden_tolerance: GoldenTolerance::default(),
        }
    }

    #[test]
    fn a_resigned_package_verifies_with_the_new_key_only() {
        let (old, new) = (
            SigningKey::from_bytes(&[3; 32]),
            SigningKey::from_bytes(&[5; 32]),
        );
        let weights = b"weights".to_vec();
        let pkg = Package::build(&manifest_for(&weights, 2), weights, &old).unwrap();
        let resigned = pkg.clone().resigned(&new);
        assert_eq!(resigned.manifest_bytes, pkg.manifest_bytes);
        assert_eq!(resigned.weights, pkg.weights);
        assert_eq!(resigned.verify(&[new.verifying_key()]).unwrap().version, 2);
        assert!(resigned.verify(&[old.verifying_key()]).is_err());
    }

    #[test]
    fn sign_write_read_verify() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        let weights = b"weights".to_vec();
        let pkg = Package::build(&manifest_for(&weights, 2), weights, &key).unwrap();
        let bytes = pkg.to_bytes();
        let back = Package::from_bytes(bytes.clone(), "p").unwrap();
        assert_eq!(back.verify(&[key.verifying_key()]).unwrap().version, 2);
        let err = back
            .verify(&[other.verifying_key()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not signed by any"), "{err}");

        // A flipped weight byte: signature fine, digest not.
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let err = Package::from_bytes(flipped, "p")
            .unwrap()
            .verify(&[key.verifying_key()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("digest"), "{err}");
        // A flipped manifest byte: signature fails.
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(
            Package::from_bytes(flipped, "p")
                .unwrap()
                .verify(&[key.verifying_key()])
                .is_err()
        );
        // Truncated.
        let err = Package::from_bytes(bytes[..bytes.len() - 3].to_vec(), "p")
            .unwrap()
            .verify(&[key.verifying_key()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        assert!(Package::from_bytes(bytes[..40].to_vec(), "p").is_err());
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key().unwrap();
        let (secret, public) = write_key_pair(dir.path(), "fleet", &key).unwrap();
        assert_eq!(
            read_signing_key(&secret).unwrap().to_bytes(),
            key.to_bytes()
        );
        let pubkey = parse_public_key(&std::fs::read_to_string(public).unwrap()).unwrap();
        assert_eq!(pubkey, key.verifying_key());
        assert!(write_key_pair(dir.path(), "fleet", &key).is_err());
        assert!(parse_public_key("abc").is_err());
    }
}
