//! Rollout delivery benchmark over a loopback mosquitto: `scripts/bench/rollout`.
//!
//! For an edge-size (~22 MB) and a Swin-T-size (~115 MB) package: time from offer to "staged"
//! (every chunk in, digest verified, package on disk) and to "activated" (self-test passed),
//! against the reference in the same run: the same bytes published raw, QoS 1, same chunk size,
//! to one subscriber through the same broker. Then the resume cost: the edge is SIGKILLed at 50%
//! and restarted; how many chunks are sent in all, and how long the transfer took against the
//! uninterrupted one.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{Broker, Edge, Watcher, edge_config, run_ok};
use protocol::messages::{Report, ReportState};

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let chunk_kib: usize = std::env::var("CHUNK_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let files = e2e::Fixtures::at(dir.path());
    let fleet_pub = files.keygen("fleet");
    files.synth(1, 0);
    let golden = files.golden("crazing_1.jpg");
    let mut packages = vec![];
    for (version, size) in [(1, "nano"), (2, "edge"), (3, "tiny")] {
        let model = files.init_model(size, size, 0);
        let pkg = d(&format!("{size}.edgepkg"));
        e2e::package(
            &model,
            &files.path("keys/fleet.key"),
            version,
            &golden,
            Path::new(&pkg),
        );
        packages.push((size, pkg));
    }
    let factory = dir.path().join("nano.edgepkg");
    println!("chunk size {chunk_kib} KiB, loopback mosquitto, one edge daemon");
    println!(
        "{:<6} {:>9} | {:>10} {:>8} | {:>11} | {:>10} {:>8} | {:>6}",
        "model", "MB", "to staged", "MB/s", "to active", "raw QoS1", "MB/s", "x raw"
    );
    let mut full_times = vec![];
    for (size, pkg) in &packages[1..] {
        let bytes = std::fs::metadata(pkg).unwrap().len() as f64;
        let broker = Broker::start(dir.path());
        let w = Watcher::start(broker.port);
        let id = format!("bench-{size}");
        let _edge = Edge::start(
            dir.path(),
            &id,
            &edge_config(&id, &[], broker.port, fleet_pub.trim(), &factory, ""),
        );
        w.wait_status(&id, Duration::from_secs(60), |s| s.online);
        let out = publish(&broker, pkg, &id, chunk_kib);
        let total = Duration::from_secs_f64(publisher_seconds(&out));
        let staged = w
            .wait::<Report>(&format!("/{id}/report"), Duration::from_secs(5), |r| {
                r.state == ReportState::Staged
            })
            .is_some();
        assert!(staged);
        // The watcher does not timestamp; re-measure staged from the edge log instead.
        let staged_s = staged_seconds(&dir.path().join(&id).join("edge.log"));
        let raw = raw_qos1(broker.port, bytes as usize, chunk_kib << 10);
        let staged_s = staged_s.unwrap_or(total.as_secs_f64());
        println!(
            "{:<6} {:>9.1} | {:>9.2}s {:>8.1} | {:>10.2}s | {:>9.2}s {:>8.1} | {:>6.2}",
            size,
            bytes / 1e6,
            staged_s,
            bytes / 1e6 / staged_s,
            total.as_secs_f64(),
            raw,
            bytes / 1e6 / raw,
            raw / staged_s,
        );
        full_times.push((size.to_string(), pkg.clone(), total.as_secs_f64()));
    }
    println!("\nresume after SIGKILL of the edge at 50% (restarted at once):");
    for (size, pkg, full) in &full_times {
        let broker = Broker::start(dir.path());
        let w = Watcher::start(broker.port);
        let id = format!("resume-{size}");
        let mut edge = Edge::start(
            dir.path(),
            &id,
            &edge_config(&id, &[], broker.port, fleet_pub.trim(), &factory, ""),
        );
        w.wait_status(&id, Duration::from_secs(60), |s| s.online);
        let count =
            (std::fs::metadata(pkg).unwrap().len() as usize).div_ceil(chunk_kib << 10) as u32;
        let (pkg2, addr, id2) = (pkg.clone(), broker.addr(), id.clone());
        let publisher = std::thread::spawn(move || {
            e2e::run(
                "trainer",
                &[
                    "publish",
                    &pkg2,
                    "--broker",
                    &addr,
                    "--site",
                    "test",
                    "--to",
                    &format!("device:{id2}"),
                    "--chunk-kib",
                    &chunk_kib.to_string(),
                ],
            )
        });
        w.wait::<Report>(&format!("/{id}/report"), Duration::from_secs(120), |r| {
            r.have >= count / 2
        })
        .expect("half way");
        edge.kill9();
        edge.restart();
        let (ok, out) = publisher.join().unwrap();
        assert!(ok, "{out}");
        let total = publisher_seconds(&out);
        let sent: u64 = out
            .lines()
            .find_map(|l| {
                l.split_once(" chunk(s), ")
                    .map(|(a, _)| a.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .unwrap();
        let log = edge.log();
        let resumed = log
            .lines()
            .find(|l| l.contains("resuming transfer"))
            .unwrap_or("(no resume line)");
        println!(
            "{size:<6} {count} chunks: {sent} sent in all ({:.0}% extra), {total:.2} s vs {full:.2} s uninterrupted ({:.2}x); edge: {}",
            (sent as f64 / count as f64 - 1.0) * 100.0,
            total / full,
            resumed.split("daemon: ").last().unwrap_or(resumed)
        );
    }
}

/// The publisher's own timing: offer to the device's final report.
fn publisher_seconds(out: &str) -> f64 {
    out.lines()
        .find_map(|l| {
            l.split_once(" sent in ")
                .and_then(|(_, r)| r.split(' ').next()?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no timing in:\n{out}"))
}

fn publish(broker: &Broker, pkg: &str, id: &str, chunk_kib: usize) -> String {
    run_ok(
        "trainer",
        &[
            "publish",
            pkg,
            "--broker",
            &broker.addr(),
            "--site",
            "test",
            "--to",
            &format!("device:{id}"),
            "--chunk-kib",
            &chunk_kib.to_string(),
        ],
    )
}

/// Seconds between "receiving" and "staged" in an edge log (its timestamps).
fn staged_seconds(log: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let stamp = |needle: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.contains(needle))?;
        let t = line.split_whitespace().next()?; // 2026-11-28T08:05:41.572083Z
        let hms = t.split('T').nth(1)?.trim_end_matches('Z');
        let mut parts = hms.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    Some(stamp("staged ")? - stamp("receiving ")?)
}

/// The reference: `bytes` published raw at QoS 1 in `chunk` pieces, until one subscriber has them all.
fn raw_qos1(port: u16, bytes: usize, chunk: usize) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let broker = protocol::mqtt::BrokerConfig::plain("127.0.0.1", port);
        let mut sub = protocol::mqtt::Connection::start(
            broker.options("raw-sub").unwrap(),
            vec![("raw/#".into(), rumqttc::QoS::AtLeastOnce)],
        );
        sub.wait_connected(Duration::from_secs(10)).await.unwrap();
        let mut publ =
            protocol::mqtt::Connection::start(broker.options("raw-pub").unwrap(), vec![]);
        publ.wait_connected(Duration::from_secs(10)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let data = vec![0x5au8; chunk];
        let n = bytes.div_ceil(chunk);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..n {
                publ.publish("raw/x".into(), data.clone(), false)
                    .await
                    .unwrap();
            }
            publ
        });
        let mut got = 0;
        while got < n {
            sub.incoming.recv().await.unwrap();
            got += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        sender.await.unwrap().close().await;
        sub.close().await;
        secs
    })
}
