//! Serving what the daemon knows: the HTTP API (health, readiness, Prometheus metrics,
//! verdicts, frames), the review queue of frames for quality engineers, and the labeling page
//! over it.

pub mod http;
pub mod labeling;
pub mod metrics;
pub mod review;

use serde::Deserialize;

/// `[http]`: where the endpoints listen.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. "0.0.0.0:8080".
    pub listen: String,
}

/// The running HTTP server.
pub struct HttpServer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `config.listen` (an error names the address) and serves the routes until stopped.
    pub async fn start(
        config: &HttpConfig,
        state: http::AppState,
        labeling: Option<labeling::LabelingState>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("http.listen {}: {e}", config.listen))?;
        tracing::info!("http: listening on {}", listener.local_addr()?);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, http::router(state, labeling))
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
            if let Err(e) = serve.await {
                tracing::error!("http: {e}");
            }
        });
        Ok(Self { stop, task })
    }

    /// Stops accepting requests and gives the open ones two seconds.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.task).await;
    }
}
