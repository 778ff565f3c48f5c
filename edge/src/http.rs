//! The daemon's HTTP side (axum): `/healthz`, `/readyz`, `/metrics` (Prometheus text format),
//! `/api/verdicts?since=ID&limit=N`, `/api/frames/{id}.jpg`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::daemon::ActiveModel;
use crate::pipeline::PipelineStats;
use crate::store::VerdictStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Metrics updated by the pipeline as it runs.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    pub verdicts: Family<ResultLabel, Counter>,
    /// Frame taken by the detector stage -> verdict, seconds.
    pub latency: Histogram,
    frames: Counter,
    bad_frames: Counter,
    dropped: Counter,
    tiles: Counter,
    batches: Counter,
    queue_depth: Gauge,
    outbox_pending: Gauge,
    model_version: Gauge,
    fps: Gauge<f64, std::sync::atomic::AtomicU64>,
    review_pending: Gauge,
    review_labeled: Gauge,
    review_evicted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edge");
        let m = Metrics {
            verdicts: Family::default(),
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
        registry.register("verdicts", "Verdicts by result", m.verdicts.clone());
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

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub stats: Arc<PipelineStats>,
    pub store: Arc<VerdictStore>,
    pub active: ActiveModel,
    pub queue:
        Arc<std::sync::Mutex<Option<Arc<crate::pipeline::BoundedQueue<crate::source::Frame>>>>>,
    pub review: Option<Arc<crate::review::ReviewQueue>>,
    /// Whether a source is configured (readiness then needs it running).
    pub has_source: bool,
    pub last_scrape: Arc<std::sync::Mutex<(std::time::Instant, u64)>>,
}

/// The daemon's routes, and the labeling page's when `[review]` is configured.
pub fn router(state: AppState, labeling: Option<crate::labeling::LabelingState>) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/verdicts", get(verdicts))
        .route("/api/frames/{file}", get(frame))
        .with_state(state);
    match labeling {
        Some(l) => router.merge(crate::labeling::routes(l)),
        None => router,
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.active.read().expect("lock").is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no model loaded\n",
        )
            .into_response();
    }
    if s.has_source
        && s.queue
            .lock()
            .expect("lock")
            .as_ref()
            .is_none_or(|q| q.is_closed())
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the frame source is not running\n",
        )
            .into_response();
    }
    "ready\n".into_response()
}

fn sync_counter(c: &Counter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let m = &s.metrics;
    sync_counter(&m.frames, s.stats.frames_in.load(Ordering::Relaxed));
    sync_counter(&m.bad_frames, s.stats.bad_frames.load(Ordering::Relaxed));
    sync_counter(&m.tiles, s.stats.tiles.load(Ordering::Relaxed));
    sync_counter(&m.batches, s.stats.batches.load(Ordering::Relaxed));
    if let Some(q) = s.queue.lock().expect("lock").as_ref() {
        sync_counter(&m.dropped, q.dropped.load(Ordering::Relaxed));
        m.queue_depth.set(q.len() as i64);
    }
    m.outbox_pending.set(s.store.pending() as i64);
    if let Some(r) = &s.review {
        let [pending, labeled] = r.counts();
        m.review_pending.set(pending as i64);
        m.review_labeled.set(labeled as i64);
        sync_counter(&m.review_evicted, r.stats.evicted.load(Ordering::Relaxed));
    }
    let version = s
        .active
        .read()
        .expect("lock")
        .as_ref()
        .map(|(i, _)| i.version)
        .unwrap_or(0);
    m.model_version.set(version as i64);
    {
        let done = s.stats.frames_done.load(Ordering::Relaxed);
        let mut last = s.last_scrape.lock().expect("lock");
        let dt = last.0.elapsed().as_secs_f64();
        if dt > 0.0 {
            m.fps.set((done.saturating_sub(last.1)) as f64 / dt);
        }
        *last = (std::time::Instant::now(), done);
    }
    let mut body = String::new();
    if let Err(e) =
        prometheus_client::encoding::text::encode(&mut body, &m.registry.lock().expect("lock"))
    {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

async fn verdicts(
    State(s): State<AppState>,
    q: Result<Query<Since>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return (
            StatusCode::BAD_REQUEST,
            "query: since and limit are unsigned integers\n",
        )
            .into_response();
    };
    if q.limit == 0 || q.limit > 1000 {
        return (StatusCode::BAD_REQUEST, "limit: 1 to 1000\n").into_response();
    }
    match s.store.since(q.since, q.limit) {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn frame(State(s): State<AppState>, Path(file): Path<String>) -> Response {
    let Some(id) = file
        .strip_suffix(".jpg")
        .and_then(|i| i.parse::<u64>().ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "expected /api/frames/{verdict id}.jpg\n",
        )
            .into_response();
    };
    match s.store.frame_jpeg(id) {
        Ok(Some(bytes)) => ([(header::CONTENT_TYPE, "image/jpeg")], bytes).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("no frame kept for verdict {id} (store.keep_frames)\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
