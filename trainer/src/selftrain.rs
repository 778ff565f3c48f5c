//! Self-training: few labeled images plus the unlabeled frames a camera already has. Round 0
//! fine-tunes on the labeled images; each later round lets the previous round's model (its
//! weight average when the run keeps one: an EMA teacher) label the unlabeled pool, keeps the
//! boxes it scores at or above a threshold, and continues training on the labeled images
//! (repeated to a fixed share of each epoch) and the pseudo-labeled ones.
//!
//! A run folder holds `self-train.json` (what it was started with), `round-N/` (each a
//! fine-tuning run, `round-N/pseudo-labels.json` the labels it trained on), `rounds.json` (each
//! round's pseudo-labels and validation scores) and `model.safetensors` (the last round's).
//! Every round resumes from its checkpoint; finished rounds are not run again.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use edge_detector::{Detector, NEU_CLASSES};
use serde::{Deserialize, Serialize};

use crate::data::{self, Object, Sample, voc};
use crate::eval;
use crate::finetune::{self, FinetuneConfig};

/// Where the unlabeled images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unlabeled {
    /// The training split's images that were not drawn as shots; their labels are never read
    /// for training (only to report how good the pseudo-labels were).
    Rest,
    /// A folder of images (`DIR/images/` when it has one, else `DIR/`).
    Folder(PathBuf),
}

impl std::str::FromStr for Unlabeled {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "rest" {
            Unlabeled::Rest
        } else {
            Unlabeled::Folder(PathBuf::from(s))
        })
    }
}

/// How a self-training run goes beyond its round 0 (a plain fine-tuning run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfTrainConfig {
    pub unlabeled: Unlabeled,
    /// Rounds after round 0, each with fresh pseudo-labels.
    pub rounds: usize,
    /// A predicted box becomes a pseudo-label at this score or above; an image with none is
    /// left out of the round.
    pub threshold: f32,
    /// Boxes scored at or above this but under `threshold` are kept as regions the loss ignores
    /// (an unsure teacher's boxes are not taught as background); None: not kept.
    #[serde(default)]
    pub ignore_threshold: Option<f32>,
    /// Optimizer steps of each later round (None: as many as round 0 ran).
    pub steps: Option<usize>,
    /// Share of each later round's epoch that is labeled images (repeated to reach it).
    pub labeled_share: f64,
}

/// The pseudo-labels of one round, as written to `round-N/pseudo-labels.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PseudoLabels {
    pub teacher: PathBuf,
    pub threshold: f32,
    /// Unlabeled images looked at (those without a box at the threshold are not listed).
    pub pool: usize,
    pub images: Vec<PseudoImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PseudoImage {
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub boxes: Vec<PseudoBox>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PseudoBox {
    pub class: String,
    /// x1, y1, x2, y2 in image pixels.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Scored under the threshold but at or above the ignore threshold: a region the loss
    /// ignores rather than teaching it as background.
    #[serde(default)]
    pub ignore: bool,
}

impl PseudoLabels {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a pseudo-label file", path.display()))
    }

    /// The pseudo-labeled images as training samples; a class the model does not have, or a
    /// box outside its image, is an error naming the file and the image.
    pub fn samples(&self, path: &Path, classes: &[String]) -> Result<Vec<Sample>> {
        self.images
            .iter()
            .map(|image| {
                let objects = image
                    .boxes
                    .iter()
                    .map(|b| {
                        let class_id =
                            classes
                                .iter()
                                .position(|c| *c == b.class)
                                .with_context(|| {
                                    format!(
                                        "{}: image {}: class '{}' is not one of {classes:?}",
                                        path.display(),
                                        image.path.display(),
                                        b.class
                                    )
                                })?;
                        let [x1, y1, x2, y2] = b.bbox;
                        let (w, h) = (image.width as f32, image.height as f32);
                        if !(0.0 <= x1 && x1 < x2 && x2 <= w && 0.0 <= y1 && y1 < y2 && y2 <= h) {
                            bail!(
                                "{}: image {}: box {:?} is not inside its {}x{} pixels",
                                path.display(),
                                image.path.display(),
                                b.bbox,
                                image.width,
                                image.height
                            );
                        }
                        Ok(Object {
                            class_id,
                            bbox: b.bbox,
                            difficult: false,
                            id: None,
                            ignore: b.ignore,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Sample {
                    stem: image
                        .path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    image_path: image.path.clone(),
                    width: image.width,
                    height: image.height,
                    objects,
                })
            })
            .collect()
    }
}

/// How many times `labeled` images are repeated beside `pseudo` ones so that they make about
/// `share` of an epoch (at least once).
pub fn labeled_repeats(labeled: usize, pseudo: usize, share: f64) -> usize {
    if labeled == 0 || pseudo == 0 || share <= 0.0 {
        return 1;
    }
    let share = share.min(0.95);
    let r = share * pseudo as f64 / ((1.0 - share) * labeled as f64);
    (r.round() as usize).max(1)
}

/// Pseudo-label precision and recall at one threshold, against labels the pool really has
/// (the `rest` source only): matched boxes of the same class at IoU >= 0.5.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PseudoQuality {
    pub threshold: f32,
    pub images: usize,
    pub boxes: usize,
    pub precision: f64,
    pub recall: f64,
}

/// What one round trained on and scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: usize,
    pub steps: usize,
    pub labeled_images: usize,
    pub labeled_repeats: usize,
    pub pseudo_images: usize,
    pub pseudo_boxes: usize,
    pub pool: usize,
    /// The pseudo-labels' quality at several thresholds (when the pool's labels are known).
    pub quality: Vec<PseudoQuality>,
    pub val_map50: f64,
    pub val_map50_95: f64,
}

/// What a self-training run returns.
#[derive(Debug)]
pub struct Outcome {
    pub rounds: Vec<RoundSummary>,
    pub stopped: bool,
}

#[derive(Serialize, Deserialize)]
struct Started {
    finetune: FinetuneConfig,
    self_train: SelfTrainConfig,
}

/// The unlabeled pool: images with the labels they really have (`rest`) or none (a folder).
/// Images of the validation split and the labeled images are never in it.
pub fn unlabeled_pool(
    config: &FinetuneConfig,
    source: &Unlabeled,
    classes: &[String],
) -> Result<(Vec<Sample>, Vec<String>)> {
    let (labeled, val, _) = finetune::load_splits(config, classes)?;
    let exclude: HashSet<&str> = labeled
        .iter()
        .chain(&val)
        .map(|s| s.stem.as_str())
        .collect();
    let mut notes = Vec::new();
    let pool = match source {
        Unlabeled::Rest => {
            if config.shots.is_none() {
                bail!(
                    "--unlabeled rest is the training images not drawn as shots: it needs --shots"
                );
            }
            let dataset = voc::load(&config.data, classes)?;
            let (train, _) = data::split(&dataset, config.val_fraction, config.split_seed);
            train
                .into_iter()
                .filter(|s| !exclude.contains(s.stem.as_str()))
                .collect::<Vec<_>>()
        }
        Unlabeled::Folder(dir) => {
            let images_dir = if dir.join("images").is_dir() {
                dir.join("images")
            } else {
                dir.clone()
            };
            let mut pool = Vec::new();
            let mut excluded = 0;
            for (stem, image_path) in voc::list_images(&images_dir)? {
                if exclude.contains(stem.as_str()) {
                    excluded += 1;
                    continue;
                }
                match image::image_dimensions(&image_path) {
                    Ok((width, height)) => pool.push(Sample {
                        stem,
                        image_path,
                        width,
                        height,
                        objects: Vec::new(),
                    }),
                    Err(e) => notes.push(format!(
                        "{}: cannot read image ({e}), left out of the unlabeled pool",
                        image_path.display()
                    )),
                }
            }
            if excluded > 0 {
                notes.push(format!(
                    "{}: {excluded} images share a name with a labeled or validation image, left out of the unlabeled pool",
                    images_dir.display()
                ));
            }
            pool
        }
    };
    if pool.is_empty() {
        bail!("the unlabeled pool ({source:?}) has no images");
    }
    Ok((pool, notes))
}

/// Runs `teacher` over `pool` and keeps the boxes scored at or above `threshold`. Images that
/// cannot be decoded are left out with a warning naming them. Returns the labels and, when the
/// pool carries its real labels, their quality at `threshold` and a few others.
pub fn pseudo_label(
    teacher_path: &Path,
    pool: &[Sample],
    threshold: f32,
    ignore_threshold: Option<f32>,
    batch_size: usize,
    device: &Device,
) -> Result<(PseudoLabels, Vec<PseudoQuality>)> {
    let mut teacher = Detector::load(teacher_path, device)
        .with_context(|| format!("loading the teacher {}", teacher_path.display()))?;
    let mut thresholds = vec![0.3f32, 0.4, 0.5, 0.6, 0.7];
    if !thresholds.iter().any(|t| (t - threshold).abs() < 1e-6) {
        thresholds.push(threshold);
        thresholds.sort_by(f32::total_cmp);
    }
    let keep_from = ignore_threshold.unwrap_or(threshold).min(threshold);
    teacher.config.score_threshold = thresholds[0].min(keep_from);
    let preprocess = teacher.config.preprocess.clone();
    let [h, w] = preprocess.input_size;
    let mut detections = vec![Vec::new(); pool.len()];
    let indices: Vec<usize> = (0..pool.len()).collect();
    let bar = crate::progress::bar(pool.len() as u64, "pseudo-labels");
    for chunk in indices.chunks(batch_size.max(1)) {
        let seeds = vec![0; chunk.len()];
        // A batch with an undecodable image is run image by image, so only that one is lost.
        let batches = match data::loader::make_batch(pool, chunk, &preprocess, None, &seeds) {
            Ok(batch) => vec![(chunk.to_vec(), batch)],
            Err(_) => chunk
                .iter()
                .filter_map(|&i| {
                    match data::loader::make_batch(pool, &[i], &preprocess, None, &[0]) {
                        Ok(batch) => Some((vec![i], batch)),
                        Err(e) => {
                            tracing::warn!("{e}: left out of the pseudo-labels");
                            None
                        }
                    }
                })
                .collect(),
        };
        for (images, batch) in batches {
            let input = Tensor::<4>::from_data(
                TensorData::new(batch.pixels, [batch.count, 3, h, w]),
                device,
            );
            let output = teacher.model.forward(input);
            for (i, dets) in images
                .into_iter()
                .zip(teacher.postprocess(output, &batch.inverses))
            {
                detections[i] = dets;
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let classes = &teacher.config.classes;
    let images = pool
        .iter()
        .zip(&detections)
        .filter_map(|(sample, dets)| {
            let boxes: Vec<PseudoBox> = dets
                .iter()
                .filter(|d| d.score >= keep_from)
                .filter_map(|d| {
                    // Clipped to the image; a box with nothing left inside it is dropped.
                    let (wf, hf) = (sample.width as f32, sample.height as f32);
                    let b = [
                        d.x1.clamp(0.0, wf),
                        d.y1.clamp(0.0, hf),
                        d.x2.clamp(0.0, wf),
                        d.y2.clamp(0.0, hf),
                    ];
                    (b[2] - b[0] >= 1.0 && b[3] - b[1] >= 1.0).then(|| PseudoBox {
                        class: classes[d.class_id].clone(),
                        bbox: b,
                        score: d.score,
                        ignore: d.score < threshold,
                    })
                })
                .collect();
            // An image with only unsure boxes teaches nothing: left out.
            boxes.iter().any(|b| !b.ignore).then(|| PseudoImage {
                path: sample.image_path.clone(),
                width: sample.width,
                height: sample.height,
                boxes,
            })
        })
        .collect();
    let has_truth = pool.iter().any(|s| !s.objects.is_empty());
    let quality = if has_truth {
        thresholds
            .iter()
            .map(|&t| quality_at(pool, &detections, t))
            .collect()
    } else {
        Vec::new()
    };
    Ok((
        PseudoLabels {
            teacher: teacher_path.to_path_buf(),
            threshold,
            pool: pool.len(),
            images,
        },
        quality,
    ))
}

/// Precision and recall of the detections scored at or above `threshold` against the pool's
/// real labels (greedy by score, same class, IoU >= 0.5; `difficult` boxes neither count nor
/// are missed).
pub fn quality_at(
    pool: &[Sample],
    detections: &[Vec<edge_detector::Detection>],
    threshold: f32,
) -> PseudoQuality {
    let (mut kept, mut true_pos, mut truth, mut images) = (0usize, 0usize, 0usize, 0usize);
    for (sample, dets) in pool.iter().zip(detections) {
        let mut dets: Vec<_> = dets.iter().filter(|d| d.score >= threshold).collect();
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
        images += usize::from(!dets.is_empty());
        truth += sample.objects.iter().filter(|o| !o.difficult).count();
        let mut used = vec![false; sample.objects.len()];
        for d in dets {
            let pred = [d.x1 as f64, d.y1 as f64, d.x2 as f64, d.y2 as f64];
            let best = sample
                .objects
                .iter()
                .enumerate()
                .filter(|(j, o)| o.class_id == d.class_id && !used[*j])
                .map(|(j, o)| (j, eval::iou(&pred, &o.bbox.map(|v| v as f64))))
                .filter(|&(_, iou)| iou >= 0.5)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((j, _)) => {
                    used[j] = true;
                    if !sample.objects[j].difficult {
                        kept += 1;
                        true_pos += 1;
                    }
                }
                None => kept += 1,
            }
        }
    }
    PseudoQuality {
        threshold,
        images,
        boxes: kept,
        precision: true_pos as f64 / kept.max(1) as f64,
        recall: true_pos as f64 / truth.max(1) as f64,
    }
}

/// The optimizer steps a fine-tuning run of `config` on `images` training images takes.
fn planned_steps(config: &FinetuneConfig, images: usize) -> usize {
    let per_epoch = (images / config.batch_size).max(1);
    let all = per_epoch * config.epochs;
    config.max_steps.unwrap_or(all).min(all)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs (or resumes) a self-training run in `run_dir`.
pub fn run(
    base: &FinetuneConfig,
    st: &SelfTrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    stop: Arc<AtomicBool>,
) -> Result<Outcome> {
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    let started_path = run_dir.join("self-train.json");
    let (base, st) = if started_path.exists() {
        if !resume {
            bail!(
                "{} already holds a self-training run: pass --resume to continue it, or choose another --out",
                run_dir.display()
            );
        }
        let started: Started = serde_json::from_slice(&std::fs::read(&started_path)?)
            .with_context(|| format!("reading {}", started_path.display()))?;
        (started.finetune, started.self_train)
    } else {
        if !(st.threshold > 0.0 && st.threshold < 1.0) {
            bail!(
                "--pseudo-threshold {}: give a score in (0, 1)",
                st.threshold
            );
        }
        if !(st.labeled_share > 0.0 && st.labeled_share < 1.0) {
            bail!(
                "--labeled-share {}: give a share in (0, 1)",
                st.labeled_share
            );
        }
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let started = Started {
            finetune: base.clone(),
            self_train: st.clone(),
        };
        write_json(&started_path, &started)?;
        (started.finetune, started.self_train)
    };
    // The pool is read before round 0 trains, so that a bad --unlabeled fails at once.
    let (pool, notes) = unlabeled_pool(&base, &st.unlabeled, &classes)?;
    for note in notes.iter().take(20) {
        tracing::warn!("{note}");
    }
    let (labeled, _, _) = finetune::load_splits(&base, &classes)?;
    tracing::info!(
        "self-training: {} labeled images, {} unlabeled, {} rounds after the first",
        labeled.len(),
        pool.len(),
        st.rounds
    );
    let round0_steps = planned_steps(&base, labeled.len());
    let steps = st.steps.unwrap_or(round0_steps);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))?;
    let rounds_path = run_dir.join("rounds.json");
    let mut rounds: Vec<RoundSummary> = if rounds_path.exists() {
        serde_json::from_slice(&std::fs::read(&rounds_path)?)
            .with_context(|| format!("reading {}", rounds_path.display()))?
    } else {
        Vec::new()
    };
    let mut total_steps: usize = rounds.iter().map(|r| r.steps).sum();
    for round in rounds.len()..=st.rounds {
        let dir = run_dir.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir)?;
        let mut config = base.clone();
        let mut summary = RoundSummary {
            round,
            steps: round0_steps,
            labeled_images: labeled.len(),
            labeled_repeats: 1,
            pseudo_images: 0,
            pseudo_boxes: 0,
            pool: pool.len(),
            quality: Vec::new(),
            val_map50: 0.0,
            val_map50_95: 0.0,
        };
        if round > 0 {
            let teacher = run_dir
                .join(format!("round-{}", round - 1))
                .join("model.safetensors");
            let labels_path = dir.join("pseudo-labels.json");
            let quality_path = dir.join("pseudo-quality.json");
            if !labels_path.exists() {
                tracing::info!(
                    "round {round}: pseudo-labeling {} images with {}",
                    pool.len(),
                    teacher.display()
                );
                let (labels, quality) = pseudo_label(
                    &teacher,
                    &pool,
                    st.threshold,
                    st.ignore_threshold,
                    base.batch_size,
                    device,
                )?;
                write_json(&quality_path, &quality)?;
                write_json(&labels_path, &labels)?;
            }
            let labels = PseudoLabels::read(&labels_path)?;
            if labels.images.is_empty() {
                bail!(
                    "round {round}: no unlabeled image has a box scored {} or more by {}: lower --pseudo-threshold",
                    st.threshold,
                    teacher.display()
                );
            }
            summary.quality = if quality_path.exists() {
                serde_json::from_slice(&std::fs::read(&quality_path)?)?
            } else {
                Vec::new()
            };
            summary.pseudo_images = labels.images.len();
            summary.pseudo_boxes = labels
                .images
                .iter()
                .flat_map(|i| &i.boxes)
                .filter(|b| !b.ignore)
                .count();
            summary.labeled_repeats =
                labeled_repeats(labeled.len(), labels.images.len(), st.labeled_share);
            let images = labeled.len() * summary.labeled_repeats + labels.images.len();
            let per_epoch = (images / base.batch_size).max(1);
            config.init = Some(teacher);
            config.pseudo_labels = Some(labels_path);
            config.labeled_share = st.labeled_share;
            config.epochs = steps.div_ceil(per_epoch);
            config.max_steps = Some(steps);
            config.warmup_epochs = 0.05 * steps as f64 / per_epoch as f64;
            config.eval_every = config.epochs;
            // A backbone frozen for the whole of round 0 stays frozen; one that trained in
            // round 0 trains from the start.
            config.freeze_backbone_epochs = if base.freeze_backbone_epochs >= base.epochs {
                config.epochs
            } else {
                0
            };
            summary.steps = steps;
            if let Some(q) = summary
                .quality
                .iter()
                .find(|q| (q.threshold - st.threshold).abs() < 1e-6)
            {
                tracing::info!(
                    "round {round}: {} pseudo-labeled images, {} boxes (precision {:.3}, recall {:.3} against the pool's real labels)",
                    summary.pseudo_images,
                    summary.pseudo_boxes,
                    q.precision,
                    q.recall
                );
            } else {
                tracing::info!(
                    "round {round}: {} pseudo-labeled images, {} boxes",
                    summary.pseudo_images,
                    summary.pseudo_boxes
                );
            }
        }
        let resume_round = dir.join("checkpoint").join("state.json").exists();
        let outcome = finetune::run(&config, &dir, device, resume_round, stop.clone())?;
        if outcome.stopped {
            return Ok(Outcome {
                rounds,
                stopped: true,
            });
        }
        let report = outcome
            .last_report
            .context("a finished round has a validation report")?;
        summary.val_map50 = report.map50;
        summary.val_map50_95 = report.map50_95;
        total_steps += outcome.state.step;
        crate::report::write(&report, &dir.join("report"), "validation")?;
        tracing::info!(
            "round {round}: validation mAP@0.5 {:.4}, mAP@[.5:.95] {:.4}",
            report.map50,
            report.map50_95
        );
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"round": round, "epoch": outcome.state.epoch, "step": total_steps,
                "val_map50": report.map50, "val_map50_95": report.map50_95,
                "pseudo_images": summary.pseudo_images, "pseudo_boxes": summary.pseudo_boxes})
        )?;
        rounds.push(summary);
        write_json(&rounds_path, &rounds)?;
    }
    let last = run_dir
        .join(format!("round-{}", st.rounds))
        .join("model.safetensors");
    std::fs::copy(&last, run_dir.join("model.safetensors"))
        .with_context(|| format!("copying {}", last.display()))?;
    Ok(Outcome {
        rounds,
        stopped: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labeled_images_are_repeated_to_their_share() {
        assert_eq!(labeled_repeats(60, 1000, 0.5), 17);
        assert_eq!(labeled_repeats(60, 30, 0.5), 1, "at least once");
        assert_eq!(labeled_repeats(60, 0, 0.5), 1);
        assert_eq!(labeled_repeats(10, 90, 0.25), 3);
    }

    fn sample(objects: Vec<Object>) -> Sample {
        Sample {
            stem: "a".into(),
            image_path: "a.jpg".into(),
            width: 100,
            height: 100,
            objects,
        }
    }

    fn det(bbox: [f32; 4], class_id: usize, score: f32) -> edge_detector::Detection {
        edge_detector::Detection {
            x1: bbox[0],
            y1: bbox[1],
            x2: bbox[2],
            y2: bbox[3],
            class_id,
            score,
        }
    }

    #[test]
    fn quality_counts_matches_of_the_same_class_once() {
        let truth = vec![
            Object {
                class_id: 0,
                bbox: [0.0, 0.0, 10.0, 10.0],
                difficult: false,
                id: None,
                ignore: false,
            },
            Object {
                class_id: 1,
                bbox: [50.0, 50.0, 60.0, 60.0],
                difficult: false,
                id: None,
                ignore: false,
            },
        ];
        let pool = vec![sample(truth)];
        let dets = vec![vec![
            det([0.0, 0.0, 10.0, 10.0], 0, 0.9),   // hit
            det([0.0, 0.0, 10.0, 11.0], 0, 0.8),   // duplicate: a false positive
            det([50.0, 50.0, 60.0, 60.0], 0, 0.7), // wrong class
            det([50.0, 50.0, 60.0, 60.0], 1, 0.2), // right, under the threshold
        ]];
        let q = quality_at(&pool, &dets, 0.5);
        assert_eq!((q.images, q.boxes), (1, 3));
        assert!((q.precision - 1.0 / 3.0).abs() < 1e-9);
        assert!((q.recall - 0.5).abs() < 1e-9);
        let q = quality_at(&pool, &dets, 0.1);
        assert!((q.recall - 1.0).abs() < 1e-9);
    }

    #[test]
    fn pseudo_labels_with_unknown_classes_or_boxes_outside_are_errors() {
        let mut labels = PseudoLabels {
            teacher: "t".into(),
            threshold: 0.5,
            pool: 1,
            images: vec![PseudoImage {
                path: "dir/x_1.jpg".into(),
                width: 20,
                height: 20,
                boxes: vec![PseudoBox {
                    class: "scratches".into(),
                    bbox: [1.0, 1.0, 5.0, 5.0],
                    score: 0.6,
                    ignore: false,
                }],
            }],
        };
        let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
        let p = Path::new("p.json");
        let samples = labels.samples(p, &classes).unwrap();
        assert_eq!(samples[0].stem, "x_1");
        assert_eq!(samples[0].objects[0].class_id, 5);
        labels.images[0].boxes[0].class = "dents".into();
        let e = labels.samples(p, &classes).unwrap_err().to_string();
        assert!(
            e.contains("p.json") && e.contains("x_1.jpg") && e.contains("dents"),
            "{e}"
        );
        labels.images[0].boxes[0].class = "scratches".into();
        labels.images[0].boxes[0].bbox = [1.0, 1.0, 25.0, 5.0];
        let e = labels.samples(p, &classes).unwrap_err().to_string();
        assert!(e.contains("not inside"), "{e}");
    }
}
