//! Wiring: builds the parts from the config (model lifecycle, verdict store, review queue,
//! metrics), starts their threads and tasks (inspection, outbox, HTTP, MQTT), routes the
//! device's MQTT messages to the model lifecycle, and shuts everything down in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::prelude::*;
use protocol::Verdict;
use protocol::messages::Message;
use protocol::mqtt::Connection;
use protocol::topics::UpKind;
use rumqttc::{LastWill, QoS};

use crate::capture::{self, Frame};
use crate::config::EdgeConfig;
use crate::models::ModelLifecycle;
use crate::pipeline::{BoundedQueue, Decision, Inspection, PipelineStats};
use crate::plc::PlcLink;
use crate::serve::HttpServer;
use crate::serve::http::AppState;
use crate::serve::labeling::LabelingState;
use crate::serve::metrics::{CauseLabel, Metrics, ResultLabel};
use crate::serve::review::ReviewQueue;
use crate::verdicts::Recorder;
use crate::verdicts::outbox::Outbox;
use crate::verdicts::store::VerdictStore;

pub struct Daemon {
    config: EdgeConfig,
    models: ModelLifecycle,
    verdicts: Arc<VerdictStore>,
    /// Frames waiting for a quality engineer (`[review]`).
    review: Option<Arc<ReviewQueue>>,
    stats: Arc<PipelineStats>,
    metrics: Arc<Metrics>,
    outbox_notify: Arc<tokio::sync::Notify>,
    /// The frame queue, once inspection runs (read by `/metrics` and `/readyz`).
    queue: Arc<Mutex<Option<Arc<BoundedQueue<Frame>>>>>,
}

impl Daemon {
    /// Opens the state directory: the models (see [`ModelLifecycle::open`]), the verdict store
    /// (old verdicts removed per `[store]` retention) and the review queue.
    pub fn open(config: EdgeConfig, device: Device) -> anyhow::Result<Self> {
        let dir = &config.storage.dir;
        std::fs::create_dir_all(dir)?;
        let models =
            ModelLifecycle::open(config.models.clone(), config.device.clone(), dir, device)?;
        let verdicts = Arc::new(VerdictStore::open(
            &dir.join("verdicts.sled"),
            config.store.clone(),
        )?);
        let removed = verdicts.enforce_retention(capture::now_ms())?;
        if removed > 0 {
            tracing::info!("retention: removed {removed} old verdicts");
        }
        let review = match &config.review {
            Some(r) => Some(Arc::new(ReviewQueue::open(
                &dir.join("review.sled"),
                r.clone(),
            )?)),
            None => None,
        };
        Ok(Self {
            config,
            models,
            verdicts,
            review,
            stats: Arc::new(PipelineStats::default()),
            metrics: Arc::new(Metrics::default()),
            outbox_notify: Arc::new(tokio::sync::Notify::new()),
            queue: Default::default(),
        })
    }

    /// Runs until `shutdown` resolves: inspection (when a source is configured), the outbox and
    /// model updates (when MQTT is), HTTP (when `[http]` is), trial confirmation.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        // The PLC link starts before inspection so that the first verdict finds it; it connects
        // in the background, so the source is still the first thing that can stop the daemon:
        // a missing camera or folder stops it right here.
        let plc = self.config.plc.clone().map(|cfg| {
            let link = Arc::new(PlcLink::start(cfg));
            let m = link.metrics.clone();
            self.metrics.register(|r| m.register(r));
            link
        });
        let inspection = match self.config.source.clone() {
            Some(cfg) => {
                let source = capture::open_source(&cfg).map_err(anyhow::Error::msg)?;
                self.metrics.register(|r| source.register_metrics(r));
                Some(self.start_inspection(source, plc.clone())?)
            }
            None => None,
        };
        let outbox = match &self.config.mqtt {
            Some(broker) => Some(Outbox::start(
                broker,
                &self.config.device,
                self.models.up_topic(UpKind::Verdict),
                self.verdicts.clone(),
                self.outbox_notify.clone(),
                crate::verdicts::outbox::WINDOW,
            )?),
            None => None,
        };
        let http = match &self.config.http {
            Some(h) => Some(HttpServer::start(h, self.http_state(), self.labeling_state()).await?),
            None => None,
        };
        let mut conn = match self.config.mqtt.clone() {
            Some(broker) => {
                let d = &self.config.device;
                let mut options = broker.options(&format!("edge-{}-{}", d.site, d.id))?;
                options.set_clean_session(false);
                options.set_last_will(LastWill::new(
                    self.models.up_topic(UpKind::Status),
                    self.models.status(false).encode(),
                    QoS::AtLeastOnce,
                    true,
                ));
                let conn = Connection::start_device(options, self.models.subscriptions());
                self.models.set_client(conn.client.clone());
                Some(conn)
            }
            None => None,
        };
        let mut connected = conn.as_ref().map(|c| c.connected.clone());
        loop {
            let trial = self.models.trial_deadline();
            tokio::select! {
                _ = &mut shutdown => break,
                _ = async { tokio::time::sleep_until(trial.expect("guarded")).await }, if trial.is_some() => {
                    self.models.confirm_trial();
                }
                changed = async { connected.as_mut().expect("guarded").changed().await }, if connected.is_some() => {
                    if changed.is_err() {
                        connected = None;
                    } else if connected.as_ref().is_some_and(|c| *c.borrow()) {
                        tracing::info!("mqtt: connected");
                        self.models.on_connected();
                    }
                }
                msg = async { conn.as_mut().expect("guarded").incoming.recv().await }, if conn.is_some() => {
                    match msg {
                        Some(m) => self.models.handle(m).await,
                        None => break,
                    }
                }
            }
        }
        if let Some(inspection) = inspection {
            inspection.stop().await;
        }
        if let Some(plc) = &plc {
            plc.stop();
        }
        if let Some(http) = http {
            http.stop().await;
        }
        if let Some(outbox) = outbox {
            outbox.drain(Duration::from_secs(5)).await;
        }
        let _ = self.verdicts.flush();
        self.models.flush().await;
        if let Some(conn) = conn {
            let topic = self.models.up_topic(UpKind::Status);
            let _ = conn
                .client
                .publish(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    self.models.status(false).encode(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.close().await;
        }
        Ok(())
    }

    /// Inspection: each decision becomes a stored verdict, goes to the PLC, is counted, offered
    /// to the review queue and logged.
    fn start_inspection(
        &self,
        source: Box<dyn capture::FrameSource>,
        plc: Option<Arc<PlcLink>>,
    ) -> anyhow::Result<Inspection> {
        let recorder = Recorder {
            store: self.verdicts.clone(),
            device: self.config.device.id.clone(),
            outbox: self.outbox_notify.clone(),
        };
        let review = self.review.clone();
        let metrics = self.metrics.clone();
        let store = self.verdicts.clone();
        let inspection = Inspection::start(
            source,
            self.config.pipeline.clone(),
            self.config.rules.clone(),
            self.models.active(),
            self.stats.clone(),
            Arc::new(move |d: Decision| {
                let Some((verdict, frame)) = recorder.record(d) else {
                    store
                        .lost
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                };
                if let Some(plc) = &plc {
                    plc.offer(&verdict);
                }
                if let Some(review) = &review
                    && verdict.undecided.is_none()
                    && let Err(e) = review.consider(&verdict, &frame)
                {
                    tracing::error!("review queue: frame {}: {e}", verdict.id);
                }
                count_and_log(&metrics, &verdict);
            }),
        )?;
        *self.queue.lock().expect("lock") = Some(inspection.queue.clone());
        Ok(inspection)
    }

    fn http_state(&self) -> AppState {
        AppState {
            metrics: self.metrics.clone(),
            stats: self.stats.clone(),
            store: self.verdicts.clone(),
            active: self.models.active(),
            queue: self.queue.clone(),
            review: self.review.clone(),
            has_source: self.config.source.is_some(),
            watchdog_ms: self.config.pipeline.watchdog_ms,
            last_scrape: Arc::new(Mutex::new((Instant::now(), 0))),
        }
    }

    fn labeling_state(&self) -> Option<LabelingState> {
        let queue = self.review.clone()?;
        Some(LabelingState {
            queue,
            active: self.models.active(),
            device: self.config.device.id.clone(),
            tile: self.config.pipeline.tile,
            tile_overlap: self.config.pipeline.tile_overlap,
            heatmap_lock: Default::default(),
        })
    }
}

fn count_and_log(metrics: &Metrics, verdict: &Verdict) {
    let result = verdict.result();
    metrics
        .verdicts
        .get_or_create(&ResultLabel { result })
        .inc();
    if let Some(u) = &verdict.undecided {
        metrics
            .undecided
            .get_or_create(&CauseLabel {
                cause: u.cause.as_str(),
            })
            .inc();
        tracing::warn!(
            "verdict {} frame {} line {}: UNDECIDED ({}: {}) -> {}",
            verdict.id,
            verdict.frame,
            verdict.line,
            u.cause.as_str(),
            u.reason,
            if verdict.pass {
                "pass (flagged)"
            } else {
                "reject"
            }
        );
        return;
    }
    metrics.latency.observe(verdict.latency_ms / 1e3);
    tracing::info!(
        "verdict {} frame {} line {}: {} ({} failing defects, {:.0} ms)",
        verdict.id,
        verdict.frame,
        verdict.line,
        if verdict.pass { "PASS" } else { "FAIL" },
        verdict.defects.iter().filter(|x| x.fails).count(),
        verdict.latency_ms
    );
}
