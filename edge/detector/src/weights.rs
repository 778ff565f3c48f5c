//! Reading and writing weights: our own self-describing model files (SafeTensors with the
//! detector config in the header) and timm Swin checkpoints. Every failure names the file and
//! the tensor: missing keys, shape mismatches, non-finite values.

use std::path::Path;

use burn::prelude::*;
use burn::store::{ApplyResult, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use safetensors::{Dtype, SafeTensors};

use super::swin::SwinTransformer;
use super::{Detector, DetectorConfig, DetectorError};

/// Header key under which a model file stores its `DetectorConfig` as JSON.
pub const CONFIG_KEY: &str = "detector_config";
/// Header key of the pruning report (`trainer compress --flops`), JSON.
pub const PRUNING_KEY: &str = "pruning";

fn bad(path: &str, reason: impl Into<String>) -> DetectorError {
    DetectorError::BadWeights {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DetectorError> {
    std::fs::read(path).map_err(|source| DetectorError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Refuses a file holding NaN or infinite weights, naming the first such tensor.
fn check_finite(bytes: &[u8], origin: &str) -> Result<(), DetectorError> {
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
    for (name, view) in tensors.tensors() {
        let data = view.data();
        let bad_value = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .find(|v| !v.is_finite()),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .find(|v| !v.is_finite()),
            _ => None,
        };
        if let Some(v) = bad_value {
            return Err(bad(origin, format!("tensor `{name}` contains {v}")));
        }
    }
    Ok(())
}

/// Exponent bits all set means inf or NaN; the value returned only needs to say which.
fn half_to_f32(bits: u16) -> f32 {
    if bits & 0x7c00 == 0x7c00 {
        if bits & 0x03ff == 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else {
        0.0
    }
}

/// Turns an apply result into an error naming what did not fit.
fn check_applied(result: &ApplyResult, origin: &str) -> Result<(), DetectorError> {
    if let Some(error) = result.errors.first() {
        return Err(bad(origin, error.to_string()));
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result
            .missing
            .iter()
            .take(8)
            .map(|(p, _)| p.as_str())
            .collect();
        return Err(bad(
            origin,
            format!(
                "{} tensor(s) missing: {}{}",
                result.missing.len(),
                names.join(", "),
                if result.missing.len() > 8 {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(())
}

impl SwinTransformer {
    /// Loads a timm `SwinTransformer` state_dict saved as SafeTensors (timm key names; extra
    /// keys such as the classifier `head.*` are ignored).
    pub fn load_timm(&mut self, path: impl AsRef<Path>) -> Result<(), DetectorError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let bytes = read(path)?;
        self.load_timm_bytes(bytes, &origin)
    }

    pub fn load_timm_bytes(&mut self, bytes: Vec<u8>, origin: &str) -> Result<(), DetectorError> {
        check_finite(&bytes, origin)?;
        let bytes = self.resize_position_tables(bytes, origin)?;
        let mut store = SafetensorsStore::from_bytes(Some(bytes))
            .with_from_adapter(PyTorchToBurnAdapter)
            .allow_partial(true)
            .validate(false);
        let result = self
            .load_from(&mut store)
            .map_err(|e| bad(origin, e.to_string()))?;
        check_applied(&result, origin)
    }
}

impl SwinTransformer {
    /// A backbone trained at another input size has other window sizes where a stage was no
    /// larger than the window (SimCLR at 112 px: the last stage is 4x4, one 4x4 window, so its
    /// relative-position tables are 7x7 instead of 13x13). Like timm, resize such tables to this
    /// model's windows, bicubic per head, so the checkpoint loads.
    fn resize_position_tables(
        &self,
        bytes: Vec<u8>,
        origin: &str,
    ) -> Result<Vec<u8>, DetectorError> {
        use burn::tensor::module::interpolate;
        use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
        let mut resized: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
        for (s, stage) in self.layers.iter().enumerate() {
            for (b, block) in stage.blocks.iter().enumerate() {
                let name = format!("layers.{s}.blocks.{b}.attn.relative_position_bias_table");
                let Ok(view) = tensors.tensor(&name) else {
                    continue;
                };
                let [len, heads] = block.attn.relative_position_bias_table.dims();
                let shape = view.shape();
                if view.dtype() != Dtype::F32 || shape.len() != 2 || shape == [len, heads] {
                    continue;
                }
                let (from, to) = (shape[0].isqrt(), len.isqrt());
                if shape[1] != heads || from * from != shape[0] || to * to != len {
                    return Err(bad(
                        origin,
                        format!("`{name}`: {shape:?} cannot be resized to [{len}, {heads}]"),
                    ));
                }
                let device = block.attn.relative_position_bias_table.val().device();
                let values = super::quant::f32_values(view.data());
                let table =
                    Tensor::<2>::from_data(TensorData::new(values, [from * from, heads]), &device)
                        .reshape([1, from, from, heads])
                        .permute([0, 3, 1, 2]); // [1, heads, from, from]
                let options = InterpolateOptions {
                    mode: InterpolateMode::Bicubic,
                    align_corners: false,
                    output_size: Some([to, to]),
                    scale_factor: None,
                };
                let table = interpolate(table, options)
                    .permute([0, 2, 3, 1])
                    .reshape([to * to, heads]);
                let data: Vec<u8> = table
                    .into_data()
                    .try_to_vec::<f32>()
                    .map_err(|e| bad(origin, format!("`{name}`: {e:?}")))?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                tracing::info!(
                    "{origin}: `{name}` resized from {from}x{from} to {to}x{to} offsets"
                );
                resized.push((name, vec![to * to, heads], data));
            }
        }
        if resized.is_empty() {
            return Ok(bytes);
        }
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
        let mut views = vec![];
        for (name, view) in tensors.tensors() {
            if resized.iter().any(|(n, _, _)| *n == name) {
                continue;
            }
            views.push((name, view));
        }
        for (name, shape, data) in &resized {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| bad(origin, format!("`{name}`: {e}")))?;
            views.push((name.clone(), view));
        }
        safetensors::serialize(views, header.metadata().clone())
            .map_err(|e| bad(origin, format!("rewriting: {e}")))
    }
}

impl Detector {
    /// Writes config and weights into one SafeTensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, DetectorError> {
        let config = serde_json::to_string(&self.config)
            .map_err(|e| DetectorError::InvalidConfig(e.to_string()))?;
        let mut store = SafetensorsStore::from_bytes(None).metadata(CONFIG_KEY, config);
        self.model
            .save_into(&mut store)
            .map_err(|e| bad("<memory>", e.to_string()))?;
        store
            .get_bytes()
            .map_err(|e| bad("<memory>", e.to_string()))
    }

    /// Writes the model file atomically: a crash leaves the old file or the new one, whole.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), DetectorError> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("tmp");
        let io = |source| DetectorError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Loads a model file, or the model inside a package (`.edgepkg`, e.g. the factory model in
    /// edge/models/). The package's signature is not checked here: that is the daemon's job,
    /// against its trusted keys; tools that only run the model locally read the weights.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, DetectorError> {
        Self::load_checked(path, &[], device)
    }

    /// [`Detector::load`], and a package's signature must verify against one of `trusted`
    /// (an empty list checks the weights' digest only). Plain SafeTensors files carry no
    /// signature and load as they are.
    pub fn load_checked(
        path: impl AsRef<Path>,
        trusted: &[protocol::VerifyingKey],
        device: &Device,
    ) -> Result<Self, DetectorError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let mut bytes = read(path)?;
        if bytes.starts_with(protocol::package::MAGIC) {
            bytes = package_weights(bytes, &origin, trusted)?;
        }
        Self::from_bytes(bytes, &origin, device)
    }

    /// Reads a model file produced by [`Detector::to_bytes`]; `origin` names it in errors.
    pub fn from_bytes(
        bytes: Vec<u8>,
        origin: &str,
        device: &Device,
    ) -> Result<Self, DetectorError> {
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CONFIG_KEY))
            .ok_or_else(|| {
                bad(
                    origin,
                    format!("no `{CONFIG_KEY}` in the header: not a detector model file"),
                )
            })?;
        let config: DetectorConfig =
            serde_json::from_str(json).map_err(|e| bad(origin, format!("`{CONFIG_KEY}`: {e}")))?;
        let (bytes, int8) = super::quant::dequantize(bytes, origin)?;
        check_finite(&bytes, origin)?;
        let mut detector = Detector::new(config, device)?;
        let mut store = SafetensorsStore::from_bytes(Some(bytes))
            .allow_partial(true)
            .validate(false);
        let result = detector
            .model
            .load_from(&mut store)
            .map_err(|e| bad(origin, e.to_string()))?;
        check_applied(&result, origin)?;
        // INT8 layers compute in INT8 where the kernel runs (inference on the CPU backend).
        if !int8.is_empty() && !device.is_autodiff() && *device == Device::flex() {
            let int8: std::collections::HashSet<String> = int8.into_iter().collect();
            let model = &mut detector.model;
            model
                .backbone
                .use_int8(&|name| int8.contains(&format!("backbone.{name}")));
            model
                .head
                .use_int8(&|name| int8.contains(&format!("head.{name}")));
        }
        Ok(detector)
    }
}

/// The project's release key: the factory model in `edge/models/` is signed with it, and local
/// tools trust it by default.
pub const FACTORY_KEY_HEX: &str = include_str!("../../models/release.pub");

/// The weights of a package file, their SHA-256 checked against the manifest always, the
/// signature against `trusted` when it is not empty.
fn package_weights(
    bytes: Vec<u8>,
    origin: &str,
    trusted: &[protocol::VerifyingKey],
) -> Result<Vec<u8>, DetectorError> {
    let package = protocol::package::Package::from_bytes(bytes, origin)
        .map_err(|e| bad(origin, e.to_string()))?;
    if trusted.is_empty() {
        let manifest = protocol::Manifest::from_json(&package.manifest_bytes)
            .map_err(|e| bad(origin, e.to_string()))?;
        protocol::package::check_weights(&manifest, &package.weights)
            .map_err(|e| bad(origin, format!("corrupt package: {e}")))?;
    } else {
        package
            .verify(trusted)
            .map_err(|e| bad(origin, format!("package refused: {e}")))?;
    }
    Ok(package.weights)
}
