//! The outbox: stored verdicts published in order over their own MQTT session. A verdict
//! leaves the outbox only when the broker has acknowledged it (QoS 1), so a broker outage or a
//! crash delays verdicts but loses none (a consumer may see one twice after a crash and
//! deduplicates on the id).

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::mqtt::{BrokerConfig, Connection};
use rumqttc::QoS;

use super::store::VerdictStore;
use crate::identity::DeviceConfig;

/// The verdict publisher task.
pub struct Outbox {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    store: Arc<VerdictStore>,
}

impl Outbox {
    /// Gives pending verdicts up to `grace` to go out, then stops.
    pub async fn drain(self, grace: Duration) {
        let until = Instant::now() + grace;
        while self.store.pending() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

impl Outbox {
    /// Publishes stored verdicts in order over their own MQTT session, one at a time: a
    /// verdict leaves the outbox only when the broker has acknowledged it (QoS 1), so a broker
    /// outage or a crash delays verdicts but loses none (a consumer may see one twice after a
    /// crash and deduplicates on the id).
    pub fn start(
        broker: &BrokerConfig,
        device: &DeviceConfig,
        topic: String,
        store: Arc<VerdictStore>,
        notify: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<Self> {
        let d = device;
        let mut options = broker.options(&format!("edge-{}-{}-verdicts", d.site, d.id))?;
        options.set_clean_session(false);
        let (mut conn, mut acks) = Connection::start_with_acks(options, vec![]);
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let task = {
            let store = store.clone();
            tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        break;
                    }
                    let next = match store.next_pending() {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::error!("{e}");
                            None
                        }
                    };
                    let Some((id, payload)) = next else {
                        tokio::select! {
                            _ = notify.notified() => {}
                            _ = stop.changed() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    };
                    if conn.wait_connected(Duration::from_secs(1)).await.is_err() {
                        continue;
                    }
                    while acks.try_recv().is_ok() {}
                    if conn
                        .client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    let acked = tokio::time::timeout(Duration::from_secs(5), async {
                        let mut pkid = None;
                        while let Some(ev) = acks.recv().await {
                            match ev {
                                protocol::mqtt::AckEvent::Sent(p) if pkid.is_none() => {
                                    pkid = Some(p)
                                }
                                protocol::mqtt::AckEvent::Acked(p) if Some(p) == pkid => {
                                    return true;
                                }
                                _ => {}
                            }
                        }
                        false
                    })
                    .await;
                    if acked == Ok(true) {
                        if let Err(e) = store.delivered(id) {
                            tracing::error!("{e}");
                        }
                    } else {
                        tracing::warn!("verdict {id}: no acknowledgement yet, sending again");
                    }
                }
                conn.close().await;
            })
        };
        Ok(Outbox {
            task,
            stop: stop_tx,
            store,
        })
    }
}
