//! The outbox: stored verdicts published in order over their own MQTT session, with a window of
//! verdicts in flight. A verdict leaves the outbox only when the broker has acknowledged the
//! packet that carried it (QoS 1, matched by packet id), so a broker outage or a crash delays
//! verdicts but loses none. Delivery is at least once: after a crash, a reconnect or a late
//! acknowledgement a consumer may see a verdict twice and deduplicates on (device, id).
//!
//! Packet ids: rumqttc reports `Outgoing::Publish(pkid)` once per publish in the order the
//! requests were made, and again when it retransmits an unacknowledged packet after a
//! reconnect. A pkid already mapped to a verdict is such a retransmission; any other is the next
//! request's. A new publish never reuses the pkid of an unacknowledged one (rumqttc holds it
//! back on a collision), so an acknowledgement can only ever mark its own verdict delivered.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::mqtt::{AckEvent, BrokerConfig, Connection};
use rumqttc::QoS;

use super::store::VerdictStore;
use crate::identity::DeviceConfig;

/// Verdicts in flight at once (rumqttc's own in-flight limit is 100).
pub const WINDOW: usize = 64;
/// A verdict unacknowledged this long while connected is published again.
const RESEND_AFTER: Duration = Duration::from_secs(30);

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

/// The verdicts in flight and the packet ids that carry them.
#[derive(Default)]
struct Window {
    /// Verdict id -> when it was (last) published.
    sent: BTreeMap<u64, Instant>,
    /// Publish requests made, in order, whose packet id rumqttc has not reported yet.
    unassigned: VecDeque<u64>,
    /// Packet id -> verdict id, for every packet not yet acknowledged.
    pkids: HashMap<u16, u64>,
    /// Highest verdict id taken into the window.
    last_taken: u64,
}

impl Window {
    /// Returns the verdict an acknowledgement delivers.
    fn on_event(&mut self, event: AckEvent) -> Option<u64> {
        match event {
            AckEvent::Sent(pkid) => {
                if !self.pkids.contains_key(&pkid)
                    && let Some(id) = self.unassigned.pop_front()
                {
                    self.pkids.insert(pkid, id);
                }
                None
            }
            AckEvent::Acked(pkid) => {
                let id = self.pkids.remove(&pkid)?;
                // A verdict sent twice is delivered by the first acknowledgement; the other
                // copy's pkid stays mapped until its own acknowledgement.
                self.sent.remove(&id).map(|_| id)
            }
        }
    }
}

impl Outbox {
    /// Publishes stored verdicts in order over their own MQTT session, up to `window` in
    /// flight ([`WINDOW`] in the daemon; 1 gives one broker round trip per verdict).
    pub fn start(
        broker: &BrokerConfig,
        device: &DeviceConfig,
        topic: String,
        store: Arc<VerdictStore>,
        notify: Arc<tokio::sync::Notify>,
        window: usize,
    ) -> anyhow::Result<Self> {
        let d = device;
        let mut options = broker.options(&format!("edge-{}-{}-verdicts", d.site, d.id))?;
        options.set_clean_session(false);
        options.set_inflight(window.clamp(1, 100) as u16 + 8);
        let (mut conn, mut acks) = Connection::start_with_acks(options, vec![]);
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let window = window.clamp(1, 100);
        let task = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut w = Window::default();
                let mut resent = 0u64;
                while !*stop.borrow() {
                    if !*conn.connected.borrow() {
                        // rumqttc keeps the packets in flight and retransmits them on reconnect;
                        // their acknowledgement time starts again then.
                        if conn.wait_connected(Duration::from_secs(1)).await.is_ok() {
                            let now = Instant::now();
                            w.sent.values_mut().for_each(|at| *at = now);
                        }
                        continue;
                    }
                    // Fill the window in id order.
                    let room = window.saturating_sub(w.sent.len());
                    let next = if room > 0 {
                        store.pending_after(w.last_taken, room).unwrap_or_else(|e| {
                            tracing::error!("{e}");
                            vec![]
                        })
                    } else {
                        vec![]
                    };
                    for (id, payload) in next {
                        w.last_taken = id;
                        if conn
                            .client
                            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                            .await
                            .is_err()
                        {
                            break;
                        }
                        w.sent.insert(id, Instant::now());
                        w.unassigned.push_back(id);
                    }
                    // Verdicts the broker has not acknowledged for long go out again.
                    let stale: Vec<u64> = w
                        .sent
                        .iter()
                        .filter(|(_, at)| at.elapsed() > RESEND_AFTER)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in stale {
                        let Ok(Some(payload)) = store.pending_payload(id) else {
                            w.sent.remove(&id);
                            continue;
                        };
                        if conn
                            .client
                            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                            .await
                            .is_ok()
                        {
                            resent += 1;
                            tracing::warn!(
                                "verdict {id}: no acknowledgement in {RESEND_AFTER:?}, sent again ({resent} so far)"
                            );
                            w.sent.insert(id, Instant::now());
                            w.unassigned.push_back(id);
                        }
                    }
                    tokio::select! {
                        ev = acks.recv() => {
                            let Some(ev) = ev else { break };
                            let mut delivered = Vec::new();
                            delivered.extend(w.on_event(ev));
                            while let Ok(ev) = acks.try_recv() {
                                delivered.extend(w.on_event(ev));
                            }
                            if let Err(e) = store.delivered_many(&delivered) {
                                tracing::error!("{e}");
                            }
                        }
                        _ = notify.notified(), if w.sent.len() < window => {}
                        _ = stop.changed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A retransmitted packet's acknowledgement can only deliver its own verdict.
    #[test]
    fn acknowledgements_match_packet_ids() {
        let mut w = Window::default();
        for id in [1, 2, 3] {
            w.sent.insert(id, Instant::now());
            w.unassigned.push_back(id);
        }
        assert_eq!(w.on_event(AckEvent::Sent(7)), None);
        assert_eq!(w.on_event(AckEvent::Sent(8)), None);
        // Verdict 1 is acknowledged; then the link drops and rumqttc retransmits pkid 8.
        assert_eq!(w.on_event(AckEvent::Acked(7)), Some(1));
        assert_eq!(w.on_event(AckEvent::Sent(8)), None);
        assert_eq!(w.on_event(AckEvent::Sent(9)), None);
        // 9 carries verdict 3: its ack must not deliver verdict 2 (pkid 8).
        assert_eq!(w.on_event(AckEvent::Acked(9)), Some(3));
        assert_eq!(w.on_event(AckEvent::Acked(8)), Some(2));
        assert_eq!(w.on_event(AckEvent::Acked(8)), None);
        assert!(w.sent.is_empty() && w.pkids.is_empty() && w.unassigned.is_empty());
    }
}
