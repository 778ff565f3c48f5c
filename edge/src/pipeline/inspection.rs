//! The inspection threads: the source thread fills the bounded frame queue, the inference
//! thread runs [`run_inference`] on it and hands each decision on. The inference loop is
//! supervised: a panic gives the frames it held their fail-safe verdict, and the loop restarts
//! after a back-off (counted; `/readyz` is false meanwhile).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{
    BoundedQueue, Decision, InferenceState, PipelineConfig, PipelineStats, Rules, UndecidedCause,
    run_inference,
};
use crate::capture::{Frame, FrameSource, SourceError, now_ms};
use crate::models::ActiveModel;

/// Where decisions go; called from the source thread (frames it could not queue or read) and
/// the inference thread.
pub type DecisionSink = Arc<dyn Fn(Decision) + Send + Sync>;

/// The running inspection threads.
pub struct Inspection {
    stop: Arc<AtomicBool>,
    pub queue: Arc<BoundedQueue<Frame>>,
    source: std::thread::JoinHandle<()>,
    inference: std::thread::JoinHandle<()>,
}

impl Inspection {
    /// Stops the source, lets the detector finish the queued frames, waits for both.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.close();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = self.source.join();
            let _ = self.inference.join();
        })
        .await;
    }
}

/// First wait before the inference loop restarts after a panic; doubled per consecutive panic
/// up to [`MAX_BACKOFF`], reset after a minute without one.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl Inspection {
    /// Starts the source and inference threads. Every frame the source delivers, or fails to
    /// deliver, gets exactly one decision through `on_decision`.
    pub fn start(
        mut source: Box<dyn FrameSource>,
        config: PipelineConfig,
        rules: Rules,
        active: ActiveModel,
        stats: Arc<PipelineStats>,
        on_decision: DecisionSink,
    ) -> anyhow::Result<Self> {
        tracing::info!("source: {}", source.describe());
        let queue = Arc::new(BoundedQueue::new(config.queue, config.on_full));
        let stop = Arc::new(AtomicBool::new(false));
        let source_thread = {
            let (queue, stop, stats) = (queue.clone(), stop.clone(), stats.clone());
            let (rules, sink) = (rules.clone(), on_decision.clone());
            std::thread::Builder::new()
                .name("source".into())
                .spawn(move || {
                    let mut next_seq = 0;
                    while !stop.load(Ordering::SeqCst) {
                        // A source that panics (a driver or decoder bug) ends like a fatal
                        // error: logged, the queue closed, `/readyz` false.
                        let next =
                            std::panic::catch_unwind(AssertUnwindSafe(|| source.next_frame()))
                                .unwrap_or_else(|_| {
                                    Err(SourceError::Fatal("the source panicked".into()))
                                });
                        match next {
                            Ok(Some(frame)) => {
                                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                                next_seq = frame.seq + 1;
                                if let Some(old) = queue.push(frame) {
                                    tracing::warn!("queue full: frame {} shed", old.seq);
                                    sink(Decision::undecided(
                                        old,
                                        UndecidedCause::Overload,
                                        "shed: the frame queue was full",
                                        &rules,
                                    ));
                                }
                            }
                            Ok(None) => {
                                tracing::info!("source finished");
                                break;
                            }
                            Err(SourceError::BadFrame { origin, reason }) => {
                                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                                stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!("bad frame {next_seq} ({origin}): {reason}");
                                let frame = Frame {
                                    seq: next_seq,
                                    line: 0,
                                    captured_ms: now_ms(),
                                    image: Default::default(),
                                    origin,
                                    truth: vec![],
                                    position_mm: None,
                                };
                                next_seq += 1;
                                sink(Decision::undecided(
                                    frame,
                                    UndecidedCause::BadFrame,
                                    reason,
                                    &rules,
                                ));
                            }
                            Err(SourceError::Fatal(e)) => {
                                tracing::error!("source failed: {e}");
                                break;
                            }
                        }
                    }
                    queue.close();
                })?
        };
        let inference = {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("inference".into())
                .spawn(move || supervise(&config, &rules, &queue, &active, &stats, &*on_decision))?
        };
        Ok(Inspection {
            stop,
            queue,
            source: source_thread,
            inference,
        })
    }
}

/// Runs the inference loop until the queue is closed and drained, restarting it after a panic.
fn supervise(
    config: &PipelineConfig,
    rules: &Rules,
    queue: &BoundedQueue<Frame>,
    active: &ActiveModel,
    stats: &PipelineStats,
    emit: &dyn Fn(Decision),
) {
    let mut state = InferenceState::default();
    let mut backoff = FIRST_BACKOFF;
    let mut last_panic: Option<Instant> = None;
    loop {
        stats.inference_running.store(true, Ordering::SeqCst);
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_inference(config, rules, queue, active, stats, &mut state, emit)
        }));
        stats.inference_running.store(false, Ordering::SeqCst);
        let Err(panic) = ran else {
            return;
        };
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let restarts = stats.inference_restarts.fetch_add(1, Ordering::SeqCst) + 1;
        if last_panic.is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
            backoff = FIRST_BACKOFF;
        }
        last_panic = Some(Instant::now());
        let held = state.take_frames();
        tracing::error!(
            "inference failed ({message}); {} frames in it get the fail-safe verdict; restart {restarts} in {} ms",
            held.len(),
            backoff.as_millis()
        );
        for frame in held {
            emit(Decision::undecided(
                frame,
                UndecidedCause::InferenceFailed,
                format!("inference failed: {message}"),
                rules,
            ));
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
