//! Verdicts: a decision of the pipeline made durable ([`store`]: sled, with its frame and the
//! outbox entry in one transaction) and published in order over MQTT ([`outbox`]).

pub mod outbox;
pub mod store;

use std::sync::Arc;

use image::GrayImage;
use protocol::Verdict;

use crate::capture::now_ms;
use crate::pipeline::Decision;
use store::VerdictStore;

/// Turns decisions into stored verdicts and wakes the outbox.
pub struct Recorder {
    pub store: Arc<VerdictStore>,
    /// This device's id, stamped on every verdict.
    pub device: String,
    pub outbox: Arc<tokio::sync::Notify>,
}

impl Recorder {
    /// Stores the verdict for `d` (with its frame, per `[store]`) and returns it with the frame;
    /// `None` when it could not be stored (logged).
    pub fn record(&self, d: Decision) -> Option<(Verdict, GrayImage)> {
        let id = match self.store.next_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::error!("{e}");
                return None;
            }
        };
        let verdict = Verdict {
            id,
            device: self.device.clone(),
            frame: d.frame.seq,
            line: d.frame.line,
            origin: d.frame.origin,
            width: d.frame.image.width(),
            height: d.frame.image.height(),
            captured_ms: d.frame.captured_ms,
            decided_ms: now_ms(),
            latency_ms: d.latency_ms,
            pass: d.pass,
            defects: d.defects,
            model: d.model,
            undecided: d.undecided,
            position_mm: d.frame.position_mm,
        };
        if let Err(e) = self.store.record(&verdict, &d.frame.image) {
            tracing::error!("verdict {} not stored: {e}", verdict.id);
            return None;
        }
        // Retention walks from the oldest verdict: keep it off every frame.
        if verdict.id.is_multiple_of(64)
            && let Err(e) = self.store.enforce_retention(verdict.decided_ms)
        {
            tracing::error!("retention: {e}");
        }
        self.outbox.notify_one();
        Some((verdict, d.frame.image))
    }
}
