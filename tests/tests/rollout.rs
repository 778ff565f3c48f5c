//! Model rollout over a real mosquitto broker to real `edge` daemons: the happy path, refusals
//! (wrong key, corrupted, truncated, too large, downgrade, replayed command), repair and resume
//! (flipped chunk, dead publisher, broker restart, edge SIGKILL), self-test failure, crash-loop
//! rollback, rollback command, canary halt, TLS with client certificates and passwords. One file:
//! the scenarios share one fixture (keys, models, packages) and one rig.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use e2e::{Broker, Edge, Fixtures, Watcher, edge_config, run, run_ok};
use protocol::Status;
use protocol::messages::{Chunk, Message, Report, ReportState, transfer_id};
use protocol::package::{Manifest, Package, read_signing_key};

const T: Duration = Duration::from_secs(60);

struct Fixture {
    files: Fixtures,
    fleet_pub: String,
    fleet_key: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.files.path(name)
    }
    fn p(&self, name: &str) -> String {
        self.files.p(name)
    }
}

/// Keys, models and packages shared by the tests (built once per test binary).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let files = Fixtures::new("rollout-fixture");
        let fleet_pub = files.keygen("fleet");
        files.keygen("rogue");
        files.synth(1, 3);
        let golden = [
            files.golden("crazing_1.jpg"),
            files.golden("scratches_1.jpg"),
        ];
        let golden: Vec<&Path> = golden.iter().map(PathBuf::as_path).collect();
        let m1 = files.init_model("m1", "nano", 0);
        let m2 = files.init_model("m2", "nano", 1);
        let m3 = files.init_model("m3", "edge", 2);
        let package = |model: &Path, version: u64, key: &str, out: &str| {
            e2e::package_with(
                model,
                &files.path(key),
                version,
                &golden,
                &["--golden-min-score", "0.05"],
                &files.path(out),
            );
        };
        package(&m1, 1, "keys/fleet.key", "v1.edgepkg");
        package(&m2, 2, "keys/fleet.key", "v2.edgepkg");
        package(&m3, 3, "keys/fleet.key", "v3-big.edgepkg");
        package(&m2, 2, "keys/rogue.key", "rogue-v2.edgepkg");
        Fixture {
            fleet_key: files.path("keys/fleet.key"),
            files,
            fleet_pub,
        }
    })
}

/// A broker, a watcher and one edge `cam1` on the factory model v1, online.
struct Rig {
    dir: tempfile::TempDir,
    broker: Broker,
    w: Watcher,
    edge: Edge,
}

fn rig(extra_models: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    let edge = start_edge(dir.path(), &broker, "cam1", &[], extra_models);
    online_with(&w, "cam1", 1);
    Rig {
        dir,
        broker,
        w,
        edge,
    }
}

fn start_edge(dir: &Path, broker: &Broker, id: &str, groups: &[&str], extra: &str) -> Edge {
    start_edge_with_faults(dir, broker, id, groups, extra, "")
}

/// [`start_edge`] with `EDGE_FAULTS` set (kept for restarts until `edge.env` is cleared).
fn start_edge_with_faults(
    dir: &Path,
    broker: &Broker,
    id: &str,
    groups: &[&str],
    extra: &str,
    faults: &str,
) -> Edge {
    let f = fixture();
    let config = edge_config(
        id,
        groups,
        broker.port,
        &f.fleet_pub,
        &f.path("v1.edgepkg"),
        extra,
    );
    Edge::start_with_env(dir, id, &config, &[("EDGE_FAULTS", faults)])
}

fn publish(broker: &Broker, package: &str, args: &[&str]) -> (bool, String) {
    let addr = broker.addr();
    let mut all = vec![
        "publish",
        package,
        "--broker",
        &addr,
        "--site",
        "test",
        "--timeout",
        "60",
    ];
    all.extend_from_slice(args);
    run("trainer", &all)
}

fn active_version(s: &Status) -> Option<u64> {
    s.active.as_ref().map(|m| m.version)
}

fn online_with(w: &Watcher, device: &str, version: u64) -> Status {
    w.wait_status(device, T, |s| {
        s.online && active_version(s) == Some(version)
    })
}

/// Sends an offer and some chunks of `package` by hand (a publisher that dies, or a network
/// that flips bits); `corrupt` flips one byte of that chunk after its digest was taken.
fn send_raw(
    broker: &Broker,
    package: &Package,
    target: &str,
    chunk_size: usize,
    send: &[u32],
    corrupt: Option<u32>,
) {
    let topics = protocol::Topics::new("test").unwrap();
    let target: protocol::Target = target.parse().unwrap();
    let pieces: Vec<&[u8]> = package.weights.chunks(chunk_size).collect();
    let offer = protocol::rollout::offer_for(package, &target, chunk_size).unwrap();
    let id = transfer_id(&offer.transfer).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let options = protocol::mqtt::BrokerConfig::plain("127.0.0.1", broker.port)
            .options("raw-sender")
            .unwrap();
        let mut conn = protocol::mqtt::Connection::start(options, vec![]);
        conn.wait_connected(T).await.unwrap();
        use protocol::topics::DownKind;
        conn.publish(topics.down(&target, DownKind::Offer), offer.encode(), false)
            .await
            .unwrap();
        for &i in send {
            let mut data = pieces[i as usize].to_vec();
            if corrupt == Some(i) {
                data[0] ^= 0x40;
            }
            let frame = Chunk {
                transfer: id,
                index: i,
                count: pieces.len() as u32,
                data: &data,
            }
            .encode();
            conn.publish(topics.down(&target, DownKind::Chunk), frame, false)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        conn.close().await;
    });
}

fn chunks_sent(output: &str) -> u64 {
    output
        .lines()
        .find_map(|l| {
            l.split_once(" chunk(s), ")
                .map(|(a, _)| a.rsplit(' ').next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no chunk count in:\n{output}"))
}

#[test]
fn happy_path_activates_confirms_and_reports() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    let _edge = start_edge(dir.path(), &broker, "cam1", &[], "confirm_after_s = 2");
    let s = online_with(&w, "cam1", 1);
    assert_eq!(s.active.as_ref().unwrap().id, "neu-edge");
    let (ok, out) = publish(
        &broker,
        &f.p("v2.edgepkg"),
        &[
            "--to",
            "device:cam1",
            "--verify-with",
            &f.p("keys/fleet.pub"),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("cam1: activated"), "{out}");
    // A fresh model starts on trial (that status may already be superseded: search them all).
    let s = w
        .wait::<Status>("/cam1/status", T, |s| {
            active_version(s) == Some(2) && s.on_trial
        })
        .expect("a status with v2 on trial");
    assert_eq!(
        s.previous.iter().map(|m| m.version).collect::<Vec<_>>(),
        vec![1]
    );
    let s = w.wait_status("cam1", T, |s| !s.on_trial);
    assert_eq!(active_version(&s), Some(2));
    assert!(s.last_event.unwrap().contains("activated neu-edge v2"));
    // Publishing the same package again is a no-op that still answers.
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(ok, "{out}");
    assert_eq!(chunks_sent(&out), 0, "{out}");
}

#[test]
fn refusals_wrong_key_corrupt_truncated_downgrade() {
    let f = fixture();
    let Rig {
        dir,
        broker,
        w,
        edge,
    } = rig("");

    // Signed by a key the device does not trust.
    let (ok, out) = publish(&broker, &f.p("rogue-v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(
        !ok && out.contains("not signed by any of the 1 trusted key(s)"),
        "{out}"
    );
    // The publisher's own check catches it before sending, too.
    let (ok, out) = publish(
        &broker,
        &f.p("rogue-v2.edgepkg"),
        &[
            "--to",
            "device:cam1",
            "--verify-with",
            &f.p("keys/fleet.pub"),
        ],
    );
    assert!(!ok && out.contains("signature check failed"), "{out}");

    // A flipped byte in the package's weights (the manifest and its signature intact).
    let mut bytes = std::fs::read(f.path("v2.edgepkg")).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x01;
    let corrupt = dir.path().join("corrupt.edgepkg");
    std::fs::write(&corrupt, &bytes).unwrap();
    let (ok, out) = publish(
        &broker,
        &corrupt.display().to_string(),
        &["--to", "device:cam1"],
    );
    assert!(!ok && out.contains("differs from the manifest"), "{out}");

    // Truncated package file: the offer's size contradicts the signed manifest.
    let truncated = dir.path().join("truncated.edgepkg");
    std::fs::write(&truncated, &bytes[..n - 5000]).unwrap();
    let (ok, out) = publish(
        &broker,
        &truncated.display().to_string(),
        &["--to", "device:cam1"],
    );
    assert!(!ok && out.contains("differs from the manifest's"), "{out}");

    let s = w.wait_status("cam1", T, |s| {
        s.last_event
            .as_deref()
            .is_some_and(|e| e.contains("differs"))
    });
    assert_eq!(active_version(&s), Some(1), "{s:#?}");

    // A validly signed but older package: no downgrade by replay.
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(ok, "{out}");
    let (ok, out) = publish(&broker, &f.p("v1.edgepkg"), &["--to", "device:cam1"]);
    assert!(
        !ok && out.contains("downgrade: v1 is not newer than the active v2"),
        "{out}"
    );
    let s = w.wait_status("cam1", T, |s| {
        s.last_event
            .as_deref()
            .is_some_and(|e| e.contains("downgrade"))
    });
    assert_eq!(active_version(&s), Some(2));
    drop(edge);
}

#[test]
fn flipped_chunk_is_asked_again_and_dead_publisher_resumes() {
    let f = fixture();
    let Rig {
        dir: _dir,
        broker,
        w,
        edge,
    } = rig("");
    let package = Package::read(&f.path("v2.edgepkg")).unwrap();
    let chunk = 64 << 10;
    let count = package.weights.len().div_ceil(chunk) as u32;
    // A publisher sends the offer and the first half, chunk 3 corrupted in transit, then dies.
    let half: Vec<u32> = (0..count / 2).collect();
    send_raw(&broker, &package, "device:cam1", chunk, &half, Some(3));
    let r = w
        .wait::<Report>("/cam1/report", T, |r| r.missing == vec![[3, 3]])
        .expect("the device asks for the corrupted chunk again");
    assert_eq!(r.state, ReportState::Receiving);
    assert!(edge.log().contains("digest mismatch"), "{}", edge.log());
    // The next publisher sends only what is missing: chunk 3 and the second half.
    let (ok, out) = publish(
        &broker,
        &f.p("v2.edgepkg"),
        &["--to", "device:cam1", "--chunk-kib", "64"],
    );
    assert!(ok, "{out}");
    assert_eq!(chunks_sent(&out), (count - count / 2 + 1) as u64, "{out}");
    online_with(&w, "cam1", 2);
}

/// Sends the big package in small chunks; `interrupt` runs once the device holds some of it.
fn interrupted_transfer(
    faults: &str,
    interrupt: impl FnOnce(&mut Broker, &mut Edge),
) -> (String, Edge, Watcher, Broker, tempfile::TempDir) {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    let mut edge = start_edge_with_faults(dir.path(), &broker, "cam1", &[], "", faults);
    online_with(&w, "cam1", 1);
    let addr = broker.addr();
    let pkg = f.p("v3-big.edgepkg");
    let publisher = std::thread::spawn(move || {
        e2e::run(
            "trainer",
            &[
                "publish",
                &pkg,
                "--broker",
                &addr,
                "--site",
                "test",
                "--to",
                "device:cam1",
                "--chunk-kib",
                "16",
                "--timeout",
                "90",
            ],
        )
    });
    w.wait::<Report>("/cam1/report", T, |r| {
        r.state == ReportState::Receiving && r.have >= 200
    })
    .expect("transfer under way");
    interrupt(&mut broker, &mut edge);
    let (ok, out) = publisher.join().unwrap();
    assert!(ok, "{out}\n--- edge log ---\n{}", edge.log());
    let s = w.wait_status("cam1", T, |s| s.online && active_version(s) == Some(3));
    assert_eq!(s.previous[0].version, 1);
    (out, edge, w, broker, dir)
}

/// The edge dies (abort, no cleanup, no flush: a kill -9) at its 1,000th chunk of 1,327, well past
/// the half-way report; restarted, it resumes from what it had flushed. (A kill sent by the
/// test after that report could land after the last chunk on a fast machine.)
#[test]
fn edge_killed_mid_transfer_resumes_where_it_was() {
    let (out, edge, _w, _b, _dir) = interrupted_transfer("abort:chunk-1000", |_, edge| {
        let until = std::time::Instant::now() + T;
        while edge.is_running() {
            assert!(
                std::time::Instant::now() < until,
                "the edge did not abort at chunk 1000"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        edge.env.clear();
        edge.restart();
    });
    let log = edge.log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming transfer"))
        .unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    let have: u32 = resumed
        .split(": ")
        .last()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Flushed at every 10% step (132 chunks here): what was flushed before the abort survived.
    assert!(have >= 140, "{resumed}");
    let count = (std::fs::metadata(fixture().path("m3.safetensors"))
        .unwrap()
        .len())
    .div_ceil(16 << 10);
    // Not started over: the chunks re-sent are far fewer than a second full transfer.
    assert!(chunks_sent(&out) < 2 * count, "{out}");
}

#[test]
fn broker_restart_mid_transfer_recovers() {
    let (out, edge, _w, _b, _dir) = interrupted_transfer("", |broker, _| {
        broker.kill();
        std::thread::sleep(Duration::from_secs(2));
        broker.restart();
    });
    assert!(out.contains("cam1: activated"), "{out}\n{}", edge.log());
}

#[test]
fn failing_self_test_keeps_the_previous_model() {
    let f = fixture();
    let Rig {
        dir,
        broker,
        w,
        edge: _edge,
    } = rig("");
    // A package whose model does not give what its golden samples expect (validly signed).
    let good = Package::read(&f.path("v2.edgepkg")).unwrap();
    let mut manifest = Manifest::from_json(&good.manifest_bytes).unwrap();
    manifest.golden[0]
        .expected
        .push(protocol::package::ExpectedDetection {
            class: "scratches".into(),
            score: 0.9,
            bbox: [10.0, 10.0, 60.0, 190.0],
        });
    let key = read_signing_key(&f.fleet_key).unwrap();
    let bad = Package::build(&manifest, good.weights.clone(), &key).unwrap();
    let path = dir.path().join("bad-golden.edgepkg");
    bad.write(&path).unwrap();
    let (ok, out) = publish(
        &broker,
        &path.display().to_string(),
        &["--to", "device:cam1"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("cam1: failed (self-test failed, kept v1: golden sample crazing_1.jpg: expected scratches"), "{out}");
    let s = w.wait_status("cam1", T, |s| {
        s.last_event
            .as_deref()
            .is_some_and(|e| e.contains("self-test"))
    });
    assert_eq!(active_version(&s), Some(1));
    assert!(s.previous.is_empty(), "{s:#?}");
}

#[test]
fn crash_loop_after_a_switch_rolls_back() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    let mut edge = start_edge(
        dir.path(),
        &broker,
        "cam1",
        &[],
        "confirm_after_s = 600\nmax_trial_boots = 2",
    );
    online_with(&w, "cam1", 1);
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(ok, "{out}");
    // The daemon dies again and again before the new model is confirmed.
    for boot in 1..=3 {
        edge.kill9();
        edge.restart();
        if boot < 3 {
            // Let it come up on the trial model before it "crashes" again.
            let until = std::time::Instant::now() + T;
            while edge.log().matches("active model neu-edge v2").count() < boot {
                assert!(std::time::Instant::now() < until, "{}", edge.log());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let s = w.wait_status("cam1", T, |s| s.online && active_version(s) == Some(1));
    let event = s.last_event.unwrap();
    assert!(
        event.contains("rolled back from v2 to v1: crash loop: 3 starts"),
        "{event}"
    );
    assert!(!s.on_trial);
}

#[test]
fn rollback_command_is_signed_and_not_replayable() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    let _edge = start_edge(dir.path(), &broker, "cam1", &["canary"], "");
    online_with(&w, "cam1", 1);
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "group:canary"]);
    assert!(ok, "{out}");
    online_with(&w, "cam1", 2);

    // A command signed with an untrusted key does nothing.
    let addr = broker.addr();
    run_ok(
        "trainer",
        &[
            "rollback",
            "--to",
            "device:cam1",
            "--key",
            &f.p("keys/rogue.key"),
            "--broker",
            &addr,
            "--site",
            "test",
        ],
    );
    w.wait::<Report>("/cam1/report", T, |r| {
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("not signed"))
    })
    .expect("rogue command refused");
    run_ok(
        "trainer",
        &[
            "rollback",
            "--to",
            "group:canary",
            "--key",
            &f.p("keys/fleet.key"),
            "--broker",
            &addr,
            "--site",
            "test",
        ],
    );
    let s = online_with(&w, "cam1", 1);
    assert!(
        s.last_event
            .unwrap()
            .contains("rolled back from v2 to v1: rollback command")
    );

    // Replaying the captured command is refused.
    let captured = w
        .wait::<protocol::SignedCommand>("/down/group/canary/command", T, |c| {
            c.command.contains("rollback")
        })
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let options = protocol::mqtt::BrokerConfig::plain("127.0.0.1", broker.port)
            .options("replayer")
            .unwrap();
        let mut conn = protocol::mqtt::Connection::start(options, vec![]);
        conn.wait_connected(T).await.unwrap();
        conn.publish(
            "edgeinsp/test/down/device/cam1/command".into(),
            captured.encode(),
            false,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.close().await;
    });
    w.wait::<Report>("/cam1/report", T, |r| {
        r.reason.as_deref().is_some_and(|x| x.contains("replayed"))
    })
    .expect("replayed command refused");

    // Signed by the fleet key but expired, or for another site: refused.
    let key = read_signing_key(&f.path("keys/fleet.key")).unwrap();
    let now = protocol::unix_now_ms();
    let command = |site: &str, issued_ms: u64, expires_ms: u64| {
        protocol::SignedCommand::sign(
            &protocol::Command {
                action: protocol::CommandAction::Rollback { to_version: None },
                target: "device:cam1".parse().unwrap(),
                site: site.into(),
                issued_ms,
                expires_ms,
            },
            &key,
        )
    };
    rt.block_on(async {
        let options = protocol::mqtt::BrokerConfig::plain("127.0.0.1", broker.port)
            .options("replayer2")
            .unwrap();
        let mut conn = protocol::mqtt::Connection::start(options, vec![]);
        conn.wait_connected(T).await.unwrap();
        for c in [
            command("test", now + 1, now.saturating_sub(1000)),
            command("elsewhere", now + 2, now + 60_000),
        ] {
            conn.publish(
                "edgeinsp/test/down/device/cam1/command".into(),
                c.encode(),
                false,
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.close().await;
    });
    w.wait::<Report>("/cam1/report", T, |r| {
        r.reason.as_deref().is_some_and(|x| x.contains("expired"))
    })
    .expect("expired command refused");
    w.wait::<Report>("/cam1/report", T, |r| {
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("for site `elsewhere`"))
    })
    .expect("another site's command refused");

    // The rolled-back version is refused (the signed floor) until a signed allow command.
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(!ok, "{out}");
    w.wait::<Report>("/cam1/report", T, |r| {
        r.state == ReportState::Refused
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("v2 was rolled back by a signed command"))
    })
    .expect("rolled-back version refused");
    run_ok(
        "trainer",
        &[
            "allow",
            "--to",
            "device:cam1",
            "--version",
            "2",
            "--key",
            &f.p("keys/fleet.key"),
            "--broker",
            &addr,
            "--site",
            "test",
        ],
    );
    w.wait_status("cam1", T, |s| {
        s.last_event.as_deref() == Some("allow command: v2")
    });
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(ok, "{out}");
    online_with(&w, "cam1", 2);
}

#[test]
fn canary_group_goes_first_and_a_failure_halts_the_rollout() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let w = Watcher::start(broker.port);
    // The canary device accepts packages up to 10 MiB only: the big one fails there.
    let _c = start_edge(
        dir.path(),
        &broker,
        "canary1",
        &["canary", "line"],
        "max_package_mb = 10",
    );
    let cam2 = start_edge(dir.path(), &broker, "cam2", &["line"], "");
    online_with(&w, "canary1", 1);
    online_with(&w, "cam2", 1);
    let (ok, out) = publish(
        &broker,
        &f.p("v2.edgepkg"),
        &["--to", "group:line", "--canary", "group:canary"],
    );
    assert!(ok, "{out}");
    let canary_at = out
        .find("wave 1/2 (group:canary): offering")
        .expect("canary stage");
    let line_at = out
        .find("wave 2/2 (the rest): offering")
        .expect("main stage");
    assert!(canary_at < line_at, "{out}");
    assert!(
        out.contains("to 1 device(s): cam2"),
        "the canary is not served twice: {out}"
    );
    online_with(&w, "canary1", 2);
    online_with(&w, "cam2", 2);

    let (ok, out) = publish(
        &broker,
        &f.p("v3-big.edgepkg"),
        &["--to", "group:line", "--canary", "group:canary"],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("rollout of v3 halted: wave 1/2 (group:canary) reached 0 of 1 activated"),
        "{out}"
    );
    assert!(out.contains("too large"), "{out}");
    assert!(!out.contains("wave 2/2 (the rest): offering"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(active_version(&w.status("cam2").unwrap()), Some(2));
    assert!(
        !cam2.log().contains("receiving neu-edge v3"),
        "{}",
        cam2.log()
    );
}

#[test]
fn tls_with_client_certificate_and_password() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A CA, a server certificate for 127.0.0.1/localhost, a client certificate.
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let named = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.distinguished_name = named("edge test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = named(name);
        params.extended_key_usages = vec![if name == "server" {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(d.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(d.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    std::fs::write(d.join("ca.crt"), ca.pem()).unwrap();
    leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
    leaf(vec![], "client");
    let passwd = d.join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["fleet", "s3cret"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(status.success());
    let port = e2e::free_port();
    let listener = format!(
        "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        passwd.display(),
        d.join("ca.crt").display(),
        d.join("server.crt").display(),
        d.join("server.key").display()
    );
    let broker = Broker::start_with(d, port, &listener);
    let tls_config = |user: &str, pass: &str| protocol::mqtt::BrokerConfig {
        host: "localhost".into(),
        port,
        username: Some(user.into()),
        password: Some(pass.into()),
        tls: Some(protocol::mqtt::TlsFiles {
            ca: d.join("ca.crt"),
            cert: Some(d.join("client.crt")),
            key: Some(d.join("client.key")),
        }),
        keep_alive_s: 2,
    };
    let w = Watcher::start_with(tls_config("fleet", "s3cret"));
    let config = format!(
        r#"[device]
id = "cam1"
site = "test"
line = "line1"

[storage]
dir = "state"

[mqtt]
host = "localhost"
port = {port}
username = "fleet"
password = "s3cret"
tls = {{ ca = "{ca}", cert = "{cert}", key = "{key}" }}

[models]
trusted_keys = ["{trusted}"]
factory = "{factory}"
"#,
        ca = d.join("ca.crt").display(),
        cert = d.join("client.crt").display(),
        key = d.join("client.key").display(),
        trusted = f.fleet_pub,
        factory = f.path("v1.edgepkg").display()
    );
    let edge = Edge::start(d, "cam1", &config);
    online_with(&w, "cam1", 1);
    let tls_args = |pass: &str| {
        vec![
            "publish".to_string(),
            f.p("v2.edgepkg"),
            "--broker".into(),
            format!("localhost:{port}"),
            "--site".into(),
            "test".into(),
            "--to".into(),
            "device:cam1".into(),
            "--timeout".into(),
            "30".into(),
            "--username".into(),
            "fleet".into(),
            "--password".into(),
            pass.into(),
            "--tls-ca".into(),
            d.join("ca.crt").display().to_string(),
            "--tls-cert".into(),
            d.join("client.crt").display().to_string(),
            "--tls-key".into(),
            d.join("client.key").display().to_string(),
        ]
    };
    // A wrong password is refused by the broker.
    let args = tls_args("wrong");
    let (ok, out) = run(
        "trainer",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!ok && out.contains("no connection to the broker"), "{out}");
    let args = tls_args("s3cret");
    let (ok, out) = run(
        "trainer",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(ok, "{out}\n{}", edge.log());
    online_with(&w, "cam1", 2);
    drop(broker);
}

/// Hostile input on the device's topics: an oversized packet, a thousand junk and unsigned
/// offers, truncated JSON. The daemon stays up, refusals write nothing to its state file, and
/// a real rollout still goes through afterwards.
#[test]
fn hostile_input_costs_no_disk_writes_and_no_crash() {
    let f = fixture();
    let Rig {
        dir,
        broker,
        w,
        mut edge,
    } = rig("");
    let state = dir.path().join("cam1/state/models/state.json");
    let state = if state.exists() {
        state
    } else {
        // Wherever the model store keeps it.
        let found = std::process::Command::new("find")
            .args([dir.path().to_str().unwrap(), "-name", "state.json"])
            .output()
            .unwrap();
        PathBuf::from(
            String::from_utf8(found.stdout)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
    };
    let before = std::fs::metadata(&state).unwrap().modified().unwrap();
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let pid = edge.pid().unwrap();
    let rss_before = rss(pid);
    let package = Package::read(&f.path("v2.edgepkg")).unwrap();
    let rogue = read_signing_key(&f.path("keys/rogue.key")).unwrap();
    let unsigned = package.clone().resigned(&rogue);
    let topics = protocol::Topics::new("test").unwrap();
    let target: protocol::Target = "device:cam1".parse().unwrap();
    use protocol::topics::DownKind;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Larger than any message of the protocol: the broker refuses it (max_packet_size)
        // and drops that client; had it reached the device, its client would refuse it too.
        let mut options = protocol::mqtt::BrokerConfig::plain("127.0.0.1", broker.port)
            .options("hostile-big")
            .unwrap();
        options.set_max_packet_size(16 << 20, 16 << 20);
        let mut big = protocol::mqtt::Connection::start(options, vec![]);
        big.wait_connected(T).await.unwrap();
        big.client
            .publish(
                topics.down(&target, DownKind::Offer),
                rumqttc::QoS::AtMostOnce,
                false,
                vec![b'{'; protocol::mqtt::MAX_PACKET + 1024],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let options = protocol::mqtt::BrokerConfig::plain("127.0.0.1", broker.port)
            .options("hostile")
            .unwrap();
        let mut conn = protocol::mqtt::Connection::start(options, vec![]);
        conn.wait_connected(T).await.unwrap();
        for i in 0..1000u32 {
            let payload = match i % 3 {
                0 => b"{\"kind\":\"offer\",\"version\":1,\"transfer\":".to_vec(),
                1 => protocol::rollout::offer_for(&unsigned, &target, 64 << 10)
                    .unwrap()
                    .encode(),
                _ => format!("{{\"kind\":\"offer\",\"version\":1,\"junk\":{i}}}").into_bytes(),
            };
            conn.publish(topics.down(&target, DownKind::Offer), payload, false)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        conn.close().await;
    });
    w.wait::<Report>("/cam1/report", T, |r| {
        r.state == ReportState::Refused
            && r.reason.as_deref().is_some_and(|x| x.contains("signature"))
    })
    .expect("the unsigned offers are refused");
    assert!(edge.is_running(), "{}", edge.log());
    let log = edge.log();
    assert!(!log.contains("connection lost"), "{log}");
    let rss_after = rss(pid);
    eprintln!("edge resident set: {rss_before} kB before the hostile input, {rss_after} kB after");
    assert!(
        rss_after < rss_before + 128 * 1024,
        "memory grew from {rss_before} to {rss_after} kB"
    );
    assert_eq!(
        std::fs::metadata(&state).unwrap().modified().unwrap(),
        before,
        "refusals rewrote the state file"
    );
    let (ok, out) = publish(&broker, &f.p("v2.edgepkg"), &["--to", "device:cam1"]);
    assert!(ok, "{out}\n{}", edge.log());
    online_with(&w, "cam1", 2);
}

/// kill -9 (an abort at a fault point: no cleanup, no flush) at 20 places of a rollout, from the
/// stored offer through the chunks, the window between the last chunk and the switch (finalize,
/// package written, staged, self-tested, state saved, event saved, activated, reported) to the
/// trial's confirmation; after each restart a valid model is active and the same rollout
/// completes.
#[test]
fn kill9_at_20_points_of_a_rollout_leaves_a_valid_model_and_completes() {
    let f = fixture();
    let package = Package::read(&f.path("v2.edgepkg")).unwrap();
    let n = package.weights.len().div_ceil(64 << 10);
    let mut points: Vec<String> = ["offer".to_string()]
        .into_iter()
        .chain(
            [1, 2, 3, 4, n / 4, n / 2, 3 * n / 4, n - 1, n]
                .iter()
                .map(|k| format!("chunk-{k}")),
        )
        .collect();
    points.extend(
        [
            "finalize",
            "transfer-dropped",
            "package-written",
            "staged",
            "self-tested",
            "state-saved",
            "event-saved",
            "activated",
            "reported",
            "confirmed",
        ]
        .map(String::from),
    );
    assert_eq!(points.len(), 20);
    for point in &points {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path());
        let w = Watcher::start(broker.port);
        let fault = format!("abort:{point}");
        let mut edge = start_edge_with_faults(
            dir.path(),
            &broker,
            "cam1",
            &[],
            "confirm_after_s = 2",
            &fault,
        );
        online_with(&w, "cam1", 1);
        let (pkg, addr) = (f.p("v2.edgepkg"), broker.addr());
        let publisher = std::thread::spawn(move || {
            run(
                "trainer",
                &[
                    "publish",
                    &pkg,
                    "--broker",
                    &addr,
                    "--site",
                    "test",
                    "--to",
                    "device:cam1",
                    "--chunk-kib",
                    "64",
                    "--timeout",
                    "90",
                ],
            )
        });
        let until = std::time::Instant::now() + T;
        while edge.is_running() {
            assert!(
                std::time::Instant::now() < until,
                "{point}: the fault point was never reached\n{}",
                edge.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            edge.log().contains(&format!("abort at `{point}`")),
            "{point}: {}",
            edge.log()
        );
        edge.env.clear();
        edge.restart();
        let (ok, out) = publisher.join().unwrap();
        assert!(
            ok,
            "{point}: the rollout did not complete:\n{out}\n{}",
            edge.log()
        );
        let s = online_with(&w, "cam1", 2);
        assert_eq!(
            s.active.unwrap().sha256,
            protocol::Manifest::from_json(&package.manifest_bytes)
                .unwrap()
                .weights
                .sha256,
            "{point}"
        );
        eprintln!("kill -9 at `{point}`: restarted, v2 active, rollout complete");
    }
}
