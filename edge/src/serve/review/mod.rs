//! The review queue behind the labeling page: frames a quality engineer should look at (failed
//! ones, ones whose top score falls in an uncertain band, a sample of passes), stored in sled
//! with their JPEG, a thumbnail and the model's predictions; the labels engineers save (boxes or
//! "no defect", who and when); and the export of the labeled set in the NEU-DET VOC layout.
//!
//! Bounds: at most `max_pending` unlabeled frames (the oldest unlabeled one makes room for a new
//! one); labeled frames are never dropped to make room: once `max_labeled` are kept, new frames
//! are not queued until some are exported and discarded.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use image::GrayImage;
use protocol::{Defect, Verdict};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use sled::Transactional;

use crate::verdicts::store::{jpeg, key};

mod config;
mod export;
mod heatmap;

pub use config::ReviewConfig;
pub use heatmap::heatmap_png;

/// Why a frame is in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Failed,
    Uncertain,
    Sample,
}

/// A box drawn by an engineer, in frame pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelBox {
    pub class: String,
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
}

/// What an engineer saved. No boxes: the frame has no defect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub boxes: Vec<LabelBox>,
    pub by: String,
    pub at_ms: u64,
}

/// Body of `PUT /api/review/{id}/label`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    #[serde(default)]
    pub boxes: Vec<LabelBox>,
    /// Required (true) when `boxes` is empty: an explicit "no defect".
    #[serde(default)]
    pub no_defect: bool,
}

/// Most boxes one frame may carry.
pub const MAX_BOXES: usize = 200;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The verdict id.
    pub id: u64,
    pub reason: Reason,
    pub queued_ms: u64,
    pub frame: u64,
    pub origin: String,
    pub width: u32,
    pub height: u32,
    pub top_score: f32,
    pub model: Option<(String, u64)>,
    pub predictions: Vec<Defect>,
    pub label: Option<Label>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("no frame {0} in the review queue")]
    NotFound(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("review store: {0}")]
    Store(String),
}

impl From<sled::Error> for ReviewError {
    fn from(e: sled::Error) -> Self {
        ReviewError::Store(e.to_string())
    }
}

#[derive(Default)]
pub struct ReviewStats {
    pub queued: AtomicU64,
    pub evicted: AtomicU64,
    /// Frames not queued because `max_labeled` labeled frames wait for export.
    pub refused_full: AtomicU64,
}

pub struct ReviewQueue {
    db: sled::Db,
    items: sled::Tree,
    pending: sled::Tree,
    labeled: sled::Tree,
    /// key: id (8 bytes BE) + kind (0 frame JPEG, 1 thumbnail JPEG).
    images: sled::Tree,
    /// key: id -> model sha256 (64 bytes) + PNG.
    heatmaps: sled::Tree,
    pub config: ReviewConfig,
    rng: Mutex<StdRng>,
    pub stats: ReviewStats,
    /// Sizes of `pending` and `labeled`, kept beside them: sled's `len` scans the whole tree,
    /// and the inference thread asks for every frame it queues.
    pending_count: AtomicUsize,
    labeled_count: AtomicUsize,
}

fn image_key(id: u64, kind: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&id.to_be_bytes());
    k[8] = kind;
    k
}

fn id_of(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8]))
}

pub const THUMBNAIL: (u32, u32) = (240, 160);

impl ReviewQueue {
    pub fn open(path: &Path, config: ReviewConfig) -> Result<Self, ReviewError> {
        config.validate().map_err(ReviewError::Invalid)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 << 20)
            .open()
            .map_err(|e| ReviewError::Store(format!("{}: {e}", path.display())))?;
        let (pending, labeled) = (db.open_tree("pending")?, db.open_tree("labeled")?);
        Ok(Self {
            items: db.open_tree("items")?,
            pending_count: AtomicUsize::new(pending.len()),
            labeled_count: AtomicUsize::new(labeled.len()),
            pending,
            labeled,
            images: db.open_tree("images")?,
            heatmaps: db.open_tree("heatmaps")?,
            db,
            config,
            rng: Mutex::new(StdRng::from_rng(&mut rand::rng())),
            stats: ReviewStats::default(),
        })
    }

    /// Whether the verdict's frame goes to review, and why.
    pub fn reason_for(&self, verdict: &Verdict) -> Option<Reason> {
        let c = &self.config;
        let top = top_score(verdict);
        let (reason, rate) = if !verdict.pass {
            (Reason::Failed, c.failed_rate)
        } else if top >= c.uncertain[0] && top < c.uncertain[1] {
            (Reason::Uncertain, c.uncertain_rate)
        } else {
            (Reason::Sample, c.pass_rate)
        };
        let draw: f64 = self.rng.lock().expect("lock").random();
        (draw < rate).then_some(reason)
    }

    /// Queues the frame when the rates say so; returns why it was queued.
    pub fn consider(
        &self,
        verdict: &Verdict,
        frame: &GrayImage,
    ) -> Result<Option<Reason>, ReviewError> {
        let Some(reason) = self.reason_for(verdict) else {
            return Ok(None);
        };
        if self.labeled_count.load(Ordering::Relaxed) >= self.config.max_labeled {
            self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let item = Item {
            id: verdict.id,
            reason,
            queued_ms: verdict.decided_ms,
            frame: verdict.frame,
            origin: verdict.origin.clone(),
            width: frame.width(),
            height: frame.height(),
            top_score: top_score(verdict),
            model: verdict.model.clone(),
            predictions: verdict.defects.clone(),
            label: None,
        };
        let (tw, th) = THUMBNAIL;
        let s = (tw as f32 / frame.width() as f32).min(th as f32 / frame.height() as f32);
        let thumb = image::imageops::resize(
            frame,
            ((frame.width() as f32 * s).round() as u32).max(1),
            ((frame.height() as f32 * s).round() as u32).max(1),
            image::imageops::FilterType::Triangle,
        );
        self.images.insert(image_key(item.id, 0), jpeg(frame, 90))?;
        self.images
            .insert(image_key(item.id, 1), jpeg(&thumb, 80))?;
        let k = key(item.id);
        let bytes = serde_json::to_vec(&item).expect("serializable");
        (&self.items, &self.pending)
            .transaction(|(items, pending)| {
                items.insert(&k, bytes.as_slice())?;
                pending.insert(&k, &[])?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| ReviewError::Store(format!("{e:?}")))?;
        self.pending_count.fetch_add(1, Ordering::Relaxed);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        while self.pending_count.load(Ordering::Relaxed) > self.config.max_pending {
            let Some((oldest, _)) = self.pending.first()? else {
                break;
            };
            self.remove(id_of(&oldest))?;
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(reason))
    }

    fn remove(&self, id: u64) -> Result<bool, ReviewError> {
        let k = key(id);
        let existed = self.items.remove(k)?.is_some();
        if self.pending.remove(k)?.is_some() {
            self.pending_count.fetch_sub(1, Ordering::Relaxed);
        }
        if self.labeled.remove(k)?.is_some() {
            self.labeled_count.fetch_sub(1, Ordering::Relaxed);
        }
        self.images.remove(image_key(id, 0))?;
        self.images.remove(image_key(id, 1))?;
        self.heatmaps.remove(k)?;
        Ok(existed)
    }

    /// Removes a frame from review (skipped, or exported and no longer wanted).
    pub fn discard(&self, id: u64) -> Result<bool, ReviewError> {
        let existed = self.remove(id)?;
        self.db.flush()?;
        Ok(existed)
    }

    pub fn get(&self, id: u64) -> Result<Option<Item>, ReviewError> {
        self.items
            .get(key(id))?
            .map(|v| serde_json::from_slice(&v).map_err(|e| ReviewError::Store(e.to_string())))
            .transpose()
    }

    /// `[pending, labeled]`.
    pub fn counts(&self) -> [usize; 2] {
        [
            self.pending_count.load(Ordering::Relaxed),
            self.labeled_count.load(Ordering::Relaxed),
        ]
    }

    /// Items newest first: pending ones, labeled ones, or both; only ids below `before`.
    pub fn list(
        &self,
        status: Status,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Item>, ReviewError> {
        let tree = match status {
            Status::Pending => &self.pending,
            Status::Labeled => &self.labeled,
            Status::All => &self.items,
        };
        let end = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for entry in tree.range(..key(end)).rev().take(limit) {
            let (k, _) = entry?;
            if let Some(item) = self.get(id_of(&k))? {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// The frame (`thumbnail` false) or its thumbnail, JPEG.
    pub fn jpeg(&self, id: u64, thumbnail: bool) -> Result<Option<Vec<u8>>, ReviewError> {
        Ok(self
            .images
            .get(image_key(id, thumbnail as u8))?
            .map(|v| v.to_vec()))
    }

    /// Validates and saves a label; the frame moves from pending to labeled. Durable on return.
    pub fn label(&self, id: u64, request: LabelRequest, by: &str) -> Result<Item, ReviewError> {
        let mut item = self.get(id)?.ok_or(ReviewError::NotFound(id))?;
        let invalid = |m: String| Err(ReviewError::Invalid(m));
        if request.boxes.is_empty() && !request.no_defect {
            return invalid(
                "no boxes: draw the defects, or mark the frame \"no defect\" (no_defect: true)"
                    .into(),
            );
        }
        if !request.boxes.is_empty() && request.no_defect {
            return invalid("no_defect is true but boxes were sent: choose one".into());
        }
        if request.boxes.len() > MAX_BOXES {
            return invalid(format!(
                "{} boxes: at most {MAX_BOXES} per frame",
                request.boxes.len()
            ));
        }
        let (w, h) = (item.width as f32, item.height as f32);
        let mut boxes = Vec::with_capacity(request.boxes.len());
        for (i, b) in request.boxes.into_iter().enumerate() {
            if !self.config.classes.contains(&b.class) {
                return invalid(format!(
                    "boxes[{i}]: class {:?} is not one of {:?}",
                    b.class, self.config.classes
                ));
            }
            let [x1, y1, x2, y2] = b.bbox;
            if b.bbox.iter().any(|v| !v.is_finite()) {
                return invalid(format!("boxes[{i}]: coordinates must be numbers"));
            }
            // Up to a pixel outside (a drag past the edge) is clipped; more is an error.
            if x1 < -1.0 || y1 < -1.0 || x2 > w + 1.0 || y2 > h + 1.0 {
                return invalid(format!(
                    "boxes[{i}]: [{x1}, {y1}, {x2}, {y2}] is outside the {w}x{h} frame"
                ));
            }
            let bbox = [x1.max(0.0), y1.max(0.0), x2.min(w), y2.min(h)];
            if bbox[2] - bbox[0] < 1.0 || bbox[3] - bbox[1] < 1.0 {
                return invalid(format!(
                    "boxes[{i}]: [{x1}, {y1}, {x2}, {y2}] is empty (x2 > x1 and y2 > y1, at least a pixel)"
                ));
            }
            boxes.push(LabelBox {
                class: b.class,
                bbox,
            });
        }
        item.label = Some(Label {
            boxes,
            by: by.to_string(),
            at_ms: crate::capture::now_ms(),
        });
        let k = key(id);
        let bytes = serde_json::to_vec(&item).expect("serializable");
        let (was_pending, was_labeled) = (&self.items, &self.pending, &self.labeled)
            .transaction(|(items, pending, labeled)| {
                items.insert(&k, bytes.as_slice())?;
                let was_pending = pending.remove(&k)?.is_some();
                let was_labeled = labeled.insert(&k, &[])?.is_some();
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>((
                    was_pending,
                    was_labeled,
                ))
            })
            .map_err(|e| ReviewError::Store(format!("{e:?}")))?;
        if was_pending {
            self.pending_count.fetch_sub(1, Ordering::Relaxed);
        }
        if !was_labeled {
            self.labeled_count.fetch_add(1, Ordering::Relaxed);
        }
        self.db.flush()?;
        Ok(item)
    }

    /// A cached heat map made with the model whose weights hash to `model_sha256`.
    pub fn heatmap(&self, id: u64, model_sha256: &str) -> Result<Option<Vec<u8>>, ReviewError> {
        Ok(self.heatmaps.get(key(id))?.and_then(|v| {
            (v.len() > 64 && &v[..64] == model_sha256.as_bytes()).then(|| v[64..].to_vec())
        }))
    }

    pub fn store_heatmap(
        &self,
        id: u64,
        model_sha256: &str,
        png: &[u8],
    ) -> Result<(), ReviewError> {
        if model_sha256.len() != 64 || self.items.get(key(id))?.is_none() {
            return Ok(());
        }
        let mut v = model_sha256.as_bytes().to_vec();
        v.extend_from_slice(png);
        self.heatmaps.insert(key(id), v)?;
        Ok(())
    }
}

fn top_score(verdict: &Verdict) -> f32 {
    verdict.defects.iter().map(|d| d.score).fold(0f32, f32::max)
}

/// Which items a listing shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Pending,
    Labeled,
    All,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ReviewConfig {
        ReviewConfig {
            labelers: [("anna".to_string(), "0123456789abcdef".to_string())].into(),
            classes: config::default_classes(),
            failed_rate: 1.0,
            uncertain: [0.2, 0.5],
            uncertain_rate: 1.0,
            pass_rate: 0.0,
            max_pending: 3,
            max_labeled: 2,
        }
    }

    fn verdict(id: u64, pass: bool, score: f32) -> Verdict {
        Verdict {
            id,
            device: "cam".into(),
            frame: id,
            line: 0,
            origin: "test".into(),
            width: 100,
            height: 60,
            captured_ms: 1,
            decided_ms: 2,
            latency_ms: 1.0,
            pass,
            defects: vec![Defect {
                class: "scratches".into(),
                score,
                bbox: [10.0, 10.0, 30.0, 40.0],
                fails: !pass,
            }],
            model: Some(("m".into(), 1)),
            undecided: None,
            position_mm: None,
        }
    }

    fn scratch(bbox: [f32; 4]) -> LabelRequest {
        LabelRequest {
            boxes: vec![LabelBox {
                class: "scratches".into(),
                bbox,
            }],
            no_defect: false,
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut c = config();
        c.labelers.insert("bob".into(), "short".into());
        assert!(c.validate().unwrap_err().contains("review.labelers.bob"));
        let mut c = config();
        c.classes.push("bad/name".into());
        assert!(c.validate().unwrap_err().contains("review.classes[6]"));
        let mut c = config();
        c.uncertain = [0.6, 0.5];
        assert!(c.validate().unwrap_err().contains("review.uncertain"));
        let c = config();
        assert_eq!(c.labeler("0123456789abcdef"), Some("anna"));
        assert_eq!(c.labeler("0123456789abcdeX"), None);
        assert_eq!(c.labeler(""), None);
    }

    #[test]
    fn queue_bounds_labels_and_export() {
        let dir = tempfile::tempdir().unwrap();
        let frame = GrayImage::from_fn(100, 60, |x, y| image::Luma([(x + y) as u8]));
        let q = ReviewQueue::open(dir.path(), config()).unwrap();
        // Failed and uncertain frames are queued; a confident pass is not (pass_rate 0).
        assert_eq!(
            q.consider(&verdict(1, false, 0.9), &frame).unwrap(),
            Some(Reason::Failed)
        );
        assert_eq!(
            q.consider(&verdict(2, true, 0.3), &frame).unwrap(),
            Some(Reason::Uncertain)
        );
        assert_eq!(q.consider(&verdict(3, true, 0.05), &frame).unwrap(), None);
        for id in 4..=5 {
            q.consider(&verdict(id, false, 0.9), &frame).unwrap();
        }
        // max_pending 3: the oldest unlabeled frame made room.
        assert_eq!(q.counts(), [3, 0]);
        assert!(q.get(1).unwrap().is_none());
        assert!(q.jpeg(1, false).unwrap().is_none());
        let ids: Vec<u64> = q
            .list(Status::Pending, None, 10)
            .unwrap()
            .iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, vec![5, 4, 2], "newest first");
        let thumb = image::load_from_memory(&q.jpeg(2, true).unwrap().unwrap()).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (240, 144));

        // Bad labels are refused with the reason.
        let err = |r| q.label(2, r, "anna").unwrap_err().to_string();
        assert!(
            err(LabelRequest {
                boxes: vec![],
                no_defect: false
            })
            .contains("no defect")
        );
        assert!(err(scratch([10.0, 10.0, 10.2, 30.0])).contains("empty"));
        assert!(err(scratch([10.0, 10.0, 150.0, 30.0])).contains("outside the 100x60 frame"));
        let mut wrong = scratch([1.0, 1.0, 5.0, 5.0]);
        wrong.boxes[0].class = "dents".into();
        assert!(err(wrong).contains("\"dents\" is not one of"));
        assert!(matches!(
            q.label(99, scratch([1.0, 1.0, 5.0, 5.0]), "anna"),
            Err(ReviewError::NotFound(99))
        ));

        // A label moves the frame to labeled, clipped at the edge, with who and when.
        let item = q
            .label(2, scratch([-0.5, 5.0, 100.5, 20.0]), "anna")
            .unwrap();
        let label = item.label.unwrap();
        assert_eq!(label.by, "anna");
        assert_eq!(label.boxes[0].bbox, [0.0, 5.0, 100.0, 20.0]);
        q.label(
            4,
            LabelRequest {
                boxes: vec![],
                no_defect: true,
            },
            "anna",
        )
        .unwrap();
        assert_eq!(q.counts(), [1, 2]);
        // A second label for the same frame replaces the first; the counts stay.
        q.label(4, scratch([1.0, 1.0, 9.0, 9.0]), "anna").unwrap();
        q.label(
            4,
            LabelRequest {
                boxes: vec![],
                no_defect: true,
            },
            "anna",
        )
        .unwrap();
        assert_eq!(q.counts(), [1, 2]);
        // max_labeled 2 reached: nothing new is queued, labeled frames are kept.
        assert_eq!(q.consider(&verdict(6, false, 0.9), &frame).unwrap(), None);
        assert_eq!(q.stats.refused_full.load(Ordering::Relaxed), 1);

        // Export: NEU-DET layout, one XML per labeled frame, provenance.
        let mut tar_bytes = Vec::new();
        assert_eq!(q.export("cam-01", &mut tar_bytes).unwrap(), 2);
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut files = std::collections::BTreeMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut s).unwrap();
            files.insert(e.path().unwrap().display().to_string(), s);
        }
        let names: Vec<&str> = files.keys().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "annotations/cam-01_2.xml",
                "annotations/cam-01_4.xml",
                "images/cam-01_2.jpg",
                "images/cam-01_4.jpg",
                "labels.jsonl"
            ]
        );
        let xml = String::from_utf8(files["annotations/cam-01_2.xml"].clone()).unwrap();
        assert!(xml.contains("<name>scratches</name>"), "{xml}");
        assert!(
            xml.contains("<xmin>0</xmin>") && xml.contains("<ymax>20</ymax>"),
            "{xml}"
        );
        let clean = String::from_utf8(files["annotations/cam-01_4.xml"].clone()).unwrap();
        assert!(!clean.contains("<object>"));
        let jsonl = String::from_utf8(files["labels.jsonl"].clone()).unwrap();
        assert!(jsonl.contains("\"by\":\"anna\""), "{jsonl}");

        // Reopened: labels survive; a discarded frame is gone.
        drop(q);
        let q =
            crate::verdicts::store::reopen_after_drop(|| ReviewQueue::open(dir.path(), config()));
        assert_eq!(q.counts(), [1, 2]);
        assert!(q.discard(4).unwrap());
        assert!(!q.discard(4).unwrap());
        assert_eq!(q.counts(), [1, 1]);
    }
}
