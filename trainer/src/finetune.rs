//! Fine-tuning the detector on labeled VOC data (all of it, or k shots per class): AdamW,
//! linear warmup then cosine decay, weight decay, gradient clipping, optional class
//! re-weighting; a run folder with config, metrics, checkpoints; resume; a clean stop on
//! Ctrl-C that saves where it was.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use edge_detector::loss::{LossConfig, detection_loss, distillation_loss};
use edge_detector::{Detector, DetectorConfig, NEU_CLASSES, SwinConfig};
use serde::{Deserialize, Serialize};

use crate::data::augment::AugmentConfig;
use crate::data::loader::{epoch_order, stream_epoch};
use crate::data::{self, Sample, voc};
use crate::ema::WeightAverage;
use crate::eval::{self, EvalReport};
use crate::precision::{Precision, to_f32};

/// Everything a fine-tuning run was started with; written to `RUN/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub data: PathBuf,
    /// A detector model file to continue from, or a timm-format Swin backbone (SimCLR output).
    pub init: Option<PathBuf>,
    /// Images per class (None: all training images).
    pub shots: Option<usize>,
    /// Seed of the k-shot draw, the shuffles and the augmentations.
    pub seed: u64,
    /// Seed and fraction of the fixed train/validation split.
    pub split_seed: u64,
    pub val_fraction: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// The backbone trains at `lr x backbone_lr_scale` (the neck and head at `lr`): below 1
    /// keeps a pretrained (SimCLR) backbone close to where it starts while a fresh head learns.
    #[serde(default = "unit")]
    pub backbone_lr_scale: f64,
    /// Keep the backbone frozen (no gradients, no updates) for this many first epochs while the
    /// neck and head warm up; the backward pass then stops at the neck, so those steps are cheaper.
    /// At or above `epochs` the backbone never trains.
    #[serde(default)]
    pub freeze_backbone_epochs: usize,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f32,
    /// No weight decay on biases, norm weights and the relative-position bias tables (what
    /// detection Swins do); with `false` every parameter decays.
    #[serde(default)]
    pub no_decay_norms: bool,
    pub grad_clip: f32,
    /// How `grad_clip` applies: to each parameter's gradient alone, or to the norm of all
    /// gradients together (scaled alike, so their direction is kept).
    #[serde(default)]
    pub grad_clip_mode: ClipMode,
    /// Weigh each class's loss by (mean count / class count)^0.5.
    pub class_balance: bool,
    /// Compute dtype of a training step (mixed precision); weights stay f32.
    #[serde(default)]
    pub precision: Precision,
    /// Evaluate on the validation split every this many epochs (and at the end).
    pub eval_every: usize,
    pub input_size: usize,
    pub augment: AugmentConfig,
    /// Stop after this many optimizer steps (smoke tests); None: run all epochs.
    pub max_steps: Option<usize>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.9995),
    /// evaluated beside the raw weights; the run's model is then the average.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Distil from this detector model: its outputs on each training batch are soft targets
    /// beside the labels (recovery of a pruned model from the unpruned one).
    #[serde(default)]
    pub teacher: Option<PathBuf>,
    /// Weight of the distillation terms against the task loss.
    #[serde(default = "unit")]
    pub distill_weight: f64,
    /// Pseudo-labeled images (`selftrain::PseudoLabels`, JSON) trained on beside the labeled
    /// ones: a self-training round.
    #[serde(default)]
    pub pseudo_labels: Option<PathBuf>,
    /// With pseudo-labels, the labeled images are repeated to make about this share of each
    /// epoch (they are few, and the only labels known to be right).
    #[serde(default = "half")]
    pub labeled_share: f64,
    /// Find and down-weight the labeled boxes the model keeps disagreeing with.
    #[serde(default)]
    pub noisy_labels: Option<crate::noisy::NoisyLabelConfig>,
    pub backbone: SwinConfig,
}

fn half() -> f64 {
    0.5
}

fn unit() -> f64 {
    1.0
}

impl FinetuneConfig {
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            init: None,
            shots: None,
            seed: 0,
            split_seed: 42,
            val_fraction: 0.2,
            epochs: 60,
            batch_size: 8,
            lr: 5e-4,
            backbone_lr_scale: 1.0,
            freeze_backbone_epochs: 0,
            precision: Precision::F32,
            min_lr: 1e-5,
            warmup_epochs: 2.0,
            weight_decay: 0.05,
            no_decay_norms: false,
            grad_clip: 5.0,
            grad_clip_mode: ClipMode::PerParameter,
            class_balance: false,
            eval_every: 5,
            input_size: 224,
            augment: AugmentConfig::default(),
            max_steps: None,
            ema_decay: None,
            teacher: None,
            distill_weight: 1.0,
            pseudo_labels: None,
            labeled_share: 0.5,
            noisy_labels: None,
            backbone: SwinConfig::edge(),
        }
    }
}

/// How gradient clipping applies (`FinetuneConfig::grad_clip_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClipMode {
    /// Each parameter's gradient norm clipped alone (burn's `GradientClippingConfig::Norm`).
    #[default]
    PerParameter,
    /// The norm of all gradients together: every gradient scaled by the same factor.
    Global,
}

/// Paths, as burn's optimizer names them, of the parameters that take no weight decay under
/// `no_decay_norms`: every parameter of rank 1 (biases, LayerNorm and GroupNorm weights) and
/// the relative-position bias tables.
pub fn no_decay_paths<M: Module>(model: &M) -> Vec<String> {
    #[derive(Default)]
    struct Paths {
        path: Vec<String>,
        found: Vec<String>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            if D <= 1
                || self
                    .path
                    .last()
                    .is_some_and(|n| n == "relative_position_bias_table")
            {
                self.found.push(self.path.join("."));
            }
        }
    }
    let mut paths = Paths::default();
    model.visit(&mut paths);
    paths.found
}

/// Scales every gradient in `parts` by `max_norm / n` when the norm `n` of all of them together
/// exceeds `max_norm`; returns `n`.
pub fn clip_global_norm<M: Module>(
    model: &M,
    parts: &mut [&mut GradientsParams],
    max_norm: f32,
) -> f32 {
    struct SquaredSum<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredSum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let sq = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(s) => s + sq,
                    None => sq,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }
    let mut total = 0f32;
    for grads in parts.iter() {
        let mut visitor = SquaredSum { grads, sum: None };
        model.visit(&mut visitor);
        if let Some(sum) = visitor.sum {
            total += sum.into_scalar::<f32>();
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let factor = max_norm / norm;
        for grads in parts.iter_mut() {
            model.visit(&mut Scale { grads, factor });
        }
    }
    norm
}

/// Where a run is, for resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Next epoch to run and the batch within it.
    pub epoch: usize,
    pub batch: usize,
    pub step: usize,
    pub best_map50: Option<f64>,
    pub finished: bool,
}

/// Learning rate at `step`: linear warmup from 0, then cosine to `min_lr`.
pub fn learning_rate(
    config: &FinetuneConfig,
    step: usize,
    total_steps: usize,
    warmup_steps: usize,
) -> f64 {
    if step < warmup_steps {
        return config.lr * (step + 1) as f64 / warmup_steps as f64;
    }
    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
    let t = ((step - warmup_steps) as f64 / span).min(1.0);
    config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Loads the dataset and returns (train, validation) as configured (k-shot drawn from train).
pub fn load_splits(
    config: &FinetuneConfig,
    classes: &[String],
) -> Result<(Vec<Sample>, Vec<Sample>, Vec<String>)> {
    let dataset = voc::load(&config.data, classes)
        .with_context(|| format!("loading dataset {}", config.data.display()))?;
    let warnings = dataset.warnings.clone();
    let (train, val) = data::split(&dataset, config.val_fraction, config.split_seed);
    let mut train = match config.shots {
        Some(k) => data::k_shot(&train, classes.len(), k, config.seed),
        None => train,
    };
    if train.is_empty() {
        bail!(
            "{}: no training images after the split",
            config.data.display()
        );
    }
    if let Some(path) = &config.pseudo_labels {
        let pseudo = crate::selftrain::PseudoLabels::read(path)?.samples(path, classes)?;
        let repeats =
            crate::selftrain::labeled_repeats(train.len(), pseudo.len(), config.labeled_share);
        let labeled = std::mem::take(&mut train);
        train = (0..repeats)
            .flat_map(|_| labeled.iter().cloned())
            .chain(pseudo)
            .collect();
    }
    Ok((train, val, warnings))
}

fn class_weights(train: &[Sample], classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    for o in train.iter().flat_map(|s| &s.objects) {
        counts[o.class_id] += 1;
    }
    let mean = counts.iter().sum::<usize>() as f32 / classes as f32;
    counts
        .iter()
        .map(|&c| (mean / c.max(1) as f32).sqrt())
        .collect()
}

/// Runs detection on samples and scores it against their labels.
pub fn evaluate_samples(
    detector: &Detector,
    samples: &[Sample],
    batch_size: usize,
) -> Result<EvalReport> {
    let mut gts = Vec::new();
    let mut predictions = Vec::new();
    let preprocess = &detector.config.preprocess;
    let indices: Vec<usize> = (0..samples.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let seeds = vec![0; chunk.len()];
        let batch = data::loader::make_batch(samples, chunk, preprocess, None, &seeds)?;
        let [h, w] = preprocess.input_size;
        let input = Tensor::<4>::from_data(
            TensorData::new(batch.pixels, [batch.count, 3, h, w]),
            &detector.device,
        );
        let output = detector.model.forward(input);
        let detections = detector.postprocess(output, &batch.inverses);
        for (&i, dets) in chunk.iter().zip(detections) {
            predictions.extend(dets.iter().map(|d| eval::Prediction {
                image: i,
                class_id: d.class_id,
                bbox: [d.x1 as f64, d.y1 as f64, d.x2 as f64, d.y2 as f64],
                score: d.score as f64,
            }));
            gts.extend(samples[i].objects.iter().map(|o| eval::GroundTruth {
                image: i,
                class_id: o.class_id,
                bbox: o.bbox.map(|v| v as f64),
                difficult: o.difficult,
            }));
        }
    }
    Ok(eval::evaluate(
        &gts,
        &predictions,
        &detector.config.classes,
        samples.len(),
    ))
}

fn detector_config(config: &FinetuneConfig, classes: Vec<String>) -> DetectorConfig {
    let mut c = DetectorConfig::edge_neu();
    c.backbone = config.backbone.clone();
    c.classes = classes;
    c.preprocess.input_size = [config.input_size, config.input_size];
    c
}

/// Builds the initial detector on `device` (an autodiff device for training).
fn initial_detector(
    config: &FinetuneConfig,
    classes: Vec<String>,
    device: &Device,
) -> Result<Detector> {
    let Some(init) = &config.init else {
        return Ok(Detector::new(detector_config(config, classes), device)?);
    };
    match Detector::load(init, device) {
        Ok(detector) => {
            if detector.config.classes != classes {
                bail!(
                    "{}: its classes {:?} differ from the dataset's {:?}",
                    init.display(),
                    detector.config.classes,
                    classes
                );
            }
            Ok(detector)
        }
        Err(edge_detector::DetectorError::BadWeights { reason, .. })
            if reason.contains("detector_config") =>
        {
            // Not a detector file: a backbone checkpoint in timm's names (SimCLR writes these).
            let mut detector = Detector::new(detector_config(config, classes), device)?;
            detector.model.backbone.load_timm(init)?;
            Ok(detector)
        }
        Err(e) => Err(e.into()),
    }
}

/// The teacher of a distillation run, on the plain (inference) device: it must predict the
/// student's classes at the student's input size.
fn load_teacher(path: &Path, student: &Detector, device: &Device) -> Result<Detector> {
    let teacher = Detector::load(path, device)
        .with_context(|| format!("loading the teacher {}", path.display()))?;
    if teacher.config.classes != student.config.classes {
        bail!(
            "teacher {}: its classes {:?} differ from the student's {:?}",
            path.display(),
            teacher.config.classes,
            student.config.classes
        );
    }
    if teacher.config.preprocess.input_size != student.config.preprocess.input_size
        || teacher.config.strides() != student.config.strides()
    {
        bail!(
            "teacher {}: input {:?} and strides {:?} differ from the student's {:?} and {:?}",
            path.display(),
            teacher.config.preprocess.input_size,
            teacher.config.strides(),
            student.config.preprocess.input_size,
            student.config.strides()
        );
    }
    Ok(teacher)
}

/// What a finished (or stopped) run returns.
#[derive(Debug)]
pub struct RunOutcome {
    pub state: RunState,
    pub last_report: Option<EvalReport>,
    pub stopped: bool,
    pub seconds: f64,
    pub train_images_per_second: f64,
    /// Share of the training loop's time spent waiting for the next batch (data loading that
    /// did not keep up with the steps).
    pub data_wait_fraction: f64,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Trains in `run_dir` (created, or resumed when it holds a checkpoint and `resume` is set).
pub fn run(
    config: &FinetuneConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    stop: Arc<AtomicBool>,
) -> Result<RunOutcome> {
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    let checkpoint_dir = run_dir.join("checkpoint");
    let state_path = checkpoint_dir.join("state.json");
    let resuming = state_path.exists();
    if resuming && !resume {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(&checkpoint_dir)
        .with_context(|| format!("creating {}", checkpoint_dir.display()))?;
    let (config, mut state) = if resuming {
        let saved: FinetuneConfig =
            serde_json::from_slice(&std::fs::read(run_dir.join("config.json"))?)
                .context("reading the run's config.json")?;
        let state: RunState = serde_json::from_slice(&std::fs::read(&state_path)?)
            .context("reading checkpoint/state.json")?;
        (saved, state)
    } else {
        write_json(&run_dir.join("config.json"), config)?;
        (config.clone(), RunState::default())
    };
    // Before loading data: a device without the run's precision fails at once.
    config.precision.check(device)?;
    let (mut train, val, warnings) = load_splits(&config, &classes)?;
    for w in warnings.iter().take(20) {
        tracing::warn!("{w}");
    }
    let filter_path = checkpoint_dir.join("noisy.json");
    let mut filter = match &config.noisy_labels {
        None => None,
        Some(_) => {
            let fresh = crate::noisy::track(&mut train);
            Some(if resuming && filter_path.exists() {
                serde_json::from_slice(&std::fs::read(&filter_path)?)
                    .with_context(|| format!("reading {}", filter_path.display()))?
            } else {
                fresh
            })
        }
    };
    let mut set_aside = 0usize;
    let train = Arc::new(train);
    let train_device = device.clone().autodiff();
    // Initial weights (and burn's other random draws) follow the run's seed.
    train_device.seed(config.seed);
    let clipping = (config.grad_clip_mode == ClipMode::PerParameter)
        .then_some(GradientClippingConfig::Norm(config.grad_clip));
    let adamw = |decay: f32| {
        AdamWConfig::new()
            .with_weight_decay(decay)
            .with_grad_clipping(clipping.clone())
    };
    // Under `no_decay_norms` the optimizer is built from the detector's parameter names, and
    // before a checkpoint's state loads into it (a group added later drops the state it
    // matches).
    let make_optim = |detector: &Detector| {
        let optim = adamw(config.weight_decay).init();
        if !config.no_decay_norms {
            return optim;
        }
        optim.with_group(
            ParamGroup::from_paths(no_decay_paths(&detector.model)),
            adamw(0.0).build(),
            clipping.as_ref().map(|c| c.init()),
        )
    };
    let (mut detector, mut optim) = if resuming {
        load_checkpoint(&checkpoint_dir, &train_device, make_optim)?
    } else {
        let detector = initial_detector(&config, classes.clone(), &train_device)?;
        let optim = make_optim(&detector);
        (detector, optim)
    };
    // The weight average starts from the initial weights (or the checkpoint's average).
    let schedule = config.ema_decay.map(WeightAverage::new);
    let mut average = match schedule {
        None => None,
        Some(_) if resuming && checkpoint_dir.join("ema.safetensors").exists() => Some(
            Detector::load(checkpoint_dir.join("ema.safetensors"), device)
                .context("loading the checkpoint's weight average")?,
        ),
        Some(_) => Some(detector.valid()),
    };
    let teacher = match &config.teacher {
        None => None,
        Some(path) => Some(load_teacher(path, &detector, device)?),
    };
    let mut loss_config = LossConfig::new();
    if config.class_balance {
        loss_config.class_weights = class_weights(&train, classes.len());
    }
    let strides = detector.config.strides();
    let batches_per_epoch = (train.len() / config.batch_size).max(1);
    let drop_last = train.len() >= config.batch_size;
    let total_steps = config
        .max_steps
        .unwrap_or(batches_per_epoch * config.epochs)
        .min(batches_per_epoch * config.epochs);
    let warmup_steps =
        ((config.warmup_epochs * batches_per_epoch as f64) as usize).clamp(1, total_steps.max(1));
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))?;
    let [h, w] = detector.config.preprocess.input_size;
    let started = Instant::now();
    let mut trained_images = 0usize;
    let mut train_seconds = 0.0f64;
    let mut wait_seconds = 0.0f64;
    let mut last_report = None;
    let mut stopped = false;
    tracing::info!(
        "training on {} images ({} validation), {} batches/epoch, {} epochs, run {}",
        train.len(),
        val.len(),
        batches_per_epoch,
        config.epochs,
        run_dir.display()
    );
    'epochs: while state.epoch < config.epochs && state.step < total_steps {
        let backbone_frozen = state.epoch < config.freeze_backbone_epochs;
        // Set per epoch (not once) so a resumed run gets the flag of the epoch it resumes in;
        // runs without a warm-up leave the flags as the model has them.
        if config.freeze_backbone_epochs > 0 {
            detector.model.backbone = detector.model.backbone.set_require_grad(!backbone_frozen);
        }
        if let (Some(noisy), Some(filter)) = (&config.noisy_labels, filter.as_mut())
            && state.epoch >= noisy.warmup_epochs
        {
            set_aside = filter.select(noisy);
            tracing::info!(
                "epoch {}: {set_aside} labeled boxes set aside as likely wrong",
                state.epoch + 1
            );
        }
        let order = epoch_order(train.len(), config.seed, state.epoch);
        let stream = stream_epoch(
            train.clone(),
            order,
            detector.config.preprocess.clone(),
            Some(config.augment.clone()),
            config.batch_size,
            drop_last,
            config.seed ^ state.epoch as u64,
            state.batch,
            3,
        );
        let bar =
            crate::progress::bar(stream.batches as u64, "epoch").with_position(state.batch as u64);
        bar.set_prefix(format!("{}/{}", state.epoch + 1, config.epochs));
        let mut loss_sum = 0.0f64;
        let mut loss_count = 0usize;
        let mut waiting = Instant::now();
        for batch in stream.receiver.iter() {
            let mut batch = batch?;
            if let Some(filter) = &filter {
                for b in batch.boxes.iter_mut().flatten() {
                    if let Some(id) = b.id {
                        b.weight = b.weight.min(filter.weight(id));
                    }
                }
            }
            let wait = waiting.elapsed().as_secs_f64();
            wait_seconds += wait;
            let step_started = Instant::now();
            // The teacher sees the same augmented batch, without a graph; its outputs move to
            // the training device as plain data.
            let soft_targets = teacher.as_ref().map(|teacher| {
                let input = Tensor::<4>::from_data(
                    TensorData::new(batch.pixels.clone(), [batch.count, 3, h, w]),
                    device,
                );
                let out = teacher.model.forward(input);
                let probs = sigmoid(out.cls_logits).into_data();
                (
                    Tensor::<3>::from_data(probs, &train_device),
                    Tensor::<3>::from_data(out.box_ltrb.into_data(), &train_device),
                )
            });
            let input = Tensor::<4>::from_data(
                TensorData::new(batch.pixels, [batch.count, 3, h, w]),
                &train_device,
            );
            // Under mixed precision the step computes with a bf16 copy of the f32 weights
            // (the casts are recorded, so gradients reach the f32 parameters) and the loss in f32.
            let compute = config.precision.compute_copy(&detector.model);
            let mut output = compute.forward(config.precision.input(input));
            output.cls_logits = to_f32(output.cls_logits);
            output.box_ltrb = to_f32(output.box_ltrb);
            let mut loss = detection_loss(&output, &batch.boxes, &strides, &loss_config);
            if let Some(filter) = filter.as_mut() {
                for &(id, value) in &loss.per_box {
                    filter.observe(id, value);
                }
            }
            let mut parts = vec![loss.cls.clone(), loss.boxes.clone()];
            if let Some((probs, ltrb)) = soft_targets {
                let (cls, boxes) = distillation_loss(
                    &output,
                    probs,
                    ltrb,
                    loss.positives as f64,
                    loss_config.qfl_beta,
                    0.05,
                );
                let distill = cls.clone() + boxes.clone() * loss_config.box_weight;
                loss.total = loss.total + distill * config.distill_weight;
                parts.extend([cls, boxes]);
            }
            parts.insert(0, loss.total.clone());
            let values: Vec<f32> = Tensor::cat(parts, 0)
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap_or_default();
            let lr = learning_rate(&config, state.step, total_steps, warmup_steps);
            let mut grads = loss.total.backward();
            // Taking the backbone's gradients out first leaves the neck's and head's; AdamW
            // keeps its moments per parameter, so two steps on disjoint parts are one step.
            let mut backbone = (config.backbone_lr_scale != 1.0 && !backbone_frozen)
                .then(|| GradientsParams::from_module(&mut grads, &detector.model.backbone));
            let mut rest = GradientsParams::from_module(&mut grads, &detector.model);
            let mut grad_norm = None;
            if config.grad_clip_mode == ClipMode::Global {
                let mut parts: Vec<&mut GradientsParams> = vec![&mut rest];
                parts.extend(backbone.as_mut());
                grad_norm = Some(clip_global_norm(
                    &detector.model,
                    &mut parts,
                    config.grad_clip,
                ));
            }
            if let Some(backbone) = backbone {
                detector.model =
                    optim.step(lr * config.backbone_lr_scale, detector.model, backbone);
            }
            detector.model = optim.step(lr, detector.model, rest);
            if let (Some(schedule), Some(average)) = (schedule, average.as_mut()) {
                average.model =
                    schedule.update(average.model.clone(), &detector.model, state.step + 1);
            }
            let seconds = step_started.elapsed().as_secs_f64();
            train_seconds += seconds;
            trained_images += batch.count;
            state.step += 1;
            state.batch += 1;
            let total = values.first().copied().unwrap_or(f32::NAN);
            if !total.is_finite() {
                bail!(
                    "loss became {total} at step {} (lr {lr:.2e}): lower --lr",
                    state.step
                );
            }
            loss_sum += total as f64;
            loss_count += 1;
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"step": state.step, "epoch": state.epoch, "loss": total, "cls": values.get(1), "box": values.get(2),
                    "distill_cls": values.get(3), "distill_box": values.get(4), "grad_norm": grad_norm,
                    "positives": loss.positives, "lr": lr, "set_aside": filter.as_ref().map(|_| set_aside), "images_per_s": batch.count as f64 / seconds,
                    "data_wait_s": wait})
            )?;
            bar.set_message(format!(
                "loss {:.3} lr {lr:.1e}",
                loss_sum / loss_count as f64
            ));
            bar.inc(1);
            if stop.load(Ordering::SeqCst) || state.step >= total_steps {
                stopped = stop.load(Ordering::SeqCst);
                break;
            }
            waiting = Instant::now();
        }
        bar.finish();
        let epoch_done = state.batch >= stream.batches;
        if epoch_done {
            state.epoch += 1;
            state.batch = 0;
        }
        let last = state.epoch >= config.epochs || state.step >= total_steps;
        if ((epoch_done && state.epoch % config.eval_every.max(1) == 0) || last) && !stopped {
            // With a weight average, the average is the run's model; the raw weights' scores
            // are kept beside it.
            let evaluate = |model: Detector, which: &str| -> Result<(Detector, EvalReport)> {
                let mut model = model;
                model.config.score_threshold = 0.01;
                let report = evaluate_samples(&model, &val, config.batch_size)?;
                tracing::info!(
                    "epoch {}: validation mAP@0.5 {:.4}, mAP@[.5:.95] {:.4}{which}",
                    state.epoch,
                    report.map50,
                    report.map50_95
                );
                Ok((model, report))
            };
            let (mut eval_detector, report, raw) = match &average {
                Some(average) => {
                    let (_, raw) = evaluate(detector.valid(), " (raw weights)")?;
                    let (model, report) = evaluate(average.clone(), " (weight average)")?;
                    (model, report, Some(raw))
                }
                None => {
                    let (model, report) = evaluate(detector.valid(), "")?;
                    (model, report, None)
                }
            };
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"epoch": state.epoch, "step": state.step, "val_map50": report.map50, "val_map50_95": report.map50_95,
                    "raw_val_map50": raw.as_ref().map(|r| r.map50), "raw_val_map50_95": raw.as_ref().map(|r| r.map50_95)})
            )?;
            if state.best_map50.is_none_or(|b| report.map50 > b) {
                state.best_map50 = Some(report.map50);
                eval_detector.config.score_threshold = detector.config.score_threshold;
                eval_detector.save(run_dir.join("best.safetensors"))?;
            }
            last_report = Some(report);
        }
        state.finished = last && !stopped;
        if let Some(filter) = &filter {
            write_json(&filter_path, filter)?;
        }
        save_checkpoint(&detector, average.as_ref(), &optim, &state, &checkpoint_dir)?;
        if stopped {
            tracing::info!(
                "stopped at epoch {} batch {}: resume with --resume",
                state.epoch,
                state.batch
            );
            break 'epochs;
        }
    }
    if let Some(filter) = &filter {
        let list = crate::noisy::set_aside_list(filter, &train, &classes);
        write_json(&run_dir.join("noisy-labels.json"), &list)?;
        tracing::info!(
            "{} labeled boxes set aside as likely wrong: {}",
            list.len(),
            run_dir.join("noisy-labels.json").display()
        );
    }
    let model_out = run_dir.join("model.safetensors");
    match &average {
        Some(average) => {
            average.save(&model_out)?;
            detector.valid().save(run_dir.join("raw.safetensors"))?;
        }
        None => detector.valid().save(&model_out)?,
    }
    Ok(RunOutcome {
        state,
        last_report,
        stopped,
        seconds: started.elapsed().as_secs_f64(),
        train_images_per_second: trained_images as f64 / train_seconds.max(1e-9),
        data_wait_fraction: wait_seconds / (wait_seconds + train_seconds).max(1e-9),
    })
}

/// A run's checkpoint: the detector, with the parameter ids its optimizer state is keyed by
/// (`model.bpk`; the SafeTensors file carries no ids, and a detector loaded from it alone would
/// leave AdamW's moments behind), and that optimizer state, loaded into the optimizer
/// `make_optim` builds for the detector.
pub fn load_checkpoint(
    dir: &Path,
    device: &Device,
    make_optim: impl FnOnce(&Detector) -> burn::optim::ModuleOptimizer,
) -> Result<(Detector, burn::optim::ModuleOptimizer)> {
    let mut detector = Detector::load(dir.join("model.safetensors"), device)?;
    let record = dir.join("model.bpk");
    if record.exists() {
        detector.model = detector
            .model
            .try_load_file(&record)
            .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", record.display()))?;
    } else {
        tracing::warn!(
            "{} has no model.bpk (a checkpoint from an older trainer): the optimizer starts afresh",
            dir.display()
        );
    }
    let optim = make_optim(&detector);
    let optim = if dir.join("optim.bpk").exists() {
        optim
            .load(dir.join("optim.bpk"))
            .context("loading optimizer state")?
    } else {
        optim
    };
    Ok((detector, optim))
}

fn save_checkpoint(
    detector: &Detector,
    average: Option<&Detector>,
    optim: &burn::optim::ModuleOptimizer,
    state: &RunState,
    dir: &Path,
) -> Result<()> {
    // Each file is replaced atomically, state last: a crash in between resumes the newer
    // weights at the older position (repeating at most the batches since it was written).
    detector.valid().save(dir.join("model.safetensors"))?;
    if let Some(average) = average {
        let tmp = dir.join("ema.tmp.safetensors");
        average.save(&tmp)?;
        std::fs::rename(&tmp, dir.join("ema.safetensors"))?;
    }
    let record_tmp = dir.join("model.tmp.bpk");
    let _ = std::fs::remove_file(&record_tmp);
    detector
        .model
        .valid()
        .save_file(&record_tmp)
        .map_err(|e| anyhow::anyhow!("saving the model record: {e:?}"))?;
    std::fs::rename(&record_tmp, dir.join("model.bpk"))?;
    let optim_tmp = dir.join("optim.tmp.bpk");
    let _ = std::fs::remove_file(&optim_tmp);
    optim
        .save(&optim_tmp)
        .map_err(|e| anyhow::anyhow!("saving optimizer state: {e:?}"))?;
    std::fs::rename(&optim_tmp, dir.join("optim.bpk"))?;
    write_json(&dir.join("state.json"), state)
}
