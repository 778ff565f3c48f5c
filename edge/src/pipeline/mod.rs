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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_detector::{Detection, ImageView};
use image::GrayImage;
pub use protocol::{Defect, Undecided, UndecidedCause};
use serde::{Deserialize, Serialize};

use crate::capture::Frame;
use crate::models::ActiveModel;
pub use inspection::Inspection;
pub use queue::{BoundedQueue, DropPolicy};
pub use rules::{ClassRule, Rules, UndecidedPolicy};
pub use tiling::{merge_across_seams, tile_starts, tiles};

/// What the pipeline decides about one frame.
#[derive(Clone, Debug)]
pub struct Decision {
    pub frame: Frame,
    /// What the line does with the part: the rules' result, or the fail-safe policy's when
    /// `undecided` is set.
    pub pass: bool,
    pub defects: Vec<Defect>,
    pub model: Option<(String, u64)>,
    /// Frame taken by the detector stage -> decision, milliseconds (queueing before it is in
    /// `decided_ms - frame.captured_ms`).
    pub latency_ms: f64,
    /// Set when the frame could not be decided.
    pub undecided: Option<Undecided>,
}

impl Decision {
    /// The fail-safe decision for a frame that could not be decided.
    pub fn undecided(
        frame: Frame,
        cause: UndecidedCause,
        reason: impl Into<String>,
        rules: &Rules,
    ) -> Self {
        Self {
            frame,
            pass: rules.undecided_pass(),
            defects: vec![],
            model: None,
            latency_ms: 0.0,
            undecided: Some(Undecided {
                cause,
                reason: reason.into(),
            }),
        }
    }
}

/// Counters the daemon exports.
#[derive(Default)]
pub struct PipelineStats {
    pub frames_in: AtomicU64,
    pub frames_done: AtomicU64,
    pub bad_frames: AtomicU64,
    pub tiles: AtomicU64,
    pub batches: AtomicU64,
    /// The inference loop is running (false before start, while it restarts after a panic,
    /// and after it ended): `/readyz` reads it.
    pub inference_running: AtomicBool,
    /// Times the inference loop was restarted after a panic.
    pub inference_restarts: AtomicU64,
    /// Unix ms of the inference loop's last step (a batch, or an idle wait): the watchdog's
    /// view of progress.
    pub last_progress_ms: AtomicU64,
}

impl PipelineStats {
    /// Milliseconds since the inference loop last made progress while frames were waiting;
    /// 0 when it is keeping up.
    pub fn stalled_ms(&self, queued: usize, now_ms: u64) -> u64 {
        if queued == 0 {
            return 0;
        }
        now_ms.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed))
    }
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
    /// A frame not decided within this many ms of its capture is undecided (cause `deadline`);
    /// 0: no deadline.
    #[serde(default)]
    pub deadline_ms: u64,
    /// `/readyz` answers 503 when frames wait and the detector has made no progress for this
    /// long (the watchdog).
    #[serde(default = "default_watchdog")]
    pub watchdog_ms: u64,
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
fn default_watchdog() -> u64 {
    10_000
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
            deadline_ms: 0,
            watchdog_ms: default_watchdog(),
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
    /// The detector failed on one of its tiles: the frame is undecided.
    failed: Option<String>,
}

/// Frames inside the inference loop. It lives outside [`run_inference`] so that, when the loop
/// panics, the supervisor can still give every frame it held its fail-safe verdict.
#[derive(Default)]
pub struct InferenceState {
    inflight: VecDeque<InFlight>,
}

impl InferenceState {
    /// Takes the frames held by a loop that failed.
    pub fn take_frames(&mut self) -> Vec<Frame> {
        self.inflight.drain(..).map(|f| f.frame).collect()
    }
}

/// Runs frames through the active model until `frames` is closed and drained. Blocking: give it
/// a thread. `active` is read per batch, so a model switch takes effect at the next batch.
/// Every frame taken from the queue gets exactly one decision through `emit`: decided, or
/// undecided with its cause (no model, detector error, past its deadline).
pub fn run_inference(
    config: &PipelineConfig,
    rules: &Rules,
    frames: &BoundedQueue<Frame>,
    active: &ActiveModel,
    stats: &PipelineStats,
    state: &mut InferenceState,
    emit: &dyn Fn(Decision),
) {
    let inflight = &mut state.inflight;
    let wait = Duration::from_millis(config.max_wait_ms);
    let deadline = (config.deadline_ms > 0).then_some(config.deadline_ms);
    loop {
        stats
            .last_progress_ms
            .store(crate::capture::now_ms(), Ordering::Relaxed);
        // Fill the batch: tiles of frames already cut, then new frames within max_wait.
        let mut pending_tiles: usize = inflight.iter().map(|f| f.tiles.len() - f.next_tile).sum();
        let fill_until = Instant::now() + wait;
        while pending_tiles < config.max_batch {
            let timeout = if pending_tiles == 0 && inflight.is_empty() {
                Duration::from_millis(200)
            } else {
                fill_until.saturating_duration_since(Instant::now())
            };
            let Some(frame) = frames.pop(timeout) else {
                break;
            };
            if let Some(limit) = deadline {
                let waited = crate::capture::now_ms().saturating_sub(frame.captured_ms);
                if waited > limit {
                    emit(Decision::undecided(
                        frame,
                        UndecidedCause::Deadline,
                        format!("waited {waited} ms for the detector (deadline {limit} ms)"),
                        rules,
                    ));
                    continue;
                }
            }
            let model = active.read().expect("lock").clone();
            let Some((_, detector)) = model else {
                emit(Decision::undecided(
                    frame,
                    UndecidedCause::NoModel,
                    "no active model",
                    rules,
                ));
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
                failed: None,
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
            // The model went away with frames cut for it: they cannot be decided.
            for f in inflight.drain(..) {
                emit(Decision::undecided(
                    f.frame,
                    UndecidedCause::NoModel,
                    "no active model",
                    rules,
                ));
            }
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
        let batch_no = stats.batches.fetch_add(1, Ordering::Relaxed) + 1;
        stats.tiles.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let results = crate::faults::detect(batch_no)
            .and_then(|()| detector.detect(&views).map_err(|e| e.to_string()));
        match results {
            Ok(results) => {
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
            }
            Err(e) => {
                tracing::error!("detector: {e}");
                // Every frame with a tile in this batch is undecided; its other tiles are not run.
                for &(fi, _) in &batch {
                    let f = &mut inflight[fi];
                    f.failed = Some(format!("detector: {e}"));
                    f.next_tile = f.tiles.len();
                    f.done_tiles = f.tiles.len();
                }
            }
        }
        while inflight
            .front()
            .is_some_and(|f| f.done_tiles == f.tiles.len())
        {
            let f = inflight.pop_front().expect("front");
            stats.frames_done.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = f.failed {
                emit(Decision::undecided(
                    f.frame,
                    UndecidedCause::DetectorError,
                    reason,
                    rules,
                ));
                continue;
            }
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
            let mut decision = Decision {
                pass: !defects.iter().any(|d| d.fails),
                defects,
                model: Some((installed.id.clone(), installed.version)),
                latency_ms: f.started.elapsed().as_secs_f64() * 1e3,
                frame: f.frame,
                undecided: None,
            };
            if let Some(limit) = deadline {
                let took = crate::capture::now_ms().saturating_sub(decision.frame.captured_ms);
                if took > limit {
                    // Too late for the gate: the detections are kept for the record, the line
                    // gets the fail-safe answer.
                    decision.pass = rules.undecided_pass();
                    decision.undecided = Some(Undecided {
                        cause: UndecidedCause::Deadline,
                        reason: format!("decided {took} ms after capture (deadline {limit} ms)"),
                    });
                }
            }
            emit(decision);
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

    fn frame(seq: u64, captured_ms: u64) -> Frame {
        Frame {
            seq,
            line: 0,
            captured_ms,
            image: GrayImage::new(64, 64),
            origin: format!("f{seq}"),
            truth: vec![],
            position_mm: None,
        }
    }

    /// Frames past their deadline are not run; frames with no model to judge them are
    /// undecided too; each gets exactly one decision, and the policy sets `pass`.
    #[test]
    fn undecidable_frames_get_one_failsafe_decision_each() {
        let now = crate::capture::now_ms();
        for (policy, pass) in [
            (UndecidedPolicy::Reject, false),
            (UndecidedPolicy::PassFlagged, true),
        ] {
            let queue = BoundedQueue::new(8, DropPolicy::Block);
            queue.push(frame(0, now.saturating_sub(60_000)));
            queue.push(frame(1, now + 60_000));
            queue.push(frame(2, now.saturating_sub(5_000)));
            queue.close();
            let config = PipelineConfig {
                deadline_ms: 1_000,
                ..Default::default()
            };
            let rules = Rules {
                undecided: policy,
                ..Default::default()
            };
            let got = std::sync::Mutex::new(vec![]);
            run_inference(
                &config,
                &rules,
                &queue,
                &ActiveModel::default(),
                &PipelineStats::default(),
                &mut InferenceState::default(),
                &|d: Decision| got.lock().unwrap().push(d),
            );
            let got = got.into_inner().unwrap();
            let causes: Vec<(u64, UndecidedCause, bool)> = got
                .iter()
                .map(|d| (d.frame.seq, d.undecided.as_ref().unwrap().cause, d.pass))
                .collect();
            assert_eq!(
                causes,
                vec![
                    (0, UndecidedCause::Deadline, pass),
                    (1, UndecidedCause::NoModel, pass),
                    (2, UndecidedCause::Deadline, pass),
                ]
            );
            assert!(
                got[0]
                    .undecided
                    .as_ref()
                    .unwrap()
                    .reason
                    .contains("deadline 1000 ms")
            );
        }
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
