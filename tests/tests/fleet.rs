//! Fleet rollouts over a real mosquitto to simulated devices (`edge fleet-sim`: the daemon's own
//! transfer code, tens of devices in one process) with the real publisher (`trainer publish`):
//! waves in order, devices killed mid-transfer and back, devices offline at the start served when
//! they return after the publisher was restarted on its record, an abort threshold that stops a
//! rollout before its last wave, the broker restarted mid-rollout, a broker packet limit, the
//! generated ACL, and shared verdict consumers. `scripts/bench/fleet` runs the rollout scenarios
//! at 1,000 devices and more.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::{Broker, Watcher, bin, run};

/// The factory package (a real signed model, 2.5 MB) and its public key.
fn factory() -> (String, PathBuf) {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge/models");
    (
        models.join("neu-edge.edgepkg").display().to_string(),
        models.join("release.pub"),
    )
}

/// Starts `edge fleet-sim` with these extra arguments; its summary comes from `finish`.
struct Sim {
    child: Child,
}

impl Sim {
    fn start(broker: &Broker, devices: usize, extra: &[&str]) -> Sim {
        let (_, key) = factory();
        let child = Command::new(bin("edge"))
            .args([
                "fleet-sim",
                "--broker",
                &broker.addr(),
                "--site",
                "test",
                "--devices",
                &devices.to_string(),
                "--groups",
                "line",
                "--trusted",
                key.to_str().unwrap(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting edge fleet-sim");
        Sim { child }
    }

    fn finish(self) -> serde_json::Value {
        let out = self.child.wait_with_output().expect("fleet-sim ran");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("fleet-sim summary: {e}\n{text}"))
    }
}

/// A broker and `n` simulated devices PREFIX-0000, PREFIX-0001, ... started with `args`, each
/// with its retained status published.
fn fleet(n: usize, prefix: &str, args: &[&str]) -> (tempfile::TempDir, Broker, Sim) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    let mut all = vec!["--prefix", prefix];
    all.extend_from_slice(args);
    let sim = Sim::start(&broker, n, &all);
    for i in 0..n {
        w.wait_status(&format!("{prefix}-{i:04}"), Duration::from_secs(60), |_| {
            true
        });
    }
    (dir, broker, sim)
}

fn publish(broker: &Broker, args: &[&str]) -> (bool, String) {
    publish_to(&broker.addr(), args)
}

fn publish_to(addr: &str, args: &[&str]) -> (bool, String) {
    let (package, key) = factory();
    let mut all = vec![
        "publish",
        &package,
        "--broker",
        addr,
        "--site",
        "test",
        "--verify-with",
        key.to_str().unwrap(),
    ];
    if !args.contains(&"--chunk-kib") {
        all.extend_from_slice(&["--chunk-kib", "64"]);
    }
    all.extend_from_slice(args);
    run("trainer", &all)
}

fn device<'a>(summary: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    summary["per_device"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in the summary"))
}

#[test]
fn waves_in_order_killed_devices_resume_and_reports_stay_few() {
    let n = 40;
    // 10% of the devices lose power half way through and are back 3 s later.
    let (_dir, broker, sim) = fleet(
        n,
        "sim",
        &[
            "--kill",
            "10",
            "--kill-at",
            "0.5",
            "--down-s",
            "3",
            "--run-s",
            "120",
        ],
    );
    let (ok, out) = publish(
        &broker,
        &[
            "--to",
            "group:line",
            "--waves",
            "10%,30%,60%",
            "--timeout",
            "90",
        ],
    );
    let summary = sim.finish();
    assert!(ok, "{out}\n{summary:#}");
    assert_eq!(summary["activated"], n, "{summary:#}");
    let first = out.find("wave 1/3 (10%): offering").expect("wave 1");
    let second = out.find("wave 2/3 (30%): offering").expect("wave 2");
    let third = out.find("wave 3/3 (60%): offering").expect("wave 3");
    assert!(first < second && second < third, "{out}");
    assert!(out.contains("wave 1/3 (10%): 4 of 4 activated"), "{out}");
    // Reports: the answer to the offer, half way, staged, activated; a killed device also
    // says where it is when it comes back.
    for d in summary["per_device"].as_array().unwrap() {
        let limit = if d["killed"] == true { 5 } else { 4 };
        assert!(d["reports"].as_u64().unwrap() <= limit, "{d}");
    }
    let killed = summary["killed"].as_u64().unwrap();
    assert!(killed >= 1, "{summary:#}");
    let missed = summary["killed_missed_bytes"].as_f64().unwrap();
    let resent = summary["killed_resent_bytes"].as_f64().unwrap();
    assert!(missed > 0.0, "{summary:#}");
    assert!(
        resent <= 1.5 * missed,
        "re-sent {resent} for {missed} missed"
    );
    // Each device got the package about once: a broadcast per wave, repairs to single devices.
    let package = std::fs::metadata(factory().0).unwrap().len() as f64;
    let per_device = summary["chunk_bytes"].as_f64().unwrap() / (n as f64 * package);
    assert!(per_device < 1.2, "{per_device} packages per device");
}

#[test]
fn abort_threshold_stops_the_rollout_before_its_last_wave() {
    let n = 40;
    let (_dir, broker, sim) = fleet(n, "ab", &["--fail-selftest", "30", "--run-s", "20"]);
    let (ok, out) = publish(
        &broker,
        &[
            "--to",
            "group:line",
            "--waves",
            "10%,30%,60%",
            "--wave-success",
            "0",
            "--abort-percent",
            "10",
            "--abort-after",
            "4",
            "--timeout",
            "30",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("halted: aborted:"), "{out}");
    assert!(!out.contains("wave 3/3 (60%): offering"), "{out}");
    let summary = sim.finish();
    // Devices of the last wave never heard of the package.
    let last: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "wave 3/3 (60%):")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().split(':').next().unwrap())
        .collect();
    assert!(!last.is_empty(), "{out}");
    for id in last {
        let d = device(&summary, id);
        assert_eq!(d["chunk_bytes"], 0, "{d}");
        assert_eq!(d["reports"], 0, "{d}");
    }
}

#[test]
fn offline_devices_are_served_when_back_by_a_restarted_publisher() {
    let n = 20;
    let (dir, broker, sim) = fleet(
        n,
        "off",
        &["--offline", "15", "--offline-s", "12", "--run-s", "120"],
    );
    let record = dir.path().join("rollout.json");
    let record = record.to_str().unwrap();
    // The first publisher serves who is there and stops (its timeout) before the rest return.
    let (ok, out) = publish(
        &broker,
        &["--to", "group:line", "--record", record, "--timeout", "6"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("offline: not served"), "{out}");
    let offline = out.matches("offline: not served").count();
    assert!(offline >= 1, "{out}");
    // A new publisher on the same record continues: it serves the devices that come back.
    let (ok, out2) = publish(
        &broker,
        &["--to", "group:line", "--record", record, "--timeout", "60"],
    );
    let summary = sim.finish();
    assert!(ok, "{out2}\n{summary:#}");
    assert!(out2.contains("continuing the recorded rollout"), "{out2}");
    assert_eq!(summary["activated"], n, "{summary:#}");
    assert_eq!(summary["offline_at_start"], offline, "{summary:#}");
    // Served within seconds of coming back.
    assert!(
        summary["returned_final_max_s"].as_f64().unwrap() < 30.0,
        "{summary:#}"
    );
}

/// Writes a password file with these users, all with password `pw`.
fn passwords(path: &Path, users: &[String]) {
    for (i, u) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd
            .arg(path)
            .args([u.as_str(), "pw"])
            .status()
            .expect("mosquitto_passwd (package mosquitto)");
        assert!(status.success());
    }
}

/// Publishes `first` then `second` (mosquitto_pub as USER) every 200 ms until `sub` has exited
/// (it takes 3 messages): what it printed.
fn alternate(sub: Child, port: u16, first: (&str, &str), second: (&str, &str)) -> String {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let port = port.to_string();
    let (first, second) = (
        (first.0.to_string(), first.1.to_string()),
        (second.0.to_string(), second.1.to_string()),
    );
    let publisher = std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < until
        {
            for (user, topic) in [&first, &second] {
                let _ = Command::new("mosquitto_pub")
                    .args(["-p", &port, "-u", user, "-P", "pw", "-q", "1", "-t", topic])
                    .args(["-m", &format!("from {user}")])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let out = sub.wait_with_output().expect("mosquitto_sub ran");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn subscribe(port: u16, user: &str, filters: &[&str]) -> Child {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args([
        "-p",
        &port.to_string(),
        "-u",
        user,
        "-P",
        "pw",
        "-C",
        "3",
        "-W",
        "30",
        "-v",
        "-R",
    ]);
    for f in filters {
        cmd.args(["-t", f]);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (package mosquitto-clients)")
}

/// The ACL `trainer fleet acl` writes from a fleet list lets a whole rollout through (devices
/// logged in with their ids), and confines each device: what it publishes under another
/// device's topics reaches no one, and it cannot read another device's messages.
#[test]
fn acl_from_the_fleet_list_lets_rollouts_through_and_confines_each_device() {
    let n = 6;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids: Vec<String> = (0..n).map(|i| format!("acl-{i:04}")).collect();
    // The simulator puts device i on line i.
    let list: String = ids
        .iter()
        .enumerate()
        .map(|(i, id)| format!("{id} line{i} line\n"))
        .collect();
    std::fs::write(d.join("fleet.txt"), format!("# the test fleet\n{list}")).unwrap();
    let acl = d.join("acl");
    e2e::run_ok(
        "trainer",
        &[
            "fleet",
            "acl",
            "--fleet",
            d.join("fleet.txt").to_str().unwrap(),
            "--site",
            "test",
            "--publisher",
            "publisher",
            "--consumer",
            "mes",
            "--out",
            acl.to_str().unwrap(),
        ],
    );
    let mut users = vec!["publisher".to_string(), "mes".to_string()];
    users.extend(ids.iter().cloned());
    passwords(&d.join("passwd"), &users);
    let port = e2e::free_port();
    let mut broker = Broker::start_with(
        d,
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
            d.join("passwd").display(),
            acl.display()
        ),
    );
    let mut watcher_login = protocol::mqtt::BrokerConfig::plain("127.0.0.1", port);
    watcher_login.username = Some("publisher".into());
    watcher_login.password = Some("pw".into());
    let w = Watcher::start_with(watcher_login);
    let sim = Sim::start(
        &broker,
        n,
        &["--prefix", "acl", "--password", "pw", "--run-s", "60"],
    );
    for id in &ids {
        w.wait_status(id, Duration::from_secs(60), |_| true);
    }
    let (ok, out) = publish(
        &broker,
        &[
            "--to",
            "group:line",
            "--username",
            "publisher",
            "--password",
            "pw",
            "--timeout",
            "60",
        ],
    );
    assert!(ok, "{out}\n{}", broker.log());
    let summary = sim.finish();
    assert_eq!(summary["activated"], n, "{summary:#}");

    // A device publishing under another device's topic reaches no one; under its own it does.
    let sub = subscribe(port, "mes", &["edgeinsp/test/+/+/status"]);
    let got = alternate(
        sub,
        port,
        ("acl-0000", "edgeinsp/test/line1/acl-0001/status"),
        ("acl-0000", "edgeinsp/test/line0/acl-0000/status"),
    );
    assert_eq!(got.lines().count(), 3, "{got}");
    assert!(
        got.lines()
            .all(|l| l.starts_with("edgeinsp/test/line0/acl-0000/status ")),
        "{got}"
    );
    // A device reads what is addressed to it, not what is addressed to another.
    let sub = subscribe(
        port,
        "acl-0000",
        &[
            "edgeinsp/test/down/device/acl-0001/+",
            "edgeinsp/test/down/device/acl-0000/+",
        ],
    );
    let got = alternate(
        sub,
        port,
        ("publisher", "edgeinsp/test/down/device/acl-0001/command"),
        ("publisher", "edgeinsp/test/down/device/acl-0000/command"),
    );
    assert_eq!(got.lines().count(), 3, "{got}");
    assert!(
        got.lines()
            .all(|l| l.starts_with("edgeinsp/test/down/device/acl-0000/command ")),
        "{got}"
    );
    broker.stop();
}

/// `trainer fleet verdicts` with `args` (beside --broker and --site) writing to
/// DIR/NAME.jsonl and NAME.log, started and subscribed (or already done).
fn verdict_consumer(
    dir: &Path,
    addr: &str,
    name: &str,
    args: &[&str],
) -> (Child, PathBuf, PathBuf) {
    let out = dir.join(format!("{name}.jsonl"));
    let err = dir.join(format!("{name}.log"));
    let mut child = Command::new(bin("trainer"))
        .args(["fleet", "verdicts", "--broker", addr, "--site", "test"])
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("starting trainer fleet verdicts");
    let until = std::time::Instant::now() + Duration::from_secs(30);
    // (A resumed session may be served its queue and reach --count before the subscription's
    // acknowledgement: then the consumer is done.)
    while !std::fs::read_to_string(&err).is_ok_and(|t| t.contains("consuming "))
        && child.try_wait().unwrap().is_none()
    {
        assert!(
            std::time::Instant::now() < until,
            "{name} did not subscribe"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, out, err)
}

/// (device, id) of each verdict a consumer wrote.
fn verdicts_written(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["device"].as_str().unwrap().to_string(),
                v["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Publishes verdicts 1..=per_device of devices cam0..cam{devices-1} at QoS 1, as the daemon
/// writes them, and one malformed message after id `malformed_after` (if any); returns the
/// client and its connection's thread.
fn publish_verdicts(
    port: u16,
    devices: usize,
    per_device: u64,
    malformed_after: Option<u64>,
) -> (rumqttc::Client, std::thread::JoinHandle<()>) {
    use protocol::messages::Message;
    let topics = protocol::Topics::new("test").unwrap();
    let mut options = rumqttc::MqttOptions::new("devices", "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 1000);
    let pump = std::thread::spawn(move || {
        for e in connection.iter() {
            if e.is_err() {
                break;
            }
        }
    });
    for id in 1..=per_device {
        for dev in 0..devices {
            let device = format!("cam{dev}");
            let v = protocol::Verdict {
                id,
                device: device.clone(),
                frame: id,
                line: 0,
                origin: "test".into(),
                width: 64,
                height: 64,
                captured_ms: id,
                decided_ms: id,
                latency_ms: 1.0,
                pass: id % 3 != 0,
                defects: vec![],
                model: Some(("m".into(), 1)),
                undecided: None,
                position_mm: None,
            };
            client
                .publish(
                    topics.up("line1", &device, protocol::topics::UpKind::Verdict),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    v.encode(),
                )
                .unwrap();
        }
        if malformed_after == Some(id) {
            client
                .publish(
                    "edgeinsp/test/line1/cam9/verdict",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    b"{not json".to_vec(),
                )
                .unwrap();
        }
    }
    (client, pump)
}

/// Verdict consumers in one shared subscription group (`trainer fleet verdicts --share`) split
/// the fleet's verdicts: every verdict reaches exactly one of them, both get a share, and a
/// malformed message is named and skipped without stopping the consumer.
#[test]
fn shared_verdict_consumers_split_the_verdicts_without_loss_or_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let addr = broker.addr();
    let consumers: Vec<(Child, PathBuf, PathBuf)> = (0..2)
        .map(|i| {
            verdict_consumer(
                dir.path(),
                &addr,
                &format!("consumer{i}"),
                &["--share", "mes"],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // What the broker passed on, beside the consumers' share of it.
    let w = Watcher::start(broker.port);

    // Four devices' verdicts and one malformed message.
    let per_device = 50u64;
    let (client, pump) = publish_verdicts(broker.port, 4, per_device, Some(10));
    let total = 4 * per_device as usize;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: usize = consumers
            .iter()
            .map(|(_, out, _)| verdicts_written(out).len())
            .sum();
        if n >= total || std::time::Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = client.disconnect();
    let _ = pump.join();
    let mut all = vec![];
    let mut logs = String::new();
    for (mut child, out, err) in consumers {
        let _ = child.kill();
        let _ = child.wait();
        let got = verdicts_written(&out);
        logs.push_str(&format!("-- {} verdict(s), log:\n", got.len()));
        logs.push_str(&std::fs::read_to_string(&err).unwrap());
        assert!(!got.is_empty(), "a consumer got no verdict\n{logs}");
        all.extend(got);
    }
    let distinct: std::collections::BTreeSet<(String, u64)> = all.iter().cloned().collect();
    assert_eq!(
        all.len(),
        total,
        "verdicts repeated or lost ({} seen by a plain subscriber)\n{logs}\n{}",
        w.all::<protocol::Verdict>("/verdict").len(),
        broker.log()
    );
    assert_eq!(distinct.len(), total);
    assert!(
        logs.contains("edgeinsp/test/line1/cam9/verdict: ") && logs.contains("skipped"),
        "{logs}"
    );
}

/// A consumer with a persistent session (`--client-id`) that stops after `--count` verdicts
/// acknowledges exactly those before it goes: the next consumer of that session gets the rest,
/// none of them again and none lost.
#[test]
fn a_persistent_consumer_stopped_by_count_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let addr = broker.addr();
    let session = ["--client-id", "mes-1"];
    let (mut first, first_out, first_err) = verdict_consumer(
        dir.path(),
        &addr,
        "first",
        &[&session[..], &["--count", "5"]].concat(),
    );
    let (client, pump) = publish_verdicts(broker.port, 1, 12, None);
    let status = first.wait().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&first_err).unwrap()
    );
    let (mut second, second_out, second_err) = verdict_consumer(
        dir.path(),
        &addr,
        "second",
        &[&session[..], &["--count", "7"]].concat(),
    );
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > until {
            let _ = second.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = client.disconnect();
    let _ = pump.join();
    let ids =
        |path: &Path| -> Vec<u64> { verdicts_written(path).into_iter().map(|v| v.1).collect() };
    assert_eq!(ids(&first_out), vec![1, 2, 3, 4, 5]);
    let mut rest = ids(&second_out);
    rest.sort_unstable();
    assert_eq!(
        rest,
        (6..=12).collect::<Vec<_>>(),
        "{}",
        std::fs::read_to_string(&second_err).unwrap()
    );
}

/// A broker with a small packet limit (as AWS IoT's 128 KB) says so in its MQTT v5 CONNACK:
/// the publisher cuts chunks to fit instead of being disconnected, and the rollout completes.
#[test]
fn chunks_fit_the_packet_limit_the_broker_states() {
    let n = 4;
    let dir = tempfile::tempdir().unwrap();
    let port = e2e::free_port();
    let broker = Broker::start_with(
        dir.path(),
        port,
        &format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 100000\n"),
    );
    let w = Watcher::start(port);
    let sim = Sim::start(&broker, n, &["--prefix", "lim", "--run-s", "60"]);
    for i in 0..n {
        w.wait_status(&format!("lim-{i:04}"), Duration::from_secs(60), |_| true);
    }
    let (ok, out) = publish(
        &broker,
        &[
            "--to",
            "group:line",
            "--chunk-kib",
            "256",
            "--timeout",
            "60",
        ],
    );
    assert!(ok, "{out}\n{}", broker.log());
    assert!(
        out.contains("the broker accepts packets of up to 100000 bytes (MQTT v5 CONNACK): chunks of 97 KiB, not the 256 KiB asked for"),
        "{out}"
    );
    let summary = sim.finish();
    assert_eq!(summary["activated"], n, "{summary:#}");
}

/// The broker restarted in the middle of a rollout (offers still going out at 5 a second): every
/// device reconnects, and the rollout completes.
#[test]
fn broker_restart_mid_rollout_every_device_reconnects_and_activates() {
    let n = 20;
    let (_dir, mut broker, sim) = fleet(n, "br", &["--run-s", "90", "--linger-s", "8"]);
    let w = Watcher::start(broker.port);
    let addr = broker.addr();
    let publisher = std::thread::spawn(move || {
        publish_to(
            &addr,
            &[
                "--to",
                "group:line",
                "--max-per-minute",
                "300",
                "--timeout",
                "80",
            ],
        )
    });
    // The first report: the rollout is under way.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while w.all::<protocol::Report>("/report").is_empty() {
        assert!(std::time::Instant::now() < until, "no report");
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.restart();
    let (ok, out) = publisher.join().unwrap();
    assert!(ok, "{out}");
    let summary = sim.finish();
    assert_eq!(summary["activated"], n, "{summary:#}");
    assert_eq!(summary["devices_reconnected"], n, "{summary:#}");
    assert!(
        summary["reconnect_max_s"].as_f64().unwrap() < 30.0,
        "{summary:#}"
    );
}
