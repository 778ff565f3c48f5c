//! The daemon's HTTP side (axum): `/healthz`, `/readyz`, `/metrics` (Prometheus text format),
//! `/api/verdicts?since=ID&limit=N`, `/api/frames/{id}.jpg`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use super::metrics::Metrics;
use crate::capture::Frame;
use crate::models::ActiveModel;
use crate::pipeline::{BoundedQueue, PipelineStats};
use crate::serve::labeling::LabelingState;
use crate::serve::review::ReviewQueue;
use crate::verdicts::store::VerdictStore;

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub stats: Arc<PipelineStats>,
    pub store: Arc<VerdictStore>,
    pub active: ActiveModel,
    pub queue: Arc<std::sync::Mutex<Option<Arc<BoundedQueue<Frame>>>>>,
    pub review: Option<Arc<ReviewQueue>>,
    /// `/readyz` fails when frames wait and the detector made no progress for this long.
    pub watchdog_ms: u64,
    /// Whether a source is configured (readiness then needs it running).
    pub has_source: bool,
    pub last_scrape: Arc<std::sync::Mutex<(std::time::Instant, u64)>>,
}

/// The daemon's routes, and the labeling page's when `[review]` is configured.
pub fn router(state: AppState, labeling: Option<LabelingState>) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/verdicts", get(verdicts))
        .route("/api/frames/{file}", get(frame))
        .with_state(state);
    match labeling {
        Some(l) => router.merge(super::labeling::routes(l)),
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
    if s.has_source && !s.stats.inference_running.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the inference loop is not running (restarting after a failure)\n",
        )
            .into_response();
    }
    let stalled = s.stats.stalled_ms(queue_len(&s), crate::capture::now_ms());
    if s.has_source && stalled > s.watchdog_ms {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: frames are waiting and the detector has made no progress for {stalled} ms\n"),
        )
            .into_response();
    }
    "ready\n".into_response()
}

fn queue_len(s: &AppState) -> usize {
    s.queue
        .lock()
        .expect("lock")
        .as_ref()
        .map_or(0, |q| q.len())
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
    sync_counter(&m.verdicts_lost, s.store.lost.load(Ordering::Relaxed));
    sync_counter(&m.frames_shed, s.store.frames_shed.load(Ordering::Relaxed));
    m.store_bytes.set(s.store.usage() as i64);
    m.store_in_reserve.set(s.store.in_reserve() as i64);
    sync_counter(
        &m.inference_restarts,
        s.stats.inference_restarts.load(Ordering::Relaxed),
    );
    m.inference_running
        .set(s.stats.inference_running.load(Ordering::Relaxed) as i64);
    m.inference_stalled
        .set(s.stats.stalled_ms(queue_len(&s), crate::capture::now_ms()) as f64 / 1e3);
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
