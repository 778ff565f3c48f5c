//! Noisy labels. Real annotations are messy: a box drawn around the wrong place, a defect given
//! the wrong class. With `--noisy-labels SHARE` the trainer keeps, for every labeled box, a
//! running measure of how much the model disagrees with it (`(1 - IoU) + (1 - p(class))` at the
//! locations it is assigned to, averaged over the epochs it was seen), and after a warm-up sets
//! aside the `SHARE` of each class's boxes it disagrees with most (small-loss selection, per class
//! so that hard classes are not dropped wholesale): their locations weigh `weight` in the loss
//! (0: ignored, neither defect nor background). The selection is made again at every epoch, so a
//! box comes back once the model agrees with it. The boxes set aside at the end are listed in
//! `RUN/noisy-labels.json`, for a person to review.
//!
//! `trainer corrupt-labels` writes a copy of a VOC folder with a share of its training boxes
//! made wrong (class or place), to measure what the option recovers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{self, Sample, voc};

/// `--noisy-labels` and its companions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoisyLabelConfig {
    /// Share of each class's boxes set aside.
    pub share: f64,
    /// Epochs of plain training before the first selection.
    pub warmup_epochs: usize,
    /// Loss weight of a box set aside.
    pub weight: f32,
}

/// Each labeled box's running disagreement and current weight, by box id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoxFilter {
    class: Vec<usize>,
    disagreement: Vec<Option<f32>>,
    weight: Vec<f32>,
}

/// Weight of the running mean kept at each new observation.
const KEEP: f32 = 0.6;

impl BoxFilter {
    /// A filter over boxes `0..classes.len()`, `classes[id]` the class each is labeled with.
    pub fn new(classes: Vec<usize>) -> Self {
        let n = classes.len();
        Self {
            class: classes,
            disagreement: vec![None; n],
            weight: vec![1.0; n],
        }
    }

    pub fn observe(&mut self, id: u32, value: f32) {
        if let Some(d) = self.disagreement.get_mut(id as usize) {
            *d = Some(match *d {
                Some(old) => KEEP * old + (1.0 - KEEP) * value,
                None => value,
            });
        }
    }

    pub fn weight(&self, id: u32) -> f32 {
        self.weight.get(id as usize).copied().unwrap_or(1.0)
    }

    /// Sets aside `config.share` of each class's seen boxes, those with the highest
    /// disagreement; the others weigh 1. Returns how many are set aside.
    pub fn select(&mut self, config: &NoisyLabelConfig) -> usize {
        self.weight.iter_mut().for_each(|w| *w = 1.0);
        let classes = self.class.iter().copied().max().map_or(0, |m| m + 1);
        let mut set_aside = 0;
        for class in 0..classes {
            let mut seen: Vec<(usize, f32)> = (0..self.class.len())
                .filter(|&i| self.class[i] == class)
                .filter_map(|i| self.disagreement[i].map(|d| (i, d)))
                .collect();
            seen.sort_by(|a, b| b.1.total_cmp(&a.1));
            let n = (seen.len() as f64 * config.share).round() as usize;
            for &(i, _) in seen.iter().take(n) {
                self.weight[i] = config.weight;
                set_aside += 1;
            }
        }
        set_aside
    }

    /// The boxes set aside, with their disagreement, most disagreed first.
    pub fn set_aside(&self) -> Vec<(usize, f32)> {
        let mut out: Vec<(usize, f32)> = (0..self.class.len())
            .filter(|&i| self.weight[i] != 1.0)
            .map(|i| (i, self.disagreement[i].unwrap_or(0.0)))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }
}

/// Gives every box of `samples` an id (its place in that order) and returns the filter for them.
pub fn track(samples: &mut [Sample]) -> BoxFilter {
    let mut classes = Vec::new();
    for o in samples.iter_mut().flat_map(|s| s.objects.iter_mut()) {
        o.id = Some(classes.len() as u32);
        classes.push(o.class_id);
    }
    BoxFilter::new(classes)
}

/// A box set aside at the end of a run, as listed in `RUN/noisy-labels.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetAside {
    pub image: PathBuf,
    pub class: String,
    pub bbox: [f32; 4],
    pub disagreement: f32,
}

pub fn set_aside_list(filter: &BoxFilter, samples: &[Sample], classes: &[String]) -> Vec<SetAside> {
    let boxes: Vec<(&Sample, &data::Object)> = samples
        .iter()
        .flat_map(|s| s.objects.iter().map(move |o| (s, o)))
        .collect();
    filter
        .set_aside()
        .into_iter()
        .filter_map(|(id, d)| {
            let (s, o) = boxes.iter().find(|(_, o)| o.id == Some(id as u32))?;
            Some(SetAside {
                image: s.image_path.clone(),
                class: classes[o.class_id].clone(),
                bbox: o.bbox,
                disagreement: d,
            })
        })
        .collect()
}

/// One box made wrong by `corrupt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Corruption {
    pub image: String,
    pub kind: String,
    pub class: String,
    pub bbox: [f32; 4],
    pub true_class: String,
    pub true_bbox: [f32; 4],
}

/// Makes `rate` of the boxes of the training split wrong, half by class (another class drawn
/// uniformly) and half by place (the box moved by 60-100% of its size along x or y, kept
/// inside the image, so that it overlaps the defect by less than half). The validation split
/// is left as it is. Returns the samples, corrupted, and what was changed.
pub fn corrupt(
    dataset: &voc::Dataset,
    val_fraction: f64,
    split_seed: u64,
    rate: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Corruption>) {
    let (train, val) = data::split(dataset, val_fraction, split_seed);
    let classes = &dataset.classes;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut changes = Vec::new();
    let mut out = val;
    for mut sample in train {
        for o in &mut sample.objects {
            if !rng.random_bool(rate) {
                continue;
            }
            let (true_class, true_bbox) = (o.class_id, o.bbox);
            let kind = if rng.random_bool(0.5) && classes.len() > 1 {
                let other = rng.random_range(0..classes.len() - 1);
                o.class_id = if other >= o.class_id {
                    other + 1
                } else {
                    other
                };
                "class"
            } else {
                let [x1, y1, x2, y2] = o.bbox;
                let (w, h) = (x2 - x1, y2 - y1);
                let (iw, ih) = (sample.width as f32, sample.height as f32);
                let along_x = rng.random_bool(0.5);
                let (size, room_lo, room_hi) = if along_x {
                    (w, x1, iw - x2)
                } else {
                    (h, y1, ih - y2)
                };
                let shift = size * rng.random_range(0.6..1.0f32);
                // Towards the side with room; a box that fills the image stays (no corruption).
                let delta = if room_hi >= shift && (room_lo < shift || rng.random_bool(0.5)) {
                    shift
                } else if room_lo >= shift {
                    -shift
                } else {
                    continue;
                };
                if along_x {
                    o.bbox = [x1 + delta, y1, x2 + delta, y2];
                } else {
                    o.bbox = [x1, y1 + delta, x2, y2 + delta];
                }
                "place"
            };
            changes.push(Corruption {
                image: sample.stem.clone(),
                kind: kind.to_string(),
                class: classes[o.class_id].clone(),
                bbox: o.bbox,
                true_class: classes[true_class].clone(),
                true_bbox,
            });
        }
        out.push(sample);
    }
    out.sort_by(|a, b| a.stem.cmp(&b.stem));
    (out, changes)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `samples` as a VOC folder: `images/` (hard links to the originals, copies where a
/// link cannot be made) and `annotations/`.
pub fn write_voc(samples: &[Sample], classes: &[String], out: &Path) -> Result<()> {
    let (images, annotations) = (out.join("images"), out.join("annotations"));
    for dir in [&images, &annotations] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for s in samples {
        let name = s
            .image_path
            .file_name()
            .context("an image path without a file name")?;
        let target = images.join(name);
        if !target.exists() && std::fs::hard_link(&s.image_path, &target).is_err() {
            std::fs::copy(&s.image_path, &target)
                .with_context(|| format!("copying {}", s.image_path.display()))?;
        }
        let mut xml = format!(
            "<annotation>\n  <filename>{}</filename>\n  <size><width>{}</width><height>{}</height><depth>3</depth></size>\n",
            xml_escape(&name.to_string_lossy()),
            s.width,
            s.height
        );
        for o in &s.objects {
            let [x1, y1, x2, y2] = o.bbox.map(|v| v.round() as i64);
            xml.push_str(&format!(
                "  <object>\n    <name>{}</name>\n    <difficult>{}</difficult>\n    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>\n  </object>\n",
                xml_escape(&classes[o.class_id]),
                u8::from(o.difficult)
            ));
        }
        xml.push_str("</annotation>\n");
        let path = annotations.join(format!("{}.xml", s.stem));
        std::fs::write(&path, xml).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Object;

    fn config(share: f64) -> NoisyLabelConfig {
        NoisyLabelConfig {
            share,
            warmup_epochs: 0,
            weight: 0.0,
        }
    }

    #[test]
    fn the_most_disagreed_boxes_of_each_class_are_set_aside() {
        // Class 0: boxes 0-4, class 1: boxes 5-9; box 2 and box 7 disagree most.
        let mut f = BoxFilter::new(vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
        for id in 0..10 {
            f.observe(id, 0.1 * (id % 5) as f32 * 0.1);
        }
        f.observe(2, 2.0);
        f.observe(7, 1.9);
        assert_eq!(f.select(&config(0.2)), 2);
        assert_eq!(f.weight(2), 0.0);
        assert_eq!(f.weight(7), 0.0);
        assert_eq!(f.weight(0), 1.0);
        assert_eq!(
            f.set_aside().iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![2, 7]
        );
        // It comes back once the model agrees with it for a while.
        for _ in 0..10 {
            f.observe(2, 0.0);
        }
        f.select(&config(0.2));
        assert_eq!(f.weight(2), 1.0);
        assert_eq!(f.weight(4), 0.0, "box 4 is now class 0's most disagreed");
    }

    #[test]
    fn boxes_never_seen_are_not_set_aside() {
        let mut f = BoxFilter::new(vec![0; 10]);
        f.observe(3, 1.0);
        assert_eq!(
            f.select(&config(0.5)),
            1,
            "half of the one seen box, rounded"
        );
        assert_eq!(f.weight(3), 0.0);
    }

    fn dataset() -> voc::Dataset {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let samples = (0..50)
            .map(|i| Sample {
                stem: format!("{}_{i}", classes[i % 3]),
                image_path: PathBuf::from(format!("{i}.jpg")),
                width: 200,
                height: 200,
                objects: vec![Object {
                    class_id: i % 3,
                    bbox: [40.0, 40.0, 80.0, 100.0],
                    difficult: false,
                    id: None,
                    ignore: false,
                }],
            })
            .collect();
        voc::Dataset {
            root: PathBuf::new(),
            classes,
            samples,
            warnings: vec![],
        }
    }

    #[test]
    fn corruption_touches_only_the_training_split_and_makes_boxes_wrong() {
        let d = dataset();
        let (samples, changes) = corrupt(&d, 0.2, 42, 0.5, 1);
        assert_eq!(samples.len(), 50);
        let (_, val) = data::split(&d, 0.2, 42);
        let corrupted: std::collections::HashSet<&str> =
            changes.iter().map(|c| c.image.as_str()).collect();
        assert!(val.iter().all(|v| !corrupted.contains(v.stem.as_str())));
        assert!(
            changes.len() > 10 && changes.len() < 30,
            "{}",
            changes.len()
        );
        for c in &changes {
            match c.kind.as_str() {
                "class" => assert_ne!(c.class, c.true_class),
                _ => {
                    let iou = crate::eval::iou(&c.bbox.map(f64::from), &c.true_bbox.map(f64::from));
                    assert!(iou < 0.5, "{c:?}");
                    assert!(c.bbox[0] >= 0.0 && c.bbox[2] <= 200.0 && c.bbox[3] <= 200.0);
                }
            }
        }
        assert_eq!(
            corrupt(&d, 0.2, 42, 0.5, 1).1.len(),
            changes.len(),
            "deterministic"
        );
    }
}
