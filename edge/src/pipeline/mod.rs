//! Frames to verdicts: tiles with overlap at the model's input size ([`tiling`]), batches (max
//! size, max wait), the detector, boxes mapped back to frame coordinates and merged across tile
//! seams, decision rules ([`rules`]), a decision per frame. The frame queue is bounded with an
//! explicit policy ([`queue`]: block the source, or drop the oldest frame) and every drop is
//! counted. [`inspection`] runs it all on two threads.

pub mod inspection;
pub mod queue;
pub mod rules;
pub mod tiling;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_detector::{Detection, ImageView};
use image::GrayImage;
pub use protocol::Defect;
use serde::{Deserialize, Serialize};

use crate::capture::Frame;
use crate::models::ActiveModel;
pub use inspection::Inspection;
pub use queue::{BoundedQueue, DropPolicy};
pub use rules::{ClassRule, Rules};
pub use tiling::{merge_across_seams, tile_starts, tiles};

/// What the pipeline decides about one frame.
#[derive(Clone, Debug)]
pub struct Decision {
    pub frame: Frame,
    pub pass: bool,
    pub defects: Vec<Defect>,
    pub model: Option<(String, u64)>,
    /// Frame taken by the detector stage -> decision, milliseconds (queueing before it is in
    /// `decided_ms - frame.captured_ms`).
    pub latency_ms: f64,
}

/// Counters the daemon exports.
#[derive(Default)]
pub struct PipelineStats {
    pub frames_in: AtomicU64,
    pub frames_done: AtomicU64,
    pub bad_frames: AtomicU64,
    pub tiles: AtomicU64,
    pub batches: AtomicU64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Tile side in frame pixels (the model resizes tiles to its input); 0: the model's input size.
    #[serde(default)]
    pub tile: usize,
    /// Pixels shared by neighbouring tiles.
    #[serde(default = "default_overlap")]
    pub tile_overlap: usize,
    /// Tiles per forward pass.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// How long a partial batch waits for more frames.
    #[serde(default = "default_wait")]
    pub max_wait_ms: u64,
    /// Frames waiting for the detector.
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(default = "default_policy")]
    pub on_full: DropPolicy,
    /// Detections kept per verdict (highest scores first).
    #[serde(default = "default_max_defects")]
    pub max_defects: usize,
}

fn default_overlap() -> usize {
    32
}
fn default_batch() -> usize {
    8
}
fn default_wait() -> u64 {
    10
}
fn default_queue() -> usize {
    8
}
fn default_policy() -> DropPolicy {
    DropPolicy::DropOldest
}
fn default_max_defects() -> usize {
    50
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            tile: 0,
            tile_overlap: default_overlap(),
            max_batch: default_batch(),
            max_wait_ms: default_wait(),
            queue: default_queue(),
            on_full: default_policy(),
            max_defects: default_max_defects(),
        }
    }
}

/// A frame cut into tiles, waiting for detections.
struct InFlight {
    frame: Frame,
    started: Instant,
    tiles: Vec<(u32, u32, GrayImage)>,
    next_tile: usize,
    found: Vec<Detection>,
    done_tiles: usize,
}

/// Runs frames through the active model until `frames` is closed and drained. Blocking: give it
/// a thread. `active` is read per batch, so a model switch takes effect at the next batch.
pub fn run_inference(
    config: &PipelineConfig,
    rules: &Rules,
    frames: &BoundedQueue<Frame>,
    active: &ActiveModel,
    stats: &PipelineStats,
    mut emit: impl FnMut(Decision),
) {
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let wait = Duration::from_millis(config.max_wait_ms);
    loop {
        // Fill the batch: tiles of frames already cut, then new frames within max_wait.
        let mut pending_tiles: usize = inflight.iter().map(|f| f.tiles.len() - f.next_tile).sum();
        let deadline = Instant::now() + wait;
        while pending_tiles < config.max_batch {
            let timeout = if pending_tiles == 0 && inflight.is_empty() {
                Duration::from_millis(200)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            let Some(frame) = frames.pop(timeout) else {
                break;
            };
            let model = active.read().expect("lock").clone();
            let Some((_, detector)) = model else {
                // No model: the frame cannot be judged; count it as not inspected.
                stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("frame {}: no active model, not inspected", frame.seq);
                continue;
            };
            let size = if config.tile > 0 {
                config.tile
            } else {
                detector.config.preprocess.input_size[1]
            };
            let cut = tiles(&frame.image, size, config.tile_overlap.min(size / 2));
            pending_tiles += cut.len();
            inflight.push_back(InFlight {
                frame,
                started: Instant::now(),
                tiles: cut,
                next_tile: 0,
                found: vec![],
                done_tiles: 0,
            });
            if pending_tiles >= config.max_batch {
                break;
            }
        }
        if inflight.is_empty() {
            if frames.is_closed() && frames.is_empty() {
                return;
            }
            continue;
        }
        let model = active.read().expect("lock").clone();
        let Some((installed, detector)) = model else {
            continue;
        };
        // Take up to max_batch tiles, oldest frames first.
        let mut batch: Vec<(usize, usize)> = Vec::new();
        'outer: for (fi, f) in inflight.iter_mut().enumerate() {
            while f.next_tile < f.tiles.len() {
                batch.push((fi, f.next_tile));
                f.next_tile += 1;
                if batch.len() >= config.max_batch {
                    break 'outer;
                }
            }
        }
        let views: Vec<ImageView> = batch
            .iter()
            .map(|&(fi, ti)| ImageView::grey(&inflight[fi].tiles[ti].2))
            .collect();
        let results = match detector.detect(&views) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("detector: {e}");
                vec![vec![]; batch.len()]
            }
        };
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.tiles.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (&(fi, ti), dets) in batch.iter().zip(results) {
            let f = &mut inflight[fi];
            let (ox, oy) = (f.tiles[ti].0 as f32, f.tiles[ti].1 as f32);
            f.found.extend(dets.into_iter().map(|mut d| {
                d.x1 += ox;
                d.x2 += ox;
                d.y1 += oy;
                d.y2 += oy;
                d
            }));
            f.done_tiles += 1;
        }
        while inflight
            .front()
            .is_some_and(|f| f.done_tiles == f.tiles.len())
        {
            let f = inflight.pop_front().expect("front");
            let mut merged = merge_across_seams(f.found, 0.6);
            merged.truncate(config.max_defects);
            let classes = &detector.config.classes;
            let defects: Vec<Defect> = merged
                .iter()
                .map(|d| {
                    let class = classes[d.class_id].clone();
                    Defect {
                        fails: rules.fails(&class, d),
                        class,
                        score: d.score,
                        bbox: [d.x1, d.y1, d.x2, d.y2],
                    }
                })
                .collect();
            stats.frames_done.fetch_add(1, Ordering::Relaxed);
            emit(Decision {
                pass: !defects.iter().any(|d| d.fails),
                defects,
                model: Some((installed.id.clone(), installed.version)),
                latency_ms: f.started.elapsed().as_secs_f64() * 1e3,
                frame: f.frame,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn det(class_id: usize, score: f32, b: [f32; 4]) -> Detection {
        Detection {
            x1: b[0],
            y1: b[1],
            x2: b[2],
            y2: b[3],
            class_id,
            score,
        }
    }

    #[test]
    fn tiles_cover_the_frame_with_overlap() {
        assert_eq!(tile_starts(224, 224, 32), vec![0]);
        assert_eq!(tile_starts(100, 224, 32), vec![0]);
        assert_eq!(tile_starts(500, 224, 32), vec![0, 192, 276]);
        let starts = tile_starts(2048, 224, 32);
        assert_eq!(*starts.last().unwrap(), 2048 - 224);
        for w in starts.windows(2) {
            assert!(w[1] - w[0] <= 192 && w[1] > w[0]);
        }
        let img = GrayImage::new(500, 300);
        let t = tiles(&img, 224, 32);
        assert_eq!(t.len(), 3 * 2);
        assert!(t.iter().all(|(_, _, i)| i.dimensions() == (224, 224)));
    }

    #[test]
    fn seams_merge_duplicates_and_cut_defects_but_not_neighbours() {
        let merged = merge_across_seams(
            vec![
                det(0, 0.9, [100.0, 10.0, 200.0, 50.0]),
                det(0, 0.7, [150.0, 10.0, 199.0, 50.0]), // duplicate from the next tile
                det(1, 0.8, [150.0, 10.0, 199.0, 50.0]), // other class: kept
                det(0, 0.6, [300.0, 10.0, 340.0, 50.0]), // elsewhere: kept
            ],
            0.6,
        );
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0].score, 0.9);
        assert_eq!([merged[0].x1, merged[0].x2], [100.0, 200.0]);
    }

    #[test]
    fn rules_apply_scores_areas_classes_and_roi() {
        let mut rules = Rules {
            min_score: 0.5,
            min_area: 100.0,
            ..Default::default()
        };
        rules.classes.insert(
            "scratches".into(),
            ClassRule {
                min_score: Some(0.8),
                ..Default::default()
            },
        );
        rules.classes.insert(
            "crazing".into(),
            ClassRule {
                ignore: true,
                ..Default::default()
            },
        );
        let d = det(0, 0.6, [0.0, 0.0, 20.0, 20.0]);
        assert!(rules.fails("inclusion", &d));
        assert!(!rules.fails("scratches", &d));
        assert!(!rules.fails("crazing", &d));
        assert!(!rules.fails("inclusion", &det(0, 0.6, [0.0, 0.0, 5.0, 5.0])));
        rules.roi = vec![[100.0, 0.0, 200.0, 100.0]];
        assert!(!rules.fails("inclusion", &d));
        assert!(rules.fails("inclusion", &det(0, 0.6, [110.0, 0.0, 130.0, 20.0])));
    }

    #[test]
    fn queue_drops_oldest_and_counts() {
        let q = BoundedQueue::new(2, DropPolicy::DropOldest);
        assert!(q.push(1).is_none());
        assert!(q.push(2).is_none());
        assert_eq!(q.push(3), Some(1));
        assert_eq!(q.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(q.pop(Duration::ZERO), Some(2));
        q.close();
        assert_eq!(q.pop(Duration::from_secs(1)), Some(3));
        assert_eq!(q.pop(Duration::from_secs(1)), None);
    }

    #[test]
    fn blocking_queue_waits_for_room() {
        let q = Arc::new(BoundedQueue::new(1, DropPolicy::Block));
        q.push(1);
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.push(2));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop(Duration::ZERO), Some(1));
        assert!(t.join().unwrap().is_none());
        assert_eq!(q.pop(Duration::from_secs(1)), Some(2));
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
    }
}
