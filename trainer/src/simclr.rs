//! SimCLR self-supervised pretraining of the Swin backbone (Chen et al. 2020): two strongly
//! augmented views of each unlabeled image, backbone + projection MLP, NT-Xent loss with a
//! temperature. Labels are never read. Each epoch ends with a label-free-training check of the
//! representation: kNN accuracy of the backbone's pooled features on the image-level classes
//! from NEU file names, validation split against training split.
//!
//! The backbone is written in timm's names (`backbone.safetensors`), so `finetune --init`
//! loads it like any timm Swin checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::nn::{Linear, LinearConfig};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::activation::{log_softmax, relu};
use edge_detector::{NEU_CLASSES, Preprocess, SwinConfig, SwinTransformer};
use serde::{Deserialize, Serialize};

use crate::data::augment::AugmentConfig;
use crate::data::loader::{epoch_order, make_batch};
use crate::data::{self, Sample, voc};
use crate::precision::{Precision, to_f32};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub data: PathBuf,
    /// `data` is a flat folder of images rather than a VOC folder (`data/images`).
    pub flat: bool,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f32,
    pub temperature: f64,
    pub projection_dim: usize,
    pub input_size: usize,
    pub seed: u64,
    pub split_seed: u64,
    pub val_fraction: f64,
    /// Neighbours in the kNN check.
    pub knn_k: usize,
    pub max_steps: Option<usize>,
    pub backbone: SwinConfig,
    pub augment: AugmentConfig,
    /// Compute dtype of a training step (mixed precision); weights stay f32.
    #[serde(default)]
    pub precision: Precision,
}

impl PretrainConfig {
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            flat: false,
            epochs: 100,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.05,
            temperature: 0.2,
            projection_dim: 128,
            input_size: 224,
            seed: 0,
            split_seed: 42,
            val_fraction: 0.2,
            knn_k: 10,
            max_steps: None,
            backbone: SwinConfig::edge(),
            augment: Self::views(),
            precision: Precision::F32,
        }
    }

    /// SimCLR's strong views, minus colour (grey data): large crops, flips, rotations,
    /// brightness/contrast/gamma, blur, noise.
    pub fn views() -> AugmentConfig {
        AugmentConfig {
            hflip: 0.5,
            vflip: 0.5,
            rot90: 0.5,
            crop: 1.0,
            crop_min_area: 0.2,
            crop_min_box_visibility: 0.0,
            brightness: 0.4,
            contrast: 0.4,
            gamma: 0.3,
            noise: 0.3,
            noise_std: 8.0,
            blur: 0.5,
            blur_sigma: 1.5,
            ..AugmentConfig::none()
        }
    }
}

/// Backbone plus the projection MLP used only during pretraining.
#[derive(Module, Debug)]
pub struct SimclrModel {
    pub backbone: SwinTransformer,
    pub proj1: Linear,
    pub proj2: Linear,
}

impl SimclrModel {
    pub fn new(config: &PretrainConfig, device: &Device) -> Self {
        let backbone = config
            .backbone
            .clone()
            .with_img_size([config.input_size, config.input_size])
            .init(device);
        let dim = *config
            .backbone
            .stage_dims()
            .last()
            .unwrap_or(&config.backbone.embed_dim);
        Self {
            backbone,
            proj1: LinearConfig::new(dim, 2 * dim).init(device),
            proj2: LinearConfig::new(2 * dim, config.projection_dim).init(device),
        }
    }

    /// Pooled backbone features `[B, C]` (what downstream tasks and the kNN check use).
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        pooled(&self.backbone, images)
    }

    /// Projection `[B, projection_dim]` the loss is computed on.
    pub fn project(&self, features: Tensor<2>) -> Tensor<2> {
        self.proj2.forward(relu(self.proj1.forward(features)))
    }
}

/// Global average of the normed last stage: `[B, C]`.
pub fn pooled(backbone: &SwinTransformer, images: Tensor<4>) -> Tensor<2> {
    let x = backbone.forward(images).last_normed; // [B, H, W, C]
    let [b, h, w, c] = x.dims();
    x.reshape([b, h * w, c]).mean_dim(1).reshape([b, c])
}

/// NT-Xent (normalised temperature-scaled cross entropy) for two views `[N, D]`: each of the
/// 2N embeddings must pick its partner among the 2N - 1 others.
pub fn nt_xent(z1: Tensor<2>, z2: Tensor<2>, temperature: f64) -> Tensor<1> {
    let [n, _] = z1.dims();
    let device = z1.device();
    let z = Tensor::cat(vec![z1, z2], 0); // [2N, D]
    let norm = z.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-8); // [2N, 1]
    let z = z / norm;
    let sim = z.clone().matmul(z.transpose()) / temperature; // [2N, 2N]
    let mut self_mask = vec![0f32; 4 * n * n];
    for i in 0..2 * n {
        self_mask[i * 2 * n + i] = -1e9;
    }
    let sim = sim + Tensor::<2>::from_data(TensorData::new(self_mask, [2 * n, 2 * n]), &device);
    let log_prob = log_softmax(sim, 1);
    let partners: Vec<i64> = (0..2 * n).map(|i| ((i + n) % (2 * n)) as i64).collect();
    let partners = Tensor::<2, Int>::from_data(TensorData::new(partners, [2 * n, 1]), &device);
    log_prob.gather(1, partners).mean().neg()
}

/// Cosine kNN classification accuracy (similarity-weighted votes) of `query` against `bank`.
pub fn knn_accuracy(
    bank: &[Vec<f32>],
    bank_labels: &[usize],
    query: &[Vec<f32>],
    query_labels: &[usize],
    k: usize,
) -> f64 {
    let normalise = |v: &Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let bank: Vec<Vec<f32>> = bank.iter().map(normalise).collect();
    let classes = bank_labels
        .iter()
        .chain(query_labels)
        .max()
        .map_or(0, |m| m + 1);
    let mut correct = 0;
    for (q, &label) in query.iter().map(normalise).zip(query_labels) {
        let mut sims: Vec<(f32, usize)> = bank
            .iter()
            .zip(bank_labels)
            .map(|(b, &l)| (b.iter().zip(&q).map(|(x, y)| x * y).sum(), l))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = vec![0f32; classes];
        for &(s, l) in sims.iter().take(k) {
            votes[l] += (s / 0.07).exp();
        }
        let predicted = votes
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        if predicted == Some(label) {
            correct += 1;
        }
    }
    correct as f64 / query.len().max(1) as f64
}

fn embed(
    backbone: &SwinTransformer,
    samples: &[Sample],
    preprocess: &Preprocess,
    device: &Device,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let [h, w] = preprocess.input_size;
    let mut out = Vec::with_capacity(samples.len());
    let indices: Vec<usize> = (0..samples.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = make_batch(samples, chunk, preprocess, None, &vec![0; chunk.len()])?;
        let input = Tensor::<4>::from_data(
            TensorData::new(batch.pixels, [batch.count, 3, h, w]),
            device,
        );
        let f = pooled(backbone, input);
        let [b, c] = f.dims();
        let values = f.into_data().try_into_vec_as::<f32>().unwrap_or_default();
        out.extend((0..b).map(|i| values[i * c..(i + 1) * c].to_vec()));
    }
    Ok(out)
}

/// kNN accuracy of the backbone's features on NEU's file-name classes, validation against train;
/// with the number of validation images it was measured on and of classes among them.
pub fn representation_check(
    backbone: &SwinTransformer,
    train: &[Sample],
    val: &[Sample],
    classes: &[String],
    preprocess: &Preprocess,
    device: &Device,
    k: usize,
) -> Result<Option<(f64, usize, usize)>> {
    let labelled = |s: &[Sample]| -> (Vec<Sample>, Vec<usize>) {
        s.iter()
            .filter_map(|x| x.name_class(classes).map(|c| (x.clone(), c)))
            .unzip()
    };
    let (train, train_labels) = labelled(train);
    let (val, val_labels) = labelled(val);
    if train.is_empty() || val.is_empty() {
        return Ok(None);
    }
    let bank = embed(backbone, &train, preprocess, device, 16)?;
    let query = embed(backbone, &val, preprocess, device, 16)?;
    let mut present = val_labels.clone();
    present.sort_unstable();
    present.dedup();
    Ok(Some((
        knn_accuracy(&bank, &train_labels, &query, &val_labels, k),
        val.len(),
        present.len(),
    )))
}

/// Writes the backbone in timm's tensor names.
pub fn save_backbone_timm(backbone: &SwinTransformer, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .metadata("producer", "trainer pretrain (SimCLR)");
    backbone
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PretrainState {
    pub epoch: usize,
    pub step: usize,
    pub knn: Vec<(usize, f64)>,
    /// Validation images (with a class in their file name) the kNN accuracy is measured on.
    #[serde(default)]
    pub knn_images: usize,
    /// Classes among them.
    #[serde(default)]
    pub knn_classes: usize,
}

impl PretrainState {
    /// What the kNN accuracies can say at their sample size: first and last accuracy, chance
    /// (one over the classes) and the half-width of a 95% interval around chance, under which a
    /// change is noise. None before two checks.
    pub fn knn_summary(&self) -> Option<String> {
        let (&(_, first), &(_, last)) = (self.knn.first()?, self.knn.last()?);
        if self.knn.len() < 2 || self.knn_images == 0 || self.knn_classes == 0 {
            return None;
        }
        let chance = 1.0 / self.knn_classes as f64;
        let noise = 1.96 * (chance * (1.0 - chance) / self.knn_images as f64).sqrt();
        let verdict = if (last - first).abs() < noise && (last - chance).abs() < noise {
            "within the noise of this sample: this budget shows no representation gain either way"
        } else if last > first {
            "a gain beyond the noise of this sample"
        } else {
            "a loss beyond the noise of this sample"
        };
        Some(format!(
            "kNN accuracy {first:.3} -> {last:.3} on {} validation images ({} classes, chance {chance:.3}; a change under +-{noise:.3} is noise at this size): {verdict}",
            self.knn_images, self.knn_classes
        ))
    }
}

pub struct PretrainOutcome {
    pub state: PretrainState,
    pub stopped: bool,
    pub images_per_second: f64,
}

/// Pretrains in `run_dir`; saves at the end of every epoch and after a Ctrl-C (which stops after
/// the current step); `resume` continues at the step where the run stopped.
pub fn run(
    config: &PretrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    stop: Arc<AtomicBool>,
) -> Result<PretrainOutcome> {
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    let state_path = run_dir.join("state.json");
    if state_path.exists() && !resume {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(run_dir)?;
    let resuming = state_path.exists();
    let (config, mut state) = if resuming {
        (
            serde_json::from_slice::<PretrainConfig>(&std::fs::read(run_dir.join("config.json"))?)?,
            serde_json::from_slice::<PretrainState>(&std::fs::read(&state_path)?)?,
        )
    } else {
        std::fs::write(
            run_dir.join("config.json"),
            serde_json::to_vec_pretty(config)?,
        )?;
        (config.clone(), PretrainState::default())
    };
    // Before loading data: a device without the run's precision fails at once.
    config.precision.check(device)?;
    // Only images are used: boxes and classes in the XML are not read by the loss.
    let dataset = voc::load_images_only(&config.data, config.flat, &classes)
        .with_context(|| format!("reading images under {}", config.data.display()))?;
    let (train, val) = data::split(&dataset, config.val_fraction, config.split_seed);
    let train = Arc::new(train);
    let train_device = device.clone().autodiff();
    train_device.seed(config.seed);
    let mut model = SimclrModel::new(&config, &train_device);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(5.0)))
        .init();
    if resuming {
        model = model.load_file(run_dir.join("model.bpk"));
        optim = optim
            .load(run_dir.join("optim.bpk"))
            .map_err(|e| anyhow::anyhow!("loading optimizer state: {e:?}"))?;
    }
    let preprocess = Preprocess::new().with_input_size([config.input_size, config.input_size]);
    let [h, w] = preprocess.input_size;
    let steps_per_epoch = (train.len() / config.batch_size).max(1);
    let total_steps = config
        .max_steps
        .unwrap_or(usize::MAX)
        .min(steps_per_epoch * config.epochs);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))?;
    let (mut images, mut seconds) = (0usize, 0f64);
    let mut stopped = false;
    let knn = |backbone: &SwinTransformer| {
        representation_check(
            &backbone.valid(),
            &train,
            &val,
            &classes,
            &preprocess,
            device,
            config.knn_k,
        )
    };
    let untrained = state.epoch == 0 && state.knn.is_empty();
    if untrained && let Some((acc, images, present)) = knn(&model.backbone)? {
        (state.knn_images, state.knn_classes) = (images, present);
        tracing::info!("before pretraining: kNN accuracy {acc:.4} (random backbone)");
        state.knn.push((0, acc));
    }
    while state.epoch < config.epochs && state.step < total_steps {
        let order = epoch_order(train.len(), config.seed, state.epoch);
        // Steps of this epoch taken before a stop (a resumed run skips them).
        let done = state.step.saturating_sub(state.epoch * steps_per_epoch);
        let bar = crate::progress::bar(steps_per_epoch as u64, "simclr");
        bar.set_prefix(format!("{}/{}", state.epoch + 1, config.epochs));
        bar.inc(done as u64);
        for (b, chunk) in order
            .chunks(config.batch_size)
            .filter(|c| c.len() == config.batch_size)
            .enumerate()
            .skip(done)
        {
            let t = Instant::now();
            let seeds = |view: u64| -> Vec<u64> {
                chunk
                    .iter()
                    .map(|&i| config.seed ^ ((state.epoch as u64) << 40) ^ ((i as u64) << 2) ^ view)
                    .collect()
            };
            let v1 = make_batch(&train, chunk, &preprocess, Some(&config.augment), &seeds(1))?;
            let v2 = make_batch(&train, chunk, &preprocess, Some(&config.augment), &seeds(2))?;
            let n = chunk.len();
            let mut pixels = v1.pixels;
            pixels.extend_from_slice(&v2.pixels);
            let input =
                Tensor::<4>::from_data(TensorData::new(pixels, [2 * n, 3, h, w]), &train_device);
            // Mixed precision: a bf16 copy of the f32 weights computes, the loss is f32.
            let compute = config.precision.compute_copy(&model);
            let z = to_f32(compute.project(compute.features(config.precision.input(input))));
            let z1 = z.clone().narrow(0, 0, n);
            let z2 = z.narrow(0, n, n);
            let loss = nt_xent(z1, z2, config.temperature);
            let value = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                bail!(
                    "SimCLR loss became {value} at step {}: lower --lr",
                    state.step + 1
                );
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let progress = state.step as f64 / total_steps.max(1) as f64;
            let warmup = (steps_per_epoch * 2).min(total_steps / 5).max(1);
            let lr = if state.step < warmup {
                config.lr * (state.step + 1) as f64 / warmup as f64
            } else {
                0.5 * config.lr * (1.0 + (std::f64::consts::PI * progress).cos())
            };
            model = optim.step(lr, model, grads);
            state.step += 1;
            images += 2 * n;
            seconds += t.elapsed().as_secs_f64();
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"step": state.step, "epoch": state.epoch, "batch": b, "loss": value, "lr": lr})
            )?;
            bar.set_message(format!("loss {value:.3}"));
            bar.inc(1);
            if stop.load(Ordering::SeqCst) || state.step >= total_steps {
                stopped = stop.load(Ordering::SeqCst);
                break;
            }
        }
        bar.finish();
        let epoch_done = !stopped || state.step == (state.epoch + 1) * steps_per_epoch;
        // Stopped mid-epoch: the checkpoint below keeps the position; no kNN check yet.
        if epoch_done {
            state.epoch += 1;
        }
        if epoch_done && let Some((acc, images, present)) = knn(&model.backbone)? {
            (state.knn_images, state.knn_classes) = (images, present);
            tracing::info!(
                "epoch {}: kNN accuracy {acc:.4} on the validation split (file-name classes)",
                state.epoch
            );
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"epoch": state.epoch, "step": state.step, "knn_accuracy": acc})
            )?;
            state.knn.push((state.epoch, acc));
        }
        model
            .clone()
            .valid()
            .save_file(run_dir.join("model.tmp.bpk"))
            .map_err(|e| anyhow::anyhow!("saving checkpoint: {e:?}"))?;
        std::fs::rename(run_dir.join("model.tmp.bpk"), run_dir.join("model.bpk"))?;
        optim
            .save(run_dir.join("optim.tmp.bpk"))
            .map_err(|e| anyhow::anyhow!("saving optimizer: {e:?}"))?;
        std::fs::rename(run_dir.join("optim.tmp.bpk"), run_dir.join("optim.bpk"))?;
        save_backbone_timm(
            &model.backbone.valid(),
            &run_dir.join("backbone.safetensors"),
        )?;
        std::fs::write(&state_path, serde_json::to_vec_pretty(&state)?)?;
        if stopped {
            break;
        }
    }
    Ok(PretrainOutcome {
        state,
        stopped,
        images_per_second: images as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(values: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }

    #[test]
    fn nt_xent_hand_values() {
        // Identical pairs, orthogonal otherwise, temperature 1: each row sees its partner at
        // similarity 1 and two others at 0: loss = ln(2 + e) - 1.
        let z = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let loss = nt_xent(z.clone(), z, 1.0).into_scalar::<f32>();
        assert!(
            (loss - ((2.0 + std::f32::consts::E).ln() - 1.0)).abs() < 1e-6,
            "{loss}"
        );
        // Scale does not matter (embeddings are normalised); a lone pair has nothing to confuse.
        let loss = nt_xent(t2(vec![3.0, 4.0], [1, 2]), t2(vec![0.6, 0.8], [1, 2]), 0.5)
            .into_scalar::<f32>();
        assert!(loss.abs() < 1e-6, "{loss}");
    }

    #[test]
    fn knn_summary_says_what_the_sample_size_can_show() {
        let state = |knn: Vec<(usize, f64)>, images| PretrainState {
            knn,
            knn_images: images,
            knn_classes: 6,
            ..Default::default()
        };
        // The demo's size: 24 images, 0.17 -> 0.08 (4 then 2 right) is noise.
        let s = state(vec![(0, 0.167), (20, 0.083)], 24)
            .knn_summary()
            .unwrap();
        assert!(
            s.contains("+-0.149") && s.contains("no representation gain"),
            "{s}"
        );
        let s = state(vec![(0, 0.17), (8, 0.45)], 288)
            .knn_summary()
            .unwrap();
        assert!(s.contains("a gain beyond the noise"), "{s}");
        let s = state(vec![(0, 0.45), (8, 0.2)], 288).knn_summary().unwrap();
        assert!(s.contains("a loss beyond the noise"), "{s}");
        assert!(state(vec![(0, 0.2)], 288).knn_summary().is_none());
    }

    #[test]
    fn knn_votes_by_similarity() {
        let bank = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0]];
        let labels = vec![0, 0, 1];
        let query = vec![vec![1.0, 0.05], vec![0.1, 1.0]];
        assert_eq!(knn_accuracy(&bank, &labels, &query, &[0, 1], 1), 1.0);
        assert_eq!(knn_accuracy(&bank, &labels, &query, &[1, 1], 1), 0.5);
    }
}
