//! Broker settings shared by the edge (its TOML `[mqtt]` section) and the trainer's publisher,
//! and a small connection wrapper that keeps rumqttc's event loop running and reconnecting.

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::ProtocolError;

/// Where the broker is and how to authenticate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name (with TLS, the name the server certificate is checked against).
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// TLS; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// MQTT keep-alive in seconds (a dead connection is noticed after 1.5x this).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_port() -> u16 {
    1883
}

fn default_keep_alive() -> u64 {
    10
}

/// PEM files for TLS: the CA that signed the broker's certificate, and optionally this client's
/// certificate and key (for brokers that require client certificates).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl BrokerConfig {
    pub fn plain(host: &str, port: u16) -> Self {
        Self {
            host: host.to_string(),
            port,
            username: None,
            password: None,
            tls: None,
            keep_alive_s: default_keep_alive(),
        }
    }

    /// rumqttc options for this broker. Packets up to [`MAX_PACKET`] pass either way: larger
    /// ones are refused by the client before they are buffered (the connection drops and
    /// reconnects), whoever sends them.
    pub fn options(&self, client_id: &str) -> Result<MqttOptions, ProtocolError> {
        let mut options = MqttOptions::new(client_id, &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(self.keep_alive_s.max(1)));
        options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some((u, p)) = self.credentials()? {
            options.set_credentials(u, p);
        }
        if let Some(t) = self.transport()? {
            options.set_transport(t);
        }
        Ok(options)
    }

    fn credentials(&self) -> Result<Option<(String, String)>, ProtocolError> {
        match (&self.username, &self.password) {
            (Some(u), p) => Ok(Some((u.clone(), p.clone().unwrap_or_default()))),
            (None, Some(_)) => Err(ProtocolError::Invalid(
                "mqtt: a password is set without a username".into(),
            )),
            (None, None) => Ok(None),
        }
    }

    fn transport(&self) -> Result<Option<Transport>, ProtocolError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        // rumqttc is built without a default crypto provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                ProtocolError::Invalid(format!("mqtt.tls.{what} {}: {e}", p.display()))
            })
        };
        let ca = read(&tls.ca, "ca")?;
        let client_auth = match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => Some((read(c, "cert")?, read(k, "key")?)),
            (None, None) => None,
            _ => {
                return Err(ProtocolError::Invalid(
                    "mqtt.tls: `cert` and `key` go together".into(),
                ));
            }
        };
        Ok(Some(Transport::tls(ca, client_auth, None)))
    }

    /// The largest packet the broker accepts, as its MQTT v5 CONNACK says (one short v5
    /// connection). `None`: the broker names no limit, speaks only MQTT 3.1.1, or did not
    /// answer within 10 s (the connection that follows reports why).
    pub async fn max_packet_size(&self) -> Result<Option<u32>, ProtocolError> {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        let id = format!("limits-{}-{}", std::process::id(), crate::unix_now_ms());
        let mut options = rumqttc::v5::MqttOptions::new(id, &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(self.keep_alive_s.max(1)));
        options.set_clean_start(true);
        if let Some((u, p)) = self.credentials()? {
            options.set_credentials(u, p);
        }
        if let Some(t) = self.transport()? {
            options.set_transport(t);
        }
        let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 4);
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(P5::ConnAck(ack))) => {
                        return Ok(ack.properties.and_then(|p| p.max_packet_size));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let limit = match answer {
            Ok(Ok(limit)) => {
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
                limit
            }
            Ok(Err(e)) => {
                tracing::debug!("MQTT v5 CONNACK not read ({e}): no packet limit known");
                None
            }
            Err(_) => None,
        };
        Ok(limit)
    }
}

/// Largest MQTT packet this protocol needs: its largest message (an offer, at most
/// [`crate::messages::MAX_JSON_BYTES`]; a chunk is at most half of it) plus topic and headers.
pub const MAX_PACKET: usize = crate::messages::MAX_JSON_BYTES + (16 << 10);

/// Incoming messages a device holds while busy (see [`Connection::start_device`]).
pub const DEVICE_QUEUE: usize = 64;

/// Incoming messages a rollout publisher can hold (see [`Connection::start_publisher`]).
pub const PUBLISHER_QUEUE: usize = 1 << 16;

/// The wait before reconnect attempt `attempt` (0-based): 250 ms doubling up to 8 s, each drawn
/// between half and all of that, so that a fleet whose broker restarted does not come back in
/// one burst.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let ceiling = 250u64 << attempt.min(5);
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let jitter = u64::from_le_bytes(r) % (ceiling / 2 + 1);
    Duration::from_millis(ceiling / 2 + jitter)
}

/// An incoming message.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub retain: bool,
}

/// Delivery events for QoS 1 publishes, for callers that must know what the broker has
/// (the verdict outbox).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckEvent {
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
}

/// A running connection: the client to publish and subscribe with, the incoming messages, and a
/// watch that tells whether the broker link is up, with the subscriptions confirmed (it
/// reconnects by itself).
pub struct Connection {
    pub client: AsyncClient,
    pub incoming: mpsc::Receiver<Incoming>,
    pub connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Starts the event loop. `on_connect` subscriptions are (re)made on every connection, so
    /// a broker restart without persistence loses nothing we listen to.
    pub fn start(options: MqttOptions, subscriptions: Vec<(String, QoS)>) -> Connection {
        Self::start_inner(options, subscriptions, None, 1024)
    }

    /// [`Connection::start`] for a device: at most [`DEVICE_QUEUE`] incoming messages wait
    /// while the device is busy (a self-test), so memory stays under `DEVICE_QUEUE` x
    /// [`MAX_PACKET`]; beyond it the client stops reading and the broker holds the rest.
    pub fn start_device(options: MqttOptions, subscriptions: Vec<(String, QoS)>) -> Connection {
        Self::start_inner(options, subscriptions, None, DEVICE_QUEUE)
    }

    /// [`Connection::start`] for a rollout publisher: a deep incoming queue (thousands of
    /// devices' statuses and reports, a few hundred bytes each), so the event loop never waits
    /// on the reader while the publisher is busy sending chunks.
    pub fn start_publisher(options: MqttOptions, subscriptions: Vec<(String, QoS)>) -> Connection {
        Self::start_inner(options, subscriptions, None, PUBLISHER_QUEUE)
    }

    /// Like [`Connection::start`], also reporting when publishes go out and are acknowledged.
    pub fn start_with_acks(
        options: MqttOptions,
        subscriptions: Vec<(String, QoS)>,
    ) -> (Connection, mpsc::UnboundedReceiver<AckEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self::start_inner(options, subscriptions, Some(tx), 1024),
            rx,
        )
    }

    fn start_inner(
        options: MqttOptions,
        subscriptions: Vec<(String, QoS)>,
        acks: Option<mpsc::UnboundedSender<AckEvent>>,
        queue: usize,
    ) -> Connection {
        let (client, eventloop) = AsyncClient::new(options, 256);
        let (tx, rx) = mpsc::channel(queue);
        let (up_tx, up_rx) = watch::channel(false);
        let task = tokio::spawn(drive(
            eventloop,
            client.clone(),
            subscriptions,
            tx,
            up_tx,
            acks,
        ));
        Connection {
            client,
            incoming: rx,
            connected: up_rx,
            task,
        }
    }

    /// Waits until connected (or the timeout passes).
    pub async fn wait_connected(&mut self, timeout: Duration) -> Result<(), ProtocolError> {
        let wait = self.connected.wait_for(|up| *up);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ProtocolError::Mqtt(format!(
                "no connection to the broker within {timeout:?}"
            ))),
        }
    }

    /// Publishes (QoS 1 unless told otherwise).
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), ProtocolError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| ProtocolError::Mqtt(e.to_string()))
    }

    /// Drops the connection without a DISCONNECT, as a device losing power would: the broker
    /// notices the closed socket and sends the last will.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Disconnects cleanly (the broker does not send the last will).
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<(String, QoS)>,
    tx: mpsc::Sender<Incoming>,
    up: watch::Sender<bool>,
    acks: Option<mpsc::UnboundedSender<AckEvent>>,
) {
    let mut logged_down = false;
    let mut attempt = 0u32;
    let mut awaiting_suback = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Subscribe again on every connection (a restarted broker without persistence
                // forgot us). Not try_subscribe: with publishes queued during the outage the
                // request channel can be full, and a dropped subscribe would leave us deaf.
                // "Up" once the broker has confirmed the subscriptions: what the owner sends
                // on connecting (a status, a report) may draw an answer at once.
                awaiting_suback = !subscriptions.is_empty();
                if !subscriptions.is_empty() {
                    let (client, subs) = (client.clone(), subscriptions.clone());
                    tokio::spawn(async move {
                        let filters = subs
                            .into_iter()
                            .map(|(path, qos)| rumqttc::SubscribeFilter::new(path, qos));
                        if let Err(e) = client.subscribe_many(filters).await {
                            tracing::warn!("mqtt: subscribe failed: {e}");
                        }
                    });
                }
                if !awaiting_suback {
                    let _ = up.send(true);
                }
                attempt = 0;
                if logged_down {
                    tracing::info!("mqtt: reconnected");
                }
                logged_down = false;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) if awaiting_suback => {
                awaiting_suback = false;
                let _ = up.send(true);
            }
            Ok(Event::Incoming(Packet::Publish(Publish {
                topic,
                payload,
                retain,
                ..
            }))) => {
                if tx
                    .send(Incoming {
                        topic,
                        payload,
                        retain,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                if let Some(a) = &acks {
                    let _ = a.send(AckEvent::Sent(pkid));
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(a) = &acks {
                    let _ = a.send(AckEvent::Acked(ack.pkid));
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                let _ = up.send(false);
                // Let the disconnect go out, then stop.
                let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = up.send(false);
                if !logged_down {
                    tracing::warn!("mqtt: connection lost or refused ({e}); retrying");
                    logged_down = true;
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(reconnect_delay(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}
