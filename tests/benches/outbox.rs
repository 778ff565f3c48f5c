//! Verdict delivery rate: `scripts/bench/outbox`.
//!
//! A verdict store holding N undelivered verdicts (as after an outage) is drained by the real
//! outbox into a loopback mosquitto, directly and through a proxy that adds a 50 ms round trip
//! (25 ms each way). The reference, in the same run: the same outbox with a window of one
//! verdict in flight (one broker round trip per verdict, as the outbox worked before its
//! window). Prints verdicts/s per case and the window's ratio over the reference.
//!
//! Environment: VERDICTS (per loopback case, default 5000; the delayed one-at-a-time case drains
//! a tenth of it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{Broker, Proxy};
use edge::identity::DeviceConfig;
use edge::verdicts::outbox::{Outbox, WINDOW};
use edge::verdicts::store::{StoreConfig, VerdictStore};
use protocol::Verdict;
use protocol::mqtt::BrokerConfig;

fn verdict(id: u64) -> Verdict {
    Verdict {
        id,
        device: "bench".into(),
        frame: id,
        line: 0,
        origin: "bench".into(),
        width: 224,
        height: 224,
        captured_ms: 0,
        decided_ms: 0,
        latency_ms: 1.0,
        pass: !id.is_multiple_of(7),
        defects: vec![],
        model: Some(("m".into(), 1)),
        undecided: None,
        position_mm: None,
    }
}

/// Verdicts per second draining `n` verdicts through `port` with `window` in flight.
fn drain(rt: &tokio::runtime::Runtime, port: u16, n: u64, window: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        VerdictStore::open(
            &dir.path().join("verdicts.sled"),
            StoreConfig {
                keep_frames: edge::verdicts::store::KeepFrames::None,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let empty = image::GrayImage::new(0, 0);
    for _ in 0..n {
        let id = store.next_id().unwrap();
        store.record(&verdict(id), &empty).unwrap();
    }
    assert_eq!(store.pending() as u64, n);
    let device = DeviceConfig {
        id: format!("bench-{window}-{port}"),
        site: "s".into(),
        line: "l".into(),
        groups: vec![],
    };
    rt.block_on(async {
        let started = Instant::now();
        let outbox = Outbox::start(
            &BrokerConfig::plain("127.0.0.1", port),
            &device,
            "edgeinsp/s/l/bench/verdict".into(),
            store.clone(),
            Arc::new(tokio::sync::Notify::new()),
            window,
        )
        .unwrap();
        while store.pending() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "not drained in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        outbox.drain(Duration::from_secs(1)).await;
        rate
    })
}

fn main() {
    let n: u64 = std::env::var("VERDICTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let proxy = Proxy::start_with_delay(broker.port, Duration::from_millis(25));
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("| link | window | verdicts | verdicts/s | ratio to window 1 |");
    println!("| --- | --- | --- | --- | --- |");
    for (link, port, reference_n) in [
        ("loopback", broker.port, n),
        ("50 ms round trip", proxy.port, (n / 10).max(50)),
    ] {
        let one = drain(&rt, port, reference_n, 1);
        println!("| {link} | 1 | {reference_n} | {one:.0} | 1.00 |");
        let many = drain(&rt, port, n, WINDOW);
        println!(
            "| {link} | {WINDOW} | {n} | {many:.0} | {:.2} |",
            many / one
        );
    }
}
