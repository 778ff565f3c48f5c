//! `trainer compress`: structured channel pruning of the Swin MLPs to a FLOPs target, and INT8
//! weights with a per-layer sensitivity scan. One file because the three pruning kinds (MLP
//! channels, neck and head channels, attention heads) share the tensor surgery below.
//!
//! Pruning removes hidden channels of every block's MLP (fc1 output columns, fc1 bias entries,
//! fc2 input rows): the result is a smaller network whose config records the per-block widths
//! (`backbone.mlp_hidden`), not a mask. Importance of hidden channel j of a block:
//! `||fc1[:, j]||_2 * ||fc2[j, :]||_2`, the largest gain with which j can move the block's output
//! (GELU is 1-Lipschitz), a data-free criterion that needs no gradient pass; recovery
//! fine-tuning (`trainer finetune --init pruned.safetensors`) closes the gap. The MLPs hold about
//! two thirds of the backbone's multiply-adds.
//!
//! Attention-head pruning (`prune_attention`) removes whole heads of each block: their q, k, v
//! columns, output-projection rows and relative-position bias column (see the function).
//!
//! Head pruning (`prune_head`) removes channels of the neck and the detection head, which hold
//! about a third of a pruned edge model's multiply-adds: pyramid and neck channels, and the
//! towers' channels in whole GroupNorm groups (see the function for the criterion).
//!
//! INT8: every Linear and convolution weight (`edge_detector::quant`), except the layers the
//! sensitivity scan finds costly: each candidate is quantized alone and the detector's outputs on
//! calibration images are compared with the FP32 outputs (relative L2 error of the class logits
//! and box distances); layers above the threshold stay F32.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use edge_detector::quant::{self, channel_axis, dequantize_weights, f32_values, quantize_weights};
use edge_detector::{CONFIG_KEY, Detector, DetectorConfig, PRUNING_KEY};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::data::{self, voc::Sample};

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A model file as named F32 tensors plus its header metadata.
struct ModelFile {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: std::collections::HashMap<String, String>,
}

impl ModelFile {
    fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).with_context(|| format!("{origin}: header"))?;
        let st = SafeTensors::deserialize(bytes).with_context(|| format!("{origin}: tensors"))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                bail!(
                    "{origin}: `{name}` is {:?}; compress an FP32 model (prune before quantizing)",
                    view.dtype()
                );
            }
            tensors.insert(name, (view.shape().to_vec(), f32_values(view.data())));
        }
        Ok(Self {
            tensors,
            metadata: header.metadata().clone().unwrap_or_default(),
        })
    }

    fn config(&self) -> Result<DetectorConfig> {
        let json = self
            .metadata
            .get(CONFIG_KEY)
            .context("no detector config in the header: not a detector model file")?;
        Ok(serde_json::from_str(json)?)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let owned: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, (s, v))| (n.clone(), s.clone(), bytes_of(v)))
            .collect();
        let views = owned
            .iter()
            .map(|(n, s, d)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), d)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(safetensors::serialize(views, Some(self.metadata.clone()))?)
    }
}

/// What pruning did, recorded in the package manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    pub method: String,
    pub mlp_keep_fraction: f64,
    pub mlp_hidden: Vec<Vec<usize>>,
    pub macs_before: u64,
    pub macs_after: u64,
    pub params_before: usize,
    pub params_after: usize,
}

/// Widths when each block keeps `keep` of its hidden channels (multiples of 8, at least 8).
fn widths(config: &DetectorConfig, keep: f64) -> Vec<Vec<usize>> {
    let b = &config.backbone;
    b.depths
        .iter()
        .enumerate()
        .map(|(stage, &depth)| {
            (0..depth)
                .map(|block| {
                    let full = b.mlp_hidden_of(stage, block);
                    (((full as f64 * keep) / 8.0).round() as usize * 8).clamp(8, full)
                })
                .collect()
        })
        .collect()
}

/// Prunes MLP hidden channels uniformly across blocks so that the detector's multiply-adds are at
/// most `flops_ratio` of the original's.
pub fn prune(bytes: &[u8], origin: &str, flops_ratio: f64) -> Result<(Vec<u8>, PruneReport)> {
    if !(0.0..1.0).contains(&flops_ratio) || flops_ratio <= 0.0 {
        bail!("--flops {flops_ratio}: give the FLOPs to keep as a fraction in (0, 1)");
    }
    let config = ModelFile::parse(bytes, origin)?.config()?;
    let macs_before = config.macs();
    let macs_at = |keep: f64| {
        let mut c = config.clone();
        c.backbone.mlp_hidden = widths(&config, keep);
        c.macs()
    };
    let floor = macs_at(0.0) as f64 / macs_before as f64;
    if floor > flops_ratio {
        bail!(
            "--flops {flops_ratio}: pruning MLP channels alone reaches {floor:.2} at most for this model"
        );
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if (macs_at(mid) as f64) <= flops_ratio * macs_before as f64 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    prune_keep(bytes, origin, lo)
}

/// Keeps the `keep` fraction of each block's MLP hidden channels (rounded to multiples of 8),
/// the most important ones.
pub fn prune_keep(bytes: &[u8], origin: &str, keep: f64) -> Result<(Vec<u8>, PruneReport)> {
    let mut file = ModelFile::parse(bytes, origin)?;
    let mut config = file.config()?;
    let macs_before = config.macs();
    let params_before: usize = file.params();
    let new_widths = widths(&config, keep);
    for (stage, blocks) in new_widths.iter().enumerate() {
        for (block, &width) in blocks.iter().enumerate() {
            let prefix = format!("backbone.layers.{stage}.blocks.{block}.mlp");
            let get = |file: &ModelFile, n: &str| {
                file.tensors
                    .get(&format!("{prefix}.{n}"))
                    .cloned()
                    .with_context(|| format!("{origin}: `{prefix}.{n}` missing"))
            };
            let (s1, w1) = get(&file, "fc1.weight")?; // [C, H]
            let (_, b1) = get(&file, "fc1.bias")?; // [H]
            let (s2, w2) = get(&file, "fc2.weight")?; // [H, C]
            let (c, h) = (s1[0], s1[1]);
            if s2 != [h, c] {
                bail!("{origin}: `{prefix}` fc1 {s1:?} and fc2 {s2:?} do not pair");
            }
            let importance: Vec<f64> = (0..h)
                .map(|j| {
                    let a: f64 = (0..c).map(|i| (w1[i * h + j] as f64).powi(2)).sum();
                    let b: f64 = (0..c).map(|i| (w2[j * c + i] as f64).powi(2)).sum();
                    (a * b).sqrt()
                })
                .collect();
            let mut order: Vec<usize> = (0..h).collect();
            order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]));
            let mut kept: Vec<usize> = order[..width].to_vec();
            kept.sort_unstable();
            let w1n: Vec<f32> = (0..c)
                .flat_map(|i| kept.iter().map(move |&j| (i, j)))
                .map(|(i, j)| w1[i * h + j])
                .collect();
            let b1n: Vec<f32> = kept.iter().map(|&j| b1[j]).collect();
            let w2n: Vec<f32> = kept
                .iter()
                .flat_map(|&j| w2[j * c..(j + 1) * c].iter().copied())
                .collect();
            file.tensors
                .insert(format!("{prefix}.fc1.weight"), (vec![c, width], w1n));
            file.tensors
                .insert(format!("{prefix}.fc1.bias"), (vec![width], b1n));
            file.tensors
                .insert(format!("{prefix}.fc2.weight"), (vec![width, c], w2n));
        }
    }
    config.backbone.mlp_hidden = new_widths.clone();
    let report = PruneReport {
        method: "mlp-channels-l2-product".into(),
        mlp_keep_fraction: keep,
        mlp_hidden: new_widths,
        macs_before,
        macs_after: config.macs(),
        params_before,
        params_after: file.params(),
    };
    file.metadata
        .insert(CONFIG_KEY.into(), serde_json::to_string(&config)?);
    let mut record = serde_json::to_value(&report)?;
    file.record_pruning(|previous| {
        // A head or attention heads pruned earlier stay on record.
        for key in ["head", "attention"] {
            if let Some(earlier) = previous.get(key) {
                record[key] = earlier.clone();
            }
        }
        record
    })?;
    Ok((file.to_bytes()?, report))
}

/// What head pruning did, recorded in the package manifest (`pruning.head`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeadPruneReport {
    pub method: String,
    pub keep_fraction: f64,
    /// `[pyramid, neck, tower layer 1, .., tower layer n]`, before and after.
    pub widths_before: Vec<usize>,
    pub widths_after: Vec<usize>,
    pub macs_before: u64,
    pub macs_after: u64,
    pub params_before: usize,
    pub params_after: usize,
}

/// Per output channel of a convolution weight `[out, in, kh, kw]` (with its bias): squared L2
/// norm of everything that channel writes.
fn out_norms(w: &(Vec<usize>, Vec<f32>), bias: Option<&(Vec<usize>, Vec<f32>)>) -> Vec<f64> {
    let (shape, v) = w;
    let per = v.len() / shape[0];
    (0..shape[0])
        .map(|o| {
            let b = bias.map_or(0.0, |(_, b)| (b[o] as f64).powi(2));
            b + v[o * per..(o + 1) * per]
                .iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
        })
        .collect()
}

/// Per input channel of a convolution weight `[out, in, kh, kw]` (per column of a matrix
/// `[rows, cols]`): squared L2 norm of the weights that read it.
fn in_norms(w: &(Vec<usize>, Vec<f32>)) -> Vec<f64> {
    let (shape, v) = w;
    let (outs, ins) = (shape[0], shape[1]);
    let k = v.len() / (outs * ins);
    let mut n = vec![0.0; ins];
    for o in 0..outs {
        for (i, acc) in n.iter_mut().enumerate() {
            let at = (o * ins + i) * k;
            *acc += v[at..at + k]
                .iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>();
        }
    }
    n
}

/// The `count` best entries of `importance`, in their original order.
fn best(importance: &[f64], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..importance.len()).collect();
    order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]));
    let mut kept = order[..count].to_vec();
    kept.sort_unstable();
    kept
}

impl ModelFile {
    fn tensor(&self, name: &str) -> Result<&(Vec<usize>, Vec<f32>)> {
        self.tensors
            .get(name)
            .with_context(|| format!("`{name}` missing from the model file"))
    }

    /// Keeps the output channels `kept` of a convolution (weight rows and bias) or the entries
    /// `kept` of a vector (`name` is the full tensor name).
    fn keep_outputs(&mut self, name: &str, kept: &[usize]) -> Result<()> {
        let (shape, v) = self.tensor(name)?.clone();
        let per = v.len() / shape[0];
        let values = kept
            .iter()
            .flat_map(|&o| v[o * per..(o + 1) * per].iter().copied())
            .collect();
        let mut shape = shape;
        shape[0] = kept.len();
        self.tensors.insert(name.into(), (shape, values));
        Ok(())
    }

    /// Keeps the input channels `kept` of a convolution weight `[out, in, kh, kw]` (of a matrix
    /// `[rows, cols]`: its columns `kept`).
    fn keep_inputs(&mut self, name: &str, kept: &[usize]) -> Result<()> {
        let (shape, v) = self.tensor(name)?.clone();
        let (outs, ins) = (shape[0], shape[1]);
        let k = v.len() / (outs * ins);
        let values = (0..outs)
            .flat_map(|o| kept.iter().map(move |&i| (o * ins + i) * k))
            .flat_map(|at| v[at..at + k].iter().copied())
            .collect();
        let mut shape = shape;
        shape[1] = kept.len();
        self.tensors.insert(name.into(), (shape, values));
        Ok(())
    }

    /// Puts the pruned network's config and this step's record (under `key` of the pruning
    /// record, beside earlier steps') into the header; returns the file's bytes.
    fn finish_pruning(
        mut self,
        config: &DetectorConfig,
        key: &str,
        record: serde_json::Value,
    ) -> Result<Vec<u8>> {
        self.metadata
            .insert(CONFIG_KEY.into(), serde_json::to_string(config)?);
        self.record_pruning(|mut previous| {
            previous[key] = record;
            previous
        })?;
        self.to_bytes()
    }

    fn params(&self) -> usize {
        self.tensors.values().map(|(_, v)| v.len()).sum()
    }

    /// Replaces the pruning record in the header with `update(previous record or {})`.
    fn record_pruning(
        &mut self,
        update: impl FnOnce(serde_json::Value) -> serde_json::Value,
    ) -> Result<()> {
        let previous = self
            .metadata
            .get(PRUNING_KEY)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        self.metadata.insert(
            PRUNING_KEY.into(),
            serde_json::to_string(&update(previous))?,
        );
        Ok(())
    }
}

/// Structured pruning of the neck and head: keeps `keep` of the pyramid channels (lateral
/// outputs = smoothing inputs), of the neck channels (smoothing outputs = the towers' input)
/// and of each tower layer's channels, the last in whole GroupNorm groups.
///
/// Importance, data-free like the MLP criterion: a tower channel's is `|gamma_j| * ||next[:, j]||`
/// (after GroupNorm the channel's signal is `gamma_j` times a unit-variance value, and the next
/// convolution's weights on it bound how far it moves that layer: network slimming's criterion,
/// Liu et al. 2017, with the consumer's weights), summed over the group; a pyramid or neck
/// channel's (no norm there) is `||what writes it|| * ||what reads it||`, over every level. A
/// channel with no weights and no bias scores 0 and goes first.
pub fn prune_head(bytes: &[u8], origin: &str, keep: f64) -> Result<(Vec<u8>, HeadPruneReport)> {
    if !(keep > 0.0 && keep < 1.0) {
        bail!("--head-keep {keep}: give the fraction of head channels to keep, in (0, 1)");
    }
    let mut file = ModelFile::parse(bytes, origin)?;
    let mut config = file.config()?;
    let head = config.head.clone();
    let levels = config.feature_stages.len();
    let towers = head.tower_convs;
    let group = head.group_size();
    let macs_before = config.macs();
    let params_before: usize = file.params();
    let widths_before: Vec<usize> = [head.pyramid_dim(), head.neck_dim()]
        .into_iter()
        .chain((0..towers).map(|i| head.tower_dim(i)))
        .collect();
    let round8 = |w: usize| (((w as f64 * keep) / 8.0).round() as usize * 8).clamp(8.min(w), w);
    let conv_of = |tower: &str, i: usize| {
        if i < towers {
            format!("head.{tower}_tower.{i}.conv")
        } else {
            format!("head.{tower}_out")
        }
    };
    let sum = |a: Vec<f64>, b: Vec<f64>| a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>();

    // Pyramid channels: written by every lateral, read by every smoothing convolution.
    let mut written = vec![0.0; head.pyramid_dim()];
    let mut read = vec![0.0; head.pyramid_dim()];
    for l in 0..levels {
        let w = file.tensor(&format!("head.lateral.{l}.weight"))?;
        let b = file.tensor(&format!("head.lateral.{l}.bias")).ok();
        written = sum(written, out_norms(w, b));
        read = sum(
            read,
            in_norms(file.tensor(&format!("head.smooth.{l}.weight"))?),
        );
    }
    let importance: Vec<f64> = written
        .iter()
        .zip(&read)
        .map(|(w, r)| (w * r).sqrt())
        .collect();
    let kept = best(&importance, round8(head.pyramid_dim()));
    let pyramid = kept.len();
    for l in 0..levels {
        file.keep_outputs(&format!("head.lateral.{l}.weight"), &kept)?;
        file.keep_outputs(&format!("head.lateral.{l}.bias"), &kept)?;
        file.keep_inputs(&format!("head.smooth.{l}.weight"), &kept)?;
    }

    // Neck channels: written by every smoothing convolution, read by both towers' first layer.
    let mut written = vec![0.0; head.neck_dim()];
    for l in 0..levels {
        let w = file.tensor(&format!("head.smooth.{l}.weight"))?;
        let b = file.tensor(&format!("head.smooth.{l}.bias")).ok();
        written = sum(written, out_norms(w, b));
    }
    let mut read = vec![0.0; head.neck_dim()];
    for tower in ["cls", "reg"] {
        read = sum(
            read,
            in_norms(file.tensor(&format!("{}.weight", conv_of(tower, 0)))?),
        );
    }
    let importance: Vec<f64> = written
        .iter()
        .zip(&read)
        .map(|(w, r)| (w * r).sqrt())
        .collect();
    let kept = best(&importance, round8(head.neck_dim()));
    let neck = kept.len();
    for l in 0..levels {
        file.keep_outputs(&format!("head.smooth.{l}.weight"), &kept)?;
        file.keep_outputs(&format!("head.smooth.{l}.bias"), &kept)?;
    }
    for tower in ["cls", "reg"] {
        file.keep_inputs(&format!("{}.weight", conv_of(tower, 0)), &kept)?;
    }

    // Tower layers: whole GroupNorm groups, each tower its own, both to the same width.
    let mut tower_widths = vec![];
    for i in 0..towers {
        let groups = head.tower_dim(i) / group;
        let keep_groups = ((groups as f64 * keep).round() as usize).clamp(1, groups);
        for tower in ["cls", "reg"] {
            let layer = format!("head.{tower}_tower.{i}");
            let gamma = &file.tensor(&format!("{layer}.norm.gamma"))?.1;
            let read = in_norms(file.tensor(&format!("{}.weight", conv_of(tower, i + 1)))?);
            let by_group: Vec<f64> = (0..groups)
                .map(|g| {
                    (g * group..(g + 1) * group)
                        .map(|j| (gamma[j] as f64).abs() * read[j].sqrt())
                        .sum()
                })
                .collect();
            let kept: Vec<usize> = best(&by_group, keep_groups)
                .into_iter()
                .flat_map(|g| g * group..(g + 1) * group)
                .collect();
            for part in ["conv.weight", "conv.bias", "norm.gamma", "norm.beta"] {
                file.keep_outputs(&format!("{layer}.{part}"), &kept)?;
            }
            file.keep_inputs(&format!("{}.weight", conv_of(tower, i + 1)), &kept)?;
        }
        tower_widths.push(keep_groups * group);
    }

    let widths_after: Vec<usize> = [pyramid, neck].into_iter().chain(tower_widths).collect();
    config.head.widths = Some(widths_after.clone());
    config
        .validate()
        .with_context(|| format!("{origin}: the pruned head's config"))?;
    let report = HeadPruneReport {
        method: "head-channels-slimming-l2".into(),
        keep_fraction: keep,
        widths_before,
        widths_after,
        macs_before,
        macs_after: config.macs(),
        params_before,
        params_after: file.params(),
    };
    let bytes = file.finish_pruning(&config, "head", serde_json::to_value(&report)?)?;
    Ok((bytes, report))
}

/// What attention-head pruning did, recorded in the package manifest (`pruning.attention`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttentionPruneReport {
    pub method: String,
    pub keep_fraction: f64,
    /// Heads per block (outer index stage), before and after.
    pub heads_before: Vec<Vec<usize>>,
    pub heads_after: Vec<Vec<usize>>,
    /// Which of its original heads each block kept.
    pub kept: Vec<Vec<Vec<usize>>>,
    pub macs_before: u64,
    pub macs_after: u64,
    pub params_before: usize,
    pub params_after: usize,
}

/// Structured pruning of attention heads: each block keeps `round(keep x heads)` of its heads
/// (at least one), the most important. A head keeps its width, so its q, k and v columns of the
/// qkv projection, its rows of the output projection and its column of the relative-position
/// bias table go together, and the block's config records how many heads it has
/// (`backbone.attn_heads`).
///
/// Importance of head h, data-free like the MLP criterion: `||W_v[:, h]|| * ||W_proj[h, :]||`.
/// Attention weights are a convex combination (softmax rows sum to 1), so whatever q and k do,
/// head h moves the block's output by at most that product times the input's norm: it bounds
/// the head's contribution the way `||fc1[:, j]|| * ||fc2[j, :]||` bounds an MLP channel's
/// (a weight-magnitude criterion in the spirit of Michel et al. 2019's head pruning, without
/// their gradient pass). A head whose value or output weights are all zero scores 0 and goes
/// first.
pub fn prune_attention(
    bytes: &[u8],
    origin: &str,
    keep: f64,
) -> Result<(Vec<u8>, AttentionPruneReport)> {
    if !(keep > 0.0 && keep < 1.0) {
        bail!("--attn-keep {keep}: give the fraction of attention heads to keep, in (0, 1)");
    }
    let mut file = ModelFile::parse(bytes, origin)?;
    let mut config = file.config()?;
    let backbone = config.backbone.clone();
    let macs_before = config.macs();
    let params_before: usize = file.params();
    let mut heads_before = vec![];
    let mut heads_after = vec![];
    let mut kept_all = vec![];
    for (stage, &depth) in backbone.depths.iter().enumerate() {
        let hd = backbone.head_dim(stage);
        let (mut before, mut after, mut kept_stage) = (vec![], vec![], vec![]);
        for block in 0..depth {
            let heads = backbone.heads_of(stage, block);
            let target = ((heads as f64 * keep).round() as usize).clamp(1, heads);
            let prefix = format!("backbone.layers.{stage}.blocks.{block}.attn");
            let inner = heads * hd;
            let qkv = file.tensor(&format!("{prefix}.qkv.weight"))?; // [C, 3 * inner]
            let proj = file.tensor(&format!("{prefix}.proj.weight"))?; // [inner, C]
            if qkv.0 != [proj.0[1], 3 * inner] || proj.0[0] != inner {
                bail!(
                    "{origin}: `{prefix}`: qkv {:?} and proj {:?} do not fit {heads} heads of {hd}",
                    qkv.0,
                    proj.0
                );
            }
            let column_norms = in_norms(qkv); // per qkv output column
            let row_norms = out_norms(proj, None); // per proj input row
            let importance: Vec<f64> = (0..heads)
                .map(|h| {
                    let v: f64 = column_norms[2 * inner + h * hd..][..hd].iter().sum();
                    let p: f64 = row_norms[h * hd..][..hd].iter().sum();
                    (v * p).sqrt()
                })
                .collect();
            let kept = best(&importance, target);
            // Columns of q, k and v of the kept heads, in timm's (3, heads, head_dim) layout.
            let columns: Vec<usize> = (0..3)
                .flat_map(|part| kept.iter().map(move |&h| part * inner + h * hd))
                .flat_map(|start| start..start + hd)
                .collect();
            let rows: Vec<usize> = kept.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
            file.keep_inputs(&format!("{prefix}.qkv.weight"), &columns)?;
            file.keep_outputs(&format!("{prefix}.qkv.bias"), &columns)?;
            file.keep_outputs(&format!("{prefix}.proj.weight"), &rows)?;
            file.keep_inputs(&format!("{prefix}.relative_position_bias_table"), &kept)?;
            before.push(heads);
            after.push(kept.len());
            kept_stage.push(kept);
        }
        heads_before.push(before);
        heads_after.push(after);
        kept_all.push(kept_stage);
    }
    config.backbone.attn_heads = Some(heads_after.clone());
    config
        .validate()
        .with_context(|| format!("{origin}: the pruned attention's config"))?;
    let report = AttentionPruneReport {
        method: "attention-heads-l2-product".into(),
        keep_fraction: keep,
        heads_before,
        heads_after,
        kept: kept_all,
        macs_before,
        macs_after: config.macs(),
        params_before,
        params_after: file.params(),
    };
    let bytes = file.finish_pruning(&config, "attention", serde_json::to_value(&report)?)?;
    Ok((bytes, report))
}

/// One layer's sensitivity: output error with only that layer quantized.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sensitivity {
    pub layer: String,
    pub params: usize,
    pub error: f64,
}

/// Names of the weights INT8 would quantize.
fn quantizable(file: &ModelFile) -> Vec<String> {
    file.tensors
        .iter()
        .filter(|(n, (s, _))| channel_axis(n, s).is_some())
        .map(|(n, _)| n.clone())
        .collect()
}

/// The model with `names` rounded through INT8 (the numbers a quantized file loads as).
fn fake_quantized(file: &ModelFile, names: &[String]) -> ModelFile {
    let mut tensors = file.tensors.clone();
    for name in names {
        let (shape, values) = &file.tensors[name];
        let axis = channel_axis(name, shape).expect("a quantizable weight");
        let (q, scales) = quantize_weights(values, shape, axis);
        let values = dequantize_weights(&q, &scales, shape, axis);
        tensors.insert(name.clone(), (shape.clone(), values));
    }
    ModelFile {
        tensors,
        metadata: file.metadata.clone(),
    }
}

/// Class logits and box distances of a calibration batch, flattened.
fn outputs(detector: &Detector, input: &Tensor<4>) -> Vec<f32> {
    let out = detector.model.forward(input.clone());
    let mut v: Vec<f32> = out.cls_logits.into_data().try_to_vec().unwrap_or_default();
    v.extend(
        out.box_ltrb
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default(),
    );
    v
}

fn relative_error(a: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(reference)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-12)).sqrt()
}

/// What INT8 quantization did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantSummary {
    pub scheme: String,
    pub quantized: usize,
    pub kept_fp32: Vec<String>,
    pub threshold: f64,
    pub error_all_int8: f64,
    pub error_final: f64,
    pub scan: Vec<Sensitivity>,
}

/// INT8 with a sensitivity scan on `calibration` (images from the dataset): layers whose solo
/// output error exceeds `threshold` stay F32. Returns the quantized file.
pub fn quantize(
    bytes: &[u8],
    origin: &str,
    calibration: &[Sample],
    threshold: f64,
    device: &Device,
) -> Result<(Vec<u8>, QuantSummary)> {
    let file = ModelFile::parse(bytes, origin)?;
    let reference = Detector::from_bytes(bytes.to_vec(), origin, device)?;
    let preprocess = &reference.config.preprocess;
    let indices: Vec<usize> = (0..calibration.len()).collect();
    let batch = data::loader::make_batch(
        calibration,
        &indices,
        preprocess,
        None,
        &vec![0; indices.len()],
    )?;
    let [h, w] = preprocess.input_size;
    let input = Tensor::<4>::from_data(
        TensorData::new(batch.pixels, [batch.count, 3, h, w]),
        device,
    );
    let expected = outputs(&reference, &input);
    let error_of = |names: &[String]| -> Result<f64> {
        let variant = fake_quantized(&file, names).to_bytes()?;
        let detector = Detector::from_bytes(variant, origin, device)?;
        Ok(relative_error(&outputs(&detector, &input), &expected))
    };
    let candidates = quantizable(&file);
    let bar = crate::progress::bar(candidates.len() as u64, "sensitivity scan");
    let mut scan = vec![];
    for name in &candidates {
        let error = error_of(std::slice::from_ref(name))?;
        scan.push(Sensitivity {
            layer: name.clone(),
            params: file.tensors[name].1.len(),
            error,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let keep: HashSet<String> = scan
        .iter()
        .filter(|s| s.error > threshold)
        .map(|s| s.layer.clone())
        .collect();
    let chosen: Vec<String> = candidates
        .iter()
        .filter(|n| !keep.contains(*n))
        .cloned()
        .collect();
    let error_all_int8 = error_of(&candidates)?;
    let error_final = error_of(&chosen)?;
    let (out, report) = quant::quantize(bytes, origin, &|n| keep.contains(n))?;
    scan.sort_by(|a, b| b.error.total_cmp(&a.error));
    Ok((
        out,
        QuantSummary {
            scheme: "int8-per-channel".into(),
            quantized: report.quantized.len(),
            kept_fp32: report.kept,
            threshold,
            error_all_int8,
            error_final,
            scan,
        },
    ))
}
