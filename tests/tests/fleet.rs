//! Fleet rollouts over a real mosquitto to simulated devices (`edge fleet-sim`: the daemon's own
//! transfer code, tens of devices in one process) with the real publisher (`trainer publish`):
//! waves in order, devices killed mid-transfer and back, devices offline at the start served when
//! they return after the publisher was restarted on its record, and an abort threshold that stops
//! a rollout before its last wave. `scripts/bench/fleet` runs the same scenarios at 1,000.

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
    let (package, key) = factory();
    let addr = broker.addr();
    let mut all = vec![
        "publish",
        &package,
        "--broker",
        &addr,
        "--site",
        "test",
        "--verify-with",
        key.to_str().unwrap(),
        "--chunk-kib",
        "64",
    ];
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
