//! INT8 weights in model files: symmetric, one scale per output channel.
//!
//! A quantized model file is an ordinary model file in which the weight of each chosen Linear
//! (burn layout `[in, out]`: one scale per column) and convolution (`[out, in, kh, kw]`: one
//! scale per filter) is stored as I8 with its scales beside it as F32 (`<name>` + [`SCALE`]).
//! Biases, norms, position tables and the layers a sensitivity scan keeps are left in F32.
//! Loading turns the I8 tensors back into F32 ([`dequantize`]), so a quantized model runs on every
//! backend; the bytes on disk and on the wire are what shrink by ~4x. The header records what was
//! quantized under [`QUANT_KEY`].

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::DetectorError;

/// Suffix of the per-channel scale tensor stored beside an I8 weight.
pub const SCALE: &str = ".int8_scale";
/// Header key: the quantization applied ("int8-per-channel").
pub const QUANT_KEY: &str = "quantization";
/// Weights with fewer elements stay F32 (the scales would cost more than they save).
const MIN_ELEMENTS: usize = 1024;

fn bad(origin: &str, reason: impl Into<String>) -> DetectorError {
    DetectorError::BadWeights {
        path: origin.to_string(),
        reason: reason.into(),
    }
}

/// What [`quantize`] did.
#[derive(Debug, Default, Clone)]
pub struct QuantReport {
    pub quantized: Vec<String>,
    /// Weights that could have been quantized but were kept in F32 on request.
    pub kept: Vec<String>,
}

/// Output-channel axis of a weight worth quantizing (named `*.weight`, 2-D Linear or 4-D conv,
/// at least [`MIN_ELEMENTS`]), or None.
pub fn channel_axis(name: &str, shape: &[usize]) -> Option<usize> {
    if !name.ends_with(".weight") || shape.iter().product::<usize>() < MIN_ELEMENTS {
        return None;
    }
    match shape.len() {
        2 => Some(1),
        4 => Some(0),
        _ => None,
    }
}

/// Little-endian F32 tensor bytes as values.
pub fn f32_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Index of the channel each element belongs to, for a row-major tensor.
fn channel_of(shape: &[usize], axis: usize) -> impl Fn(usize) -> usize + use<> {
    let inner: usize = shape[axis + 1..].iter().product();
    let channels = shape[axis];
    move |i| (i / inner) % channels
}

/// Symmetric per-channel INT8: scale = max|w| / 127 per output channel, q = round(w / scale).
pub fn quantize_weights(values: &[f32], shape: &[usize], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let channel = channel_of(shape, axis);
    let mut max = vec![0f32; shape[axis]];
    for (i, v) in values.iter().enumerate() {
        let c = channel(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scales)
}

/// `q x scale` of each element's channel: the F32 weights a quantized file loads as.
pub fn dequantize_weights(q: &[i8], scales: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
    let channel = channel_of(shape, axis);
    q.iter()
        .enumerate()
        .map(|(i, v)| *v as f32 * scales[channel(i)])
        .collect()
}

/// Quantizes every eligible weight of a model file except those `keep_fp32` names.
pub fn quantize(
    bytes: &[u8],
    origin: &str,
    keep_fp32: &dyn Fn(&str) -> bool,
) -> Result<(Vec<u8>, QuantReport), DetectorError> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
    let mut report = QuantReport::default();
    // Owned buffers first, views over them after.
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (name, view) in tensors.tensors() {
        let shape = view.shape().to_vec();
        match (view.dtype(), channel_axis(&name, &shape)) {
            (Dtype::I8, _) => {
                return Err(bad(origin, format!("`{name}` is already INT8")));
            }
            (Dtype::F32, Some(_)) if keep_fp32(&name) => {
                report.kept.push(name.clone());
                owned.push((name, Dtype::F32, shape, view.data().to_vec()));
            }
            (Dtype::F32, Some(axis)) => {
                let (q, scales) = quantize_weights(&f32_values(view.data()), &shape, axis);
                let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                owned.push((
                    format!("{name}{SCALE}"),
                    Dtype::F32,
                    vec![scales.len()],
                    scale_bytes,
                ));
                owned.push((
                    name.clone(),
                    Dtype::I8,
                    shape,
                    q.iter().map(|v| *v as u8).collect(),
                ));
                report.quantized.push(name);
            }
            (dtype, _) => owned.push((name, dtype, shape, view.data().to_vec())),
        }
    }
    let mut metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    metadata.insert(QUANT_KEY.into(), "int8-per-channel".into());
    let views = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(origin, format!("`{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out = safetensors::serialize(views, Some(metadata))
        .map_err(|e| bad(origin, format!("writing: {e}")))?;
    Ok((out, report))
}

/// The quantization a model file records ("none" when it has none).
pub fn quantization_of(bytes: &[u8]) -> String {
    SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, h)| h.metadata().as_ref()?.get(QUANT_KEY).cloned())
        .unwrap_or_else(|| "none".into())
}

/// Turns I8 weights back into F32 (scale x q); a file without I8 tensors is returned as is.
/// Also returns the names of the tensors that were I8.
pub fn dequantize(bytes: Vec<u8>, origin: &str) -> Result<(Vec<u8>, Vec<String>), DetectorError> {
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
    if !tensors
        .tensors()
        .iter()
        .any(|(_, v)| v.dtype() == Dtype::I8)
    {
        return Ok((bytes, vec![]));
    }
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(origin, format!("not a SafeTensors file: {e}")))?;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    let mut int8 = vec![];
    for (name, view) in tensors.tensors() {
        let shape = view.shape().to_vec();
        match view.dtype() {
            Dtype::I8 => {
                let axis = channel_axis(&name, &shape).ok_or_else(|| {
                    bad(
                        origin,
                        format!("`{name}`: INT8 tensor of shape {shape:?} is not a weight"),
                    )
                })?;
                let scale_name = format!("{name}{SCALE}");
                let scales = tensors.tensor(&scale_name).map_err(|_| {
                    bad(
                        origin,
                        format!("`{name}` is INT8 but `{scale_name}` is missing"),
                    )
                })?;
                if scales.dtype() != Dtype::F32 || scales.shape() != [shape[axis]] {
                    return Err(bad(
                        origin,
                        format!(
                            "`{scale_name}`: expected F32 [{}], found {:?} {:?}",
                            shape[axis],
                            scales.dtype(),
                            scales.shape()
                        ),
                    ));
                }
                let scales = f32_values(scales.data());
                if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
                    return Err(bad(origin, format!("`{scale_name}` holds the scale {s}")));
                }
                let q: Vec<i8> = view.data().iter().map(|b| *b as i8).collect();
                let data: Vec<u8> = dequantize_weights(&q, &scales, &shape, axis)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                int8.push(name.clone());
                owned.push((name, shape, data));
            }
            Dtype::F32 if name.ends_with(SCALE) => {}
            Dtype::F32 => owned.push((name, shape, view.data().to_vec())),
            other => {
                return Err(bad(
                    origin,
                    format!("`{name}`: unsupported element type {other:?}"),
                ));
            }
        }
    }
    let views = owned
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(origin, format!("`{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, header.metadata().clone())
        .map_err(|e| bad(origin, format!("rewriting: {e}")))?;
    Ok((bytes, int8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_round_trip_is_within_half_a_step() {
        // [in = 3, out = 2]: channel = column.
        let w = [0.5f32, -2.0, -0.25, 1.0, 0.127, 0.0];
        let (q, s) = quantize_weights(&w, &[3, 2], 1);
        assert_eq!(s, vec![0.5 / 127.0, 2.0 / 127.0]);
        assert_eq!(q[0], 127);
        assert_eq!(q[1], -127);
        for (i, (v, q)) in w.iter().zip(&q).enumerate() {
            assert!((*q as f32 * s[i % 2] - v).abs() <= s[i % 2] / 2.0 + 1e-7);
        }
        // [out = 2, in = 1, 1, 2]: channel = first axis.
        let (_, s) = quantize_weights(&[1.0, -3.0, 0.5, 0.25], &[2, 1, 1, 2], 0);
        assert_eq!(s, vec![3.0 / 127.0, 0.5 / 127.0]);
    }
}
