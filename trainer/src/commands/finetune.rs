//! `trainer finetune`: fine-tune the detector on a VOC / NEU-DET folder, or on the frames labeled on an edge's
//! review page (--from-edge); writes a run folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::prelude::*;

use crate::precision::Precision;

use super::stop_flag;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset folder with images/ and annotations/.
    #[arg(
        long,
        required_unless_present = "from_edge",
        conflicts_with = "from_edge"
    )]
    data: Option<PathBuf>,
    /// Train on what quality engineers labeled on an edge: its URL (http://HOST:PORT) or its
    /// /api/dataset URL. The set is downloaded to OUT/edge-dataset (kept on --resume).
    #[arg(long)]
    from_edge: Option<String>,
    /// Labeling token for --from-edge (one of the edge's review.labelers).
    #[arg(long, env = "EDGE_REVIEW_TOKEN", hide_env_values = true)]
    edge_token: Option<String>,
    /// Run folder (config.json, metrics.jsonl, checkpoint/, best.safetensors, model.safetensors, report/).
    #[arg(long)]
    out: PathBuf,
    /// Start from a detector model file, or from a Swin backbone in timm names (SimCLR output).
    /// Without it the detector trains from scratch.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Images per class to train on (few-shot); all training images when absent.
    #[arg(long)]
    shots: Option<usize>,
    /// Seed of the k-shot draw, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seed of the fixed train/validation split (keep it fixed to compare runs).
    #[arg(long, default_value_t = 42)]
    split_seed: u64,
    /// Fraction of images held out for validation, per class.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Passes over the training images (k-shot: over the k images per class).
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Peak learning rate (AdamW), reached after the warmup.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// The backbone trains at --lr times this (neck and head at --lr). Below 1 (e.g. 0.1)
    /// keeps a pretrained backbone near its start while the fresh head learns.
    #[arg(long, default_value_t = 1.0)]
    backbone_lr_scale: f64,
    /// Keep the backbone frozen for this many first epochs while the neck and head warm up
    /// (those steps skip the backbone's backward pass); --epochs or more: never train it.
    /// With a SimCLR backbone as --init and few shots, frozen throughout (e.g. 1000) and
    /// about 3x the steps a fully trained run could afford is the best CPU recipe measured
    /// (README, few-shot results).
    #[arg(long, default_value_t = 0)]
    freeze_backbone_epochs: usize,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    /// Linear warmup length in epochs.
    #[arg(long, default_value_t = 2.0)]
    warmup_epochs: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f32,
    /// No weight decay on biases, norm weights and the relative-position bias tables.
    #[arg(long)]
    no_decay_norms: bool,
    /// Clip gradient norms to this (each parameter's, or all together: --grad-clip-mode).
    #[arg(long, default_value_t = 5.0)]
    grad_clip: f32,
    /// per-parameter: each parameter's gradient clipped alone; global: the norm of all gradients
    /// together, every gradient scaled alike.
    #[arg(long, value_enum, default_value_t = crate::finetune::ClipMode::PerParameter)]
    grad_clip_mode: crate::finetune::ClipMode,
    /// Re-weight the class loss by inverse square-root frequency (long-tailed label sets).
    #[arg(long)]
    class_balance: bool,
    /// Compute dtype of a training step: bf16 runs forward and backward in bf16 with f32
    /// weights, optimizer state, loss and checkpoints (mixed precision; GPUs with bf16
    /// arithmetic, e.g. CUDA on Ampere or newer; refused where the device has none).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Evaluate on the validation split every N epochs (and at the end).
    #[arg(long, default_value_t = 5)]
    eval_every: usize,
    /// Square network input size in pixels.
    #[arg(long, default_value_t = 224)]
    input_size: usize,
    /// Train without augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Probability of a mosaic (four images in a 2x2 layout) per training image.
    #[arg(long, default_value_t = 0.0)]
    mosaic: f64,
    /// Probability of mixing another image in (mixup, boxes of both kept).
    #[arg(long, default_value_t = 0.0)]
    mixup: f64,
    /// Probability of pasting defects cut from another image (copy-paste).
    #[arg(long, default_value_t = 0.0)]
    copy_paste: f64,
    /// Probability of a random 90-degree rotation per training image (textures without a
    /// preferred direction, e.g. steel).
    #[arg(long, default_value_t = 0.0)]
    rot90: f64,
    /// Stochastic depth of the Swin blocks (rising linearly to this rate in the last block);
    /// for long runs from scratch, e.g. 0.1. Applies to a new detector, not to --init.
    #[arg(long, default_value_t = 0.0)]
    drop_path: f64,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.9995),
    /// evaluated beside the raw weights each time; the run's model is then the average
    /// (the raw weights go to raw.safetensors).
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Distil from this detector model (e.g. the unpruned model a pruned one came from): its
    /// outputs on each training batch become soft targets beside the labels.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Weight of the distillation terms (class and box) against the task loss.
    #[arg(long, default_value_t = 1.0, requires = "teacher")]
    distill_weight: f64,
    /// Self-training: unlabeled images to learn from beside the labeled ones, `rest` (the
    /// training split's images not drawn as --shots; their labels are only used to report how
    /// right the pseudo-labels were) or a folder of images (DIR/images/ or DIR/). The run then
    /// trains in rounds in OUT/round-N: round 0 on the labeled images, each later round on
    /// them and the pool as labeled by the round before (its weight average with --ema-decay).
    #[arg(long, value_name = "rest|DIR")]
    unlabeled: Option<crate::selftrain::Unlabeled>,
    /// Rounds of pseudo-labeling and training after round 0.
    #[arg(long, default_value_t = 2, requires = "unlabeled")]
    self_train_rounds: usize,
    /// Score at or above which a predicted box becomes a pseudo-label.
    #[arg(long, default_value_t = 0.5, requires = "unlabeled")]
    pseudo_threshold: f32,
    /// Boxes scored at or above this but under --pseudo-threshold become regions the loss
    /// ignores, instead of background (0, the default: none kept; 0.2 measured no gain at
    /// 10 shots, trainer/results).
    #[arg(long, default_value_t = 0.0, requires = "unlabeled")]
    pseudo_ignore_threshold: f32,
    /// Optimizer steps of each round after round 0 (default: as many as round 0).
    #[arg(long, requires = "unlabeled")]
    self_train_steps: Option<usize>,
    /// Share of each later round's images that are labeled ones (repeated to reach it).
    #[arg(long, default_value_t = 0.5, requires = "unlabeled")]
    labeled_share: f64,
    /// Noisy labels: after --noisy-labels-warmup epochs, set aside this share of each class's
    /// labeled boxes, those the model disagrees with most over the epochs (wrong class or
    /// wrong place); chosen again every epoch, listed at the end in OUT/noisy-labels.json.
    #[arg(long, value_name = "SHARE")]
    noisy_labels: Option<f64>,
    /// Epochs of plain training before boxes are set aside.
    #[arg(long, default_value_t = 2, requires = "noisy_labels")]
    noisy_labels_warmup: usize,
    /// Loss weight of a box set aside (0: ignored).
    #[arg(long, default_value_t = 0.0, requires = "noisy_labels")]
    noisy_labels_weight: f32,
    /// Stop after this many optimizer steps (quick checks).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let Args {
        data,
        from_edge,
        edge_token,
        out,
        init,
        shots,
        seed,
        split_seed,
        val_fraction,
        epochs,
        batch_size,
        lr,
        backbone_lr_scale,
        freeze_backbone_epochs,
        min_lr,
        warmup_epochs,
        weight_decay,
        no_decay_norms,
        grad_clip,
        grad_clip_mode,
        class_balance,
        precision,
        eval_every,
        input_size,
        no_augment,
        mosaic,
        mixup,
        copy_paste,
        rot90,
        drop_path,
        ema_decay,
        teacher,
        distill_weight,
        unlabeled,
        self_train_rounds,
        pseudo_threshold,
        pseudo_ignore_threshold,
        self_train_steps,
        labeled_share,
        noisy_labels,
        noisy_labels_warmup,
        noisy_labels_weight,
        max_steps,
        resume,
    } = args;

    let data = match (data, from_edge) {
        (Some(d), _) => d,
        (None, Some(url)) => {
            let dir = out.join("edge-dataset");
            if resume && dir.join("images").is_dir() {
                println!(
                    "--resume: training on the set fetched before, {}",
                    dir.display()
                );
            } else {
                let token = edge_token.context(
                    "--from-edge needs --edge-token (or EDGE_REVIEW_TOKEN): a token from the edge's review.labelers",
                )?;
                let n = crate::from_edge::fetch(&url, &token, &dir)?;
                println!(
                    "fetched {n} labeled frames from {url} into {}",
                    dir.display()
                );
            }
            dir
        }
        (None, None) => unreachable!("clap requires --data or --from-edge"),
    };
    let mut config = crate::finetune::FinetuneConfig::new(data);
    config.init = init;
    config.shots = shots;
    config.seed = seed;
    config.split_seed = split_seed;
    config.val_fraction = val_fraction;
    config.epochs = epochs;
    config.batch_size = batch_size;
    config.lr = lr;
    if !(backbone_lr_scale > 0.0 && backbone_lr_scale.is_finite()) {
        anyhow::bail!("--backbone-lr-scale {backbone_lr_scale}: give a factor > 0");
    }
    config.backbone_lr_scale = backbone_lr_scale;
    config.freeze_backbone_epochs = freeze_backbone_epochs;
    if freeze_backbone_epochs > 0 && config.init.is_none() {
        tracing::warn!(
            "--freeze-backbone-epochs {freeze_backbone_epochs} without --init freezes a randomly initialised backbone"
        );
    }
    config.min_lr = min_lr;
    config.warmup_epochs = warmup_epochs;
    config.weight_decay = weight_decay;
    config.no_decay_norms = no_decay_norms;
    if !(grad_clip > 0.0 && grad_clip.is_finite()) {
        anyhow::bail!("--grad-clip {grad_clip}: give a norm > 0");
    }
    config.grad_clip = grad_clip;
    config.grad_clip_mode = grad_clip_mode;
    config.class_balance = class_balance;
    config.precision = precision;
    config.eval_every = eval_every;
    config.input_size = input_size;
    config.max_steps = max_steps;
    if no_augment {
        config.augment = crate::data::augment::AugmentConfig::none();
    }
    config.augment.mosaic = mosaic;
    config.augment.mixup = mixup;
    config.augment.copy_paste = copy_paste;
    config.augment.rot90 = rot90;
    config.backbone.drop_path_rate = drop_path;
    if let Some(d) = ema_decay
        && !(0.0..1.0).contains(&d)
    {
        anyhow::bail!("--ema-decay {d}: give a decay in [0, 1), e.g. 0.9995");
    }
    config.ema_decay = ema_decay;
    if !(distill_weight >= 0.0 && distill_weight.is_finite()) {
        anyhow::bail!("--distill-weight {distill_weight}: give a weight >= 0");
    }
    config.teacher = teacher;
    config.distill_weight = distill_weight;
    if let Some(share) = noisy_labels {
        if !(share > 0.0 && share < 1.0) {
            anyhow::bail!(
                "--noisy-labels {share}: give the share of boxes to set aside, in (0, 1)"
            );
        }
        if !(0.0..1.0).contains(&noisy_labels_weight) {
            anyhow::bail!("--noisy-labels-weight {noisy_labels_weight}: give a weight in [0, 1)");
        }
        config.noisy_labels = Some(crate::noisy::NoisyLabelConfig {
            share,
            warmup_epochs: noisy_labels_warmup,
            weight: noisy_labels_weight,
        });
    }
    if let Some(unlabeled) = unlabeled {
        let st = crate::selftrain::SelfTrainConfig {
            unlabeled,
            rounds: self_train_rounds,
            threshold: pseudo_threshold,
            ignore_threshold: (pseudo_ignore_threshold > 0.0).then_some(pseudo_ignore_threshold),
            steps: self_train_steps,
            labeled_share,
        };
        let outcome = crate::selftrain::run(&config, &st, &out, device, resume, stop_flag()?)?;
        for r in &outcome.rounds {
            println!(
                "round {}: {} steps on {} labeled images (x{}) and {} pseudo-labeled ({} boxes) of {}: validation mAP@0.5 {:.4}, mAP@[.5:.95] {:.4}",
                r.round,
                r.steps,
                r.labeled_images,
                r.labeled_repeats,
                r.pseudo_images,
                r.pseudo_boxes,
                r.pool,
                r.val_map50,
                r.val_map50_95
            );
        }
        for r in 0..outcome.rounds.len() {
            let dir = out.join(format!("round-{r}"));
            crate::report::plot_training_curves(
                &dir.join("metrics.jsonl"),
                &dir.join("curves.png"),
                "val_map50",
                "validation mAP@0.5",
            )?;
        }
        if outcome.stopped {
            println!("stopped: continue with --resume");
        } else {
            println!("model: {}", out.join("model.safetensors").display());
        }
        return Ok(());
    }
    let outcome = crate::finetune::run(&config, &out, device, resume, stop_flag()?)?;
    println!(
        "{} after {} steps in {:.0} s ({:.2} train images/s, {:.1}% of the loop waiting for data){}",
        if outcome.stopped { "stopped" } else { "done" },
        outcome.state.step,
        outcome.seconds,
        outcome.train_images_per_second,
        outcome.data_wait_fraction * 100.0,
        outcome
            .state
            .best_map50
            .map(|m| format!(", best validation mAP@0.5 {m:.4}"))
            .unwrap_or_default()
    );
    if let Some(r) = &outcome.last_report {
        crate::report::write(r, &out.join("report"), "validation")?;
    }
    crate::report::plot_training_curves(
        &out.join("metrics.jsonl"),
        &out.join("curves.png"),
        "val_map50",
        "validation mAP@0.5",
    )?;
    Ok(())
}
