//! Parity with the reference implementation: a fixture folder written by
//! `scripts/fixtures/make_swin_fixture.py` (timm's config, random weights in timm's names, an
//! input and timm's output at every stage) run through our backbone on any device. The tests
//! run it on the CPU; `trainer device-check` runs it on a GPU.

use std::path::Path;

use burn::prelude::*;
use safetensors::SafeTensors;

use crate::{AttentionImpl, SwinConfig};

/// The largest absolute difference to timm at every stage output and the final features, by
/// name (`stage0`.., `final`). An error names what is wrong with the fixture or where our window
/// plan departs from timm's.
pub fn timm_parity(
    dir: &Path,
    device: &Device,
    attention: AttentionImpl,
) -> Result<Vec<(String, f32)>, String> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let cfg: serde_json::Value = serde_json::from_slice(&read("config.json")?)
        .map_err(|e| format!("{}/config.json: {e}", dir.display()))?;
    let list = |k: &str| -> Result<Vec<usize>, String> {
        cfg[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect()
            })
            .ok_or_else(|| format!("config.json: no list `{k}`"))
    };
    let number = |k: &str| -> Result<usize, String> {
        cfg[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("config.json: no number `{k}`"))
    };
    let img = list("img_size")?;
    let config = SwinConfig::new()
        .with_img_size([img[0], img[1]])
        .with_embed_dim(number("embed_dim")?)
        .with_depths(list("depths")?)
        .with_num_heads(list("num_heads")?)
        .with_window_size(number("window_size")?);
    let mut model = config.init(device);
    model.set_attention_impl(attention);

    // The window plan (window and shift per block) must be timm's.
    let plan: Vec<Vec<([usize; 2], [usize; 2])>> = cfg["window_plan"]
        .as_array()
        .ok_or("config.json: no `window_plan`")?
        .iter()
        .map(|stage| {
            stage
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    let v = |i: usize, j: usize| b[i][j].as_u64().unwrap_or(0) as usize;
                    ([v(0, 0), v(0, 1)], [v(1, 0), v(1, 1)])
                })
                .collect()
        })
        .collect();
    if model.window_plan() != plan {
        return Err(format!(
            "window/shift plan {:?} differs from timm's {plan:?}",
            model.window_plan()
        ));
    }
    model
        .load_timm(dir.join("weights.safetensors"))
        .map_err(|e| e.to_string())?;
    let bytes = read("reference.safetensors")?;
    let reference = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let input: Tensor<4> = tensor(&reference, "input", device)?;
    let features = model.forward(input);
    let mut diffs = Vec::new();
    for (i, stage) in features.stages.into_iter().enumerate() {
        let expected: Tensor<4> = tensor(&reference, &format!("stage{i}"), device)?;
        diffs.push((format!("stage{i}"), max_abs_diff(stage, expected)?));
    }
    let expected: Tensor<4> = tensor(&reference, "final", device)?;
    diffs.push((
        "final".into(),
        max_abs_diff(features.last_normed, expected)?,
    ));
    Ok(diffs)
}

fn tensor<const D: usize>(
    file: &SafeTensors,
    key: &str,
    device: &Device,
) -> Result<Tensor<D>, String> {
    let view = file
        .tensor(key)
        .map_err(|e| format!("reference {key}: {e}"))?;
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let shape: [usize; D] = view.shape().try_into().map_err(|_| {
        format!(
            "reference {key}: rank {} instead of {D}",
            view.shape().len()
        )
    })?;
    Ok(Tensor::from_data(TensorData::new(values, shape), device))
}

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Result<f32, String> {
    if a.dims() != b.dims() {
        return Err(format!(
            "shape {:?} against timm's {:?}",
            a.dims(),
            b.dims()
        ));
    }
    Ok((a - b).abs().max().into_scalar::<f32>())
}
