//! The daemon's Prometheus metrics: counters the verdict path updates as it goes, and gauges
//! the `/metrics` handler refreshes from the pipeline's and stores' own counts at each scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelLabel {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

/// Metrics updated by the pipeline as it runs.
pub struct Metrics {
    pub(super) registry: std::sync::Mutex<Registry>,
    pub verdicts: Family<ResultLabel, Counter>,
    /// Undecided (fail-safe) verdicts by cause.
    pub undecided: Family<CauseLabel, Counter>,
    pub(super) verdicts_lost: Counter,
    pub(super) frames_shed: Counter,
    pub(super) store_bytes: Gauge,
    pub(super) store_in_reserve: Gauge,
    /// Frame taken by the detector stage -> verdict, seconds.
    pub latency: Histogram,
    pub(super) frames: Counter,
    pub(super) bad_frames: Counter,
    pub(super) dropped: Counter,
    pub(super) tiles: Counter,
    pub(super) batches: Counter,
    pub(super) queue_depth: Gauge,
    pub(super) outbox_pending: Gauge,
    pub(super) model_version: Gauge,
    pub(super) fps: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub(super) review_pending: Gauge,
    pub(super) review_labeled: Gauge,
    pub(super) review_evicted: Counter,
    pub(super) inference_restarts: Counter,
    pub(super) inference_running: Gauge,
    pub(super) inference_stalled: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    /// Adds another part's metrics (the PLC link's) to `/metrics`.
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        add(&mut self.registry.lock().expect("lock"));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edge");
        let m = Metrics {
            verdicts: Family::default(),
            undecided: Family::default(),
            verdicts_lost: Counter::default(),
            frames_shed: Counter::default(),
            store_bytes: Gauge::default(),
            store_in_reserve: Gauge::default(),
            inference_restarts: Counter::default(),
            inference_running: Gauge::default(),
            inference_stalled: Gauge::default(),
            latency: Histogram::new([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]),
            frames: Counter::default(),
            bad_frames: Counter::default(),
            dropped: Counter::default(),
            tiles: Counter::default(),
            batches: Counter::default(),
            queue_depth: Gauge::default(),
            outbox_pending: Gauge::default(),
            model_version: Gauge::default(),
            fps: Gauge::default(),
            review_pending: Gauge::default(),
            review_labeled: Gauge::default(),
            review_evicted: Counter::default(),
            registry: std::sync::Mutex::new(Registry::default()),
        };
        registry.register(
            "verdicts",
            "Verdicts by result (pass, fail, undecided)",
            m.verdicts.clone(),
        );
        registry.register(
            "undecided",
            "Frames that could not be decided, by cause (each got the fail-safe verdict)",
            m.undecided.clone(),
        );
        for cause in protocol::UndecidedCause::ALL {
            let _ = m.undecided.get_or_create(&CauseLabel {
                cause: cause.as_str(),
            });
        }
        let kernels: Family<KernelLabel, Gauge> = Family::default();
        kernels
            .get_or_create(&KernelLabel {
                path: edge_detector::cpu::active().name(),
            })
            .set(1);
        registry.register(
            "cpu_kernels",
            "The CPU kernel path this process runs (1 on its label; EDGE_CPU_KERNELS forces one)",
            kernels,
        );
        registry.register(
            "verdicts_lost",
            "Verdicts not stored, or dropped undelivered because they alone filled the store's budget (alarm: must stay 0)",
            m.verdicts_lost.clone(),
        );
        registry.register(
            "frames_shed",
            "Frames (with crops) removed or not kept to keep the store's reserve for verdicts",
            m.frames_shed.clone(),
        );
        registry.register(
            "store_bytes",
            "Bytes the verdict store holds (verdicts, outbox, frames, crops; store.disk_budget_mb)",
            m.store_bytes.clone(),
        );
        registry.register(
            "store_in_reserve",
            "1 while the store is in its reserve: frames are shed, verdicts still stored (alarm)",
            m.store_in_reserve.clone(),
        );
        registry.register(
            "inference_restarts",
            "Restarts of the inference loop after a failure",
            m.inference_restarts.clone(),
        );
        registry.register(
            "inference_running",
            "1 while the inference loop runs",
            m.inference_running.clone(),
        );
        registry.register(
            "inference_stalled_seconds",
            "How long frames have waited with no detector progress (the watchdog)",
            m.inference_stalled.clone(),
        );
        registry.register(
            "latency_seconds",
            "Detector stage latency per frame",
            m.latency.clone(),
        );
        registry.register(
            "frames",
            "Frames received from the source",
            m.frames.clone(),
        );
        registry.register(
            "bad_frames",
            "Corrupt or unjudgeable frames skipped",
            m.bad_frames.clone(),
        );
        registry.register(
            "dropped_frames",
            "Frames dropped by the full queue",
            m.dropped.clone(),
        );
        registry.register("tiles", "Tiles run through the detector", m.tiles.clone());
        registry.register("batches", "Detector forward passes", m.batches.clone());
        registry.register(
            "queue_depth",
            "Frames waiting for the detector",
            m.queue_depth.clone(),
        );
        registry.register(
            "outbox_pending",
            "Verdicts stored but not yet acknowledged by the broker",
            m.outbox_pending.clone(),
        );
        registry.register(
            "active_model_version",
            "Version of the active model (0: none)",
            m.model_version.clone(),
        );
        registry.register(
            "fps",
            "Verdicts per second over the last scrape interval",
            m.fps.clone(),
        );
        registry.register(
            "review_pending",
            "Frames waiting for a labeler ([review])",
            m.review_pending.clone(),
        );
        registry.register(
            "review_labeled",
            "Labeled frames kept for export ([review])",
            m.review_labeled.clone(),
        );
        registry.register(
            "review_evicted",
            "Unlabeled frames dropped from the full review queue",
            m.review_evicted.clone(),
        );
        *m.registry.lock().expect("lock") = registry;
        m
    }
}
