//! The inspection threads: the source thread fills the bounded frame queue, the inference
//! thread runs [`run_inference`] on it and hands each decision on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{BoundedQueue, Decision, PipelineConfig, PipelineStats, Rules, run_inference};
use crate::capture::{Frame, FrameSource, SourceError};
use crate::models::ActiveModel;

/// The running inspection threads.
pub struct Inspection {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub queue: Arc<BoundedQueue<Frame>>,
    source: std::thread::JoinHandle<()>,
    inference: std::thread::JoinHandle<()>,
}

impl Inspection {
    /// Stops the source, lets the detector finish the queued frames, waits for both.
    pub async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.queue.close();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = self.source.join();
            let _ = self.inference.join();
        })
        .await;
    }
}
impl Inspection {
    /// Starts the source and inference threads; every decision goes to `on_decision` on the
    /// inference thread.
    pub fn start(
        mut source: Box<dyn FrameSource>,
        config: PipelineConfig,
        rules: Rules,
        active: ActiveModel,
        stats: Arc<PipelineStats>,
        on_decision: impl FnMut(Decision) + Send + 'static,
    ) -> anyhow::Result<Self> {
        tracing::info!("source: {}", source.describe());
        let queue = Arc::new(BoundedQueue::new(config.queue, config.on_full));
        let stop = Arc::new(AtomicBool::new(false));
        let source_thread = {
            let (queue, stop, stats) = (queue.clone(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("source".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match source.next_frame() {
                            Ok(Some(frame)) => {
                                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                                if let Some(old) = queue.push(frame) {
                                    tracing::warn!("queue full: dropped frame {}", old.seq);
                                }
                            }
                            Ok(None) => {
                                tracing::info!("source finished");
                                break;
                            }
                            Err(SourceError::BadFrame(e)) => {
                                stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!("bad frame skipped: {e}");
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
                .spawn(move || {
                    run_inference(&config, &rules, &queue, &active, &stats, on_decision)
                })?
        };
        Ok(Inspection {
            stop,
            queue,
            source: source_thread,
            inference,
        })
    }
}
