//! The labeling page and its API, served by the daemon when `[review]` is configured:
//!
//! - `GET /label`: the page (no secrets in it; it asks for the labeler's token).
//! - `GET /api/review/config`: who the token belongs to, the classes, queue counts.
//! - `GET /api/review/items?status=pending|labeled|all&before=ID&limit=N`: newest first.
//! - `GET /api/review/items/{id}`, `.../{id}/frame.jpg`, `.../{id}/thumb.jpg`,
//!   `.../{id}/heatmap.png` (Grad-CAM of the active model, computed once per model).
//! - `PUT /api/review/items/{id}/label` `{"boxes": [{"class", "bbox"}], "no_defect"}`.
//! - `DELETE /api/review/items/{id}`: skip a frame.
//! - `GET /api/dataset`: the labeled frames as a tar in the NEU-DET VOC layout.
//!
//! Every API call needs `Authorization: Bearer TOKEN` with a token from `review.labelers`;
//! bodies are limited to 64 KiB; bad requests get a 4xx with the reason.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::models::ActiveModel;
use crate::serve::review::{LabelRequest, ReviewError, ReviewQueue, Status};

/// Largest request body accepted (a label with the maximum number of boxes fits easily).
pub const MAX_BODY: usize = 64 << 10;

#[derive(Clone)]
pub struct LabelingState {
    pub queue: Arc<ReviewQueue>,
    pub active: ActiveModel,
    pub device: String,
    /// The pipeline's tiling, so heat maps are made on the tiles the model judged.
    pub tile: usize,
    pub tile_overlap: usize,
    /// One heat map at a time: they take a second of CPU each, next to inspection.
    pub heatmap_lock: Arc<tokio::sync::Mutex<()>>,
}

pub fn routes(state: LabelingState) -> Router {
    Router::new()
        .route("/label", get(page))
        .route("/api/review/config", get(config))
        .route("/api/review/items", get(items))
        .route("/api/review/items/{id}", get(item).delete(discard))
        .route("/api/review/items/{id}/label", put(label))
        .route("/api/review/items/{id}/{file}", get(file))
        .route("/api/dataset", get(dataset))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn reply(status: StatusCode, reason: impl Into<String>) -> Response {
    let mut text = reason.into();
    text.push('\n');
    (status, text).into_response()
}

/// A request refused before any work: the status and the reason (as text).
struct Refusal(Box<Response>);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<ReviewError> for Refusal {
    fn from(e: ReviewError) -> Self {
        Refusal(Box::new(store_error(e)))
    }
}

type Reply = Result<Response, Refusal>;

/// The labeler whose token the request carries.
fn labeler(headers: &HeaderMap, queue: &ReviewQueue) -> Result<String, Refusal> {
    let unauthorized = |reason: &str| {
        let mut r = reply(StatusCode::UNAUTHORIZED, reason);
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        Refusal(Box::new(r))
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "missing `Authorization: Bearer TOKEN` (a token from review.labelers in the daemon config)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("Authorization: expected `Bearer TOKEN`"))?;
    queue
        .config
        .labeler(token.trim())
        .map(str::to_string)
        .ok_or_else(|| unauthorized("unknown token"))
}

fn parse_id(raw: &str) -> Result<u64, Refusal> {
    let bad = |why: &str| {
        Refusal(Box::new(reply(
            StatusCode::BAD_REQUEST,
            format!("id {raw:?}: {why}"),
        )))
    };
    if raw.is_empty() || raw.len() > 20 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected a frame id (digits)"));
    }
    raw.parse().map_err(|_| bad("out of range"))
}

fn store_error(e: ReviewError) -> Response {
    match e {
        ReviewError::NotFound(_) => reply(StatusCode::NOT_FOUND, e.to_string()),
        ReviewError::Invalid(_) => reply(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        ReviewError::Store(_) => {
            tracing::error!("labeling: {e}");
            reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
            ),
        ],
        Html(include_str!("label.html")),
    )
        .into_response()
}

async fn config(State(s): State<LabelingState>, headers: HeaderMap) -> Reply {
    let who = labeler(&headers, &s.queue)?;
    let [pending, labeled] = s.queue.counts();
    let model = s
        .active
        .read()
        .expect("lock")
        .as_ref()
        .map(|(i, _)| serde_json::json!({"id": i.id, "version": i.version}));
    Ok(Json(serde_json::json!({
        "labeler": who,
        "device": s.device,
        "classes": s.queue.config.classes,
        // Predictions scoring below the uncertain band are noise to a labeler: the page hides them.
        "show_score": s.queue.config.uncertain[0],
        "pending": pending,
        "labeled": labeled,
        "model": model,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemsQuery {
    #[serde(default)]
    status: Status,
    before: Option<u64>,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

async fn items(
    State(s): State<LabelingState>,
    headers: HeaderMap,
    q: Result<Query<ItemsQuery>, QueryRejection>,
) -> Reply {
    labeler(&headers, &s.queue)?;
    let Ok(Query(q)) = q else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "query: status = pending|labeled|all, before = a frame id, limit = 1..1000",
        ));
    };
    if q.limit == 0 || q.limit > 1000 {
        return Ok(reply(StatusCode::BAD_REQUEST, "limit: 1 to 1000"));
    }
    let queue = s.queue.clone();
    let list = blocking(move || queue.list(q.status, q.before, q.limit)).await?;
    Ok(Json(list).into_response())
}

/// Runs sled work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReviewError> + Send + 'static,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(Refusal(Box::new(reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )))),
    }
}

async fn item(State(s): State<LabelingState>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    labeler(&headers, &s.queue)?;
    let id = parse_id(&id)?;
    let item = s.queue.get(id)?.ok_or(ReviewError::NotFound(id))?;
    Ok(Json(item).into_response())
}

async fn discard(
    State(s): State<LabelingState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    let who = labeler(&headers, &s.queue)?;
    let id = parse_id(&id)?;
    let queue = s.queue.clone();
    if !blocking(move || queue.discard(id)).await? {
        return Err(ReviewError::NotFound(id).into());
    }
    tracing::info!("review: {who} discarded frame {id}");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn label(
    State(s): State<LabelingState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<LabelRequest>, JsonRejection>,
) -> Reply {
    let who = labeler(&headers, &s.queue)?;
    let id = parse_id(&id)?;
    let request = body
        .map_err(|e| {
            Refusal(Box::new(reply(
                e.status(),
                format!("label: {}", e.body_text()),
            )))
        })?
        .0;
    let queue = s.queue.clone();
    let by = who.clone();
    let item = blocking(move || queue.label(id, request, &by)).await?;
    let n = item.label.as_ref().map_or(0, |l| l.boxes.len());
    tracing::info!("review: {who} labeled frame {id} ({n} boxes)");
    Ok(Json(item).into_response())
}

async fn file(
    State(s): State<LabelingState>,
    headers: HeaderMap,
    Path((id, file)): Path<(String, String)>,
) -> Reply {
    labeler(&headers, &s.queue)?;
    let id = parse_id(&id)?;
    let thumbnail = match file.as_str() {
        "frame.jpg" => false,
        "thumb.jpg" => true,
        "heatmap.png" => return heatmap(&s, id).await,
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                format!("{file:?}: expected frame.jpg, thumb.jpg or heatmap.png"),
            ));
        }
    };
    let bytes = s
        .queue
        .jpeg(id, thumbnail)?
        .ok_or(ReviewError::NotFound(id))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        bytes,
    )
        .into_response())
}

async fn heatmap(s: &LabelingState, id: u64) -> Reply {
    let Some((installed, detector)) = s.active.read().expect("lock").clone() else {
        return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "no model loaded"));
    };
    let png = |b: Vec<u8>| {
        (
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "private, no-cache"),
            ],
            b,
        )
            .into_response()
    };
    let _one_at_a_time = s.heatmap_lock.lock().await;
    if let Some(b) = s.queue.heatmap(id, &installed.sha256)? {
        return Ok(png(b));
    }
    let frame = s.queue.jpeg(id, false)?.ok_or(ReviewError::NotFound(id))?;
    let (tile, overlap) = (s.tile, s.tile_overlap);
    let made = tokio::task::spawn_blocking(move || {
        let frame = image::load_from_memory(&frame)
            .map_err(|e| format!("stored frame {id}: {e}"))?
            .to_luma8();
        crate::serve::review::heatmap_png(&detector, &frame, tile, overlap)
            .map_err(|e| e.to_string())
    })
    .await;
    Ok(match made {
        Ok(Ok(b)) => {
            if let Err(e) = s.queue.store_heatmap(id, &installed.sha256, &b) {
                tracing::warn!("heat map of frame {id} not cached: {e}");
            }
            png(b)
        }
        Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("heat map: {e}")),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })
}

/// Streams what `ReviewQueue::export` writes, in 64 KiB pieces.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(64 << 10));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 << 10 {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

async fn dataset(State(s): State<LabelingState>, headers: HeaderMap) -> Reply {
    let who = labeler(&headers, &s.queue)?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let (queue, device) = (s.queue.clone(), s.device.clone());
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(64 << 10),
        };
        match queue.export(&device, writer) {
            Ok(n) => tracing::info!("review: {who} exported {n} labeled frames"),
            Err(e) => {
                tracing::error!("review export: {e}");
                // Ends the response with an error: the client sees a broken download, not a
                // short archive it could take for complete.
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}-labels.tar\"", s.device),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
