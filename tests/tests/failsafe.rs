//! Fail-safe verdicts, with real files and the real daemon: a truncated JPEG, a file that is no
//! image, detector errors and a detector panic (fault points armed through `EDGE_FAULTS`, built
//! only into test builds) each give the frame an explicit `undecided` verdict with its cause,
//! rejected by the default policy and counted in `/metrics`; the inference loop is restarted
//! after the panic; no frame is lost and none passes undecided. Local tools refuse a package
//! whose weights or manifest were altered.

use std::time::{Duration, Instant};

use e2e::{Edge, Fixtures, get, metric, metric_or, run, run_ok, signed_nano_v1, try_get};
use protocol::messages::Message;
use protocol::{UndecidedCause, Verdict};

#[test]
fn bad_frames_and_detector_faults_get_the_failsafe_verdict() {
    let (files, public) = signed_nano_v1("failsafe", 2, 7);
    // Eight whole images, a JPEG cut in half (as an interrupted copy leaves it) and a file
    // that is no image at all, in name order.
    let frames = files.path("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let mut synth: Vec<_> = std::fs::read_dir(files.path("synth/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    synth.sort();
    for (i, p) in synth.iter().take(8).enumerate() {
        std::fs::copy(p, frames.join(format!("{:02}.jpg", i * 10))).unwrap();
    }
    let whole = std::fs::read(&synth[0]).unwrap();
    std::fs::write(frames.join("15-cut.jpg"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(frames.join("45-junk.jpg"), b"\xff\xd8\xff\xe0 not really").unwrap();

    // `edge detect` refuses the cut file, naming it.
    let cut = frames.join("15-cut.jpg").display().to_string();
    let (ok, out) = run("edge", &["detect", &cut]);
    assert!(
        !ok && out.contains("15-cut.jpg") && out.contains("truncated JPEG"),
        "{out}"
    );

    let port = e2e::free_port();
    let config = format!(
        "{}\n[source]\nkind = \"folder\"\npath = \"{}\"\n\n[pipeline]\non_full = \"block\"\nmax_batch = 1\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
        e2e::offline_edge_config("cam1", &[], &public, &files.path("v1.edgepkg"), ""),
        frames.display()
    );
    // Good frames are batches 1..8 (one tile each): 2 and 3 fail, 5 panics.
    let edge = Edge::start_with_env(
        &files.dir,
        "cam1",
        &config,
        &[("EDGE_FAULTS", "detect_error:2-3,detect_panic:5")],
    );
    let base = format!("http://127.0.0.1:{port}");
    let until = Instant::now() + Duration::from_secs(90);
    let verdicts: Vec<Verdict> = loop {
        if let Ok(resp) = try_get(&format!("{base}/api/verdicts?since=0"))
            && resp.0 == 200
        {
            let v: Vec<Verdict> = serde_json::from_str(&resp.1).unwrap();
            if v.len() >= 10 {
                break v;
            }
        }
        assert!(Instant::now() < until, "not 10 verdicts:\n{}", edge.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(verdicts.len(), 10, "one verdict per file, no more");
    let by_origin = |o: &str| {
        verdicts
            .iter()
            .find(|v| v.origin == o)
            .unwrap_or_else(|| panic!("no verdict for {o}: {verdicts:?}"))
    };
    let cause = |o: &str| by_origin(o).undecided.as_ref().map(|u| u.cause);
    assert_eq!(cause("15-cut.jpg"), Some(UndecidedCause::BadFrame));
    assert!(
        by_origin("15-cut.jpg")
            .undecided
            .as_ref()
            .unwrap()
            .reason
            .contains("truncated JPEG")
    );
    assert_eq!(cause("45-junk.jpg"), Some(UndecidedCause::BadFrame));
    assert_eq!(cause("00.jpg"), None);
    assert_eq!(cause("10.jpg"), Some(UndecidedCause::DetectorError));
    assert_eq!(cause("20.jpg"), Some(UndecidedCause::DetectorError));
    assert_eq!(cause("30.jpg"), None);
    assert_eq!(cause("40.jpg"), Some(UndecidedCause::InferenceFailed));
    for o in ["50.jpg", "60.jpg", "70.jpg"] {
        assert_eq!(cause(o), None, "decided after the restart: {o}");
    }
    // Nothing undecided passes (default policy: reject), and the ids have no gaps.
    for v in &verdicts {
        assert!(v.undecided.is_none() || !v.pass, "undecided PASS: {v:?}");
    }
    let mut ids: Vec<u64> = verdicts.iter().map(|v| v.id).collect();
    ids.sort();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    let (_, m) = get(&format!("{base}/metrics"));
    assert_eq!(metric(&m, "edge_undecided_total{cause=\"bad_frame\"}"), 2.0);
    assert_eq!(
        metric(&m, "edge_undecided_total{cause=\"detector_error\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "edge_undecided_total{cause=\"inference_failed\"}"),
        1.0
    );
    assert_eq!(metric(&m, "edge_verdicts_total{result=\"undecided\"}"), 5.0);
    assert_eq!(metric(&m, "edge_inference_restarts_total"), 1.0);
    assert_eq!(metric(&m, "edge_verdicts_lost_total"), 0.0);
    let log = edge.log();
    assert!(
        log.contains("UNDECIDED (bad_frame") && log.contains("restart 1 in"),
        "{log}"
    );
}

/// A detector that panics on every batch: the supervisor restarts the loop with a growing
/// back-off, `/readyz` says the loop is not running meanwhile, every frame gets the fail-safe
/// verdict and the daemon stays up.
#[test]
fn a_panicking_detector_is_restarted_and_readiness_says_so() {
    let (files, public) = signed_nano_v1("supervision", 1, 2);
    let port = e2e::free_port();
    let config = format!(
        "{}\n[source]\nkind = \"synthetic\"\nfps = 20\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
        e2e::offline_edge_config("cam1", &[], &public, &files.path("v1.edgepkg"), ""),
    );
    let mut edge = Edge::start_with_env(
        &files.dir,
        "cam1",
        &config,
        &[("EDGE_FAULTS", "detect_panic:1-100000")],
    );
    let base = format!("http://127.0.0.1:{port}");
    let until = Instant::now() + Duration::from_secs(60);
    let mut seen = false;
    while !seen {
        assert!(
            Instant::now() < until,
            "readiness never said the loop was down:\n{}",
            edge.log()
        );
        if let Ok((503, body)) = try_get(&format!("{base}/readyz")) {
            seen = body.contains("inference loop is not running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let a few restarts happen (100, 200, 400 ms...).
    std::thread::sleep(Duration::from_secs(2));
    let (_, m) = get(&format!("{base}/metrics"));
    assert!(metric(&m, "edge_inference_restarts_total") >= 3.0, "{m}");
    assert!(
        metric(&m, "edge_undecided_total{cause=\"inference_failed\"}") >= 3.0,
        "{m}"
    );
    assert_eq!(
        metric_or(&m, "edge_verdicts_total{result=\"pass\"}").unwrap_or(0.0),
        0.0
    );
    assert!(edge.is_running());
}

#[test]
fn local_tools_refuse_altered_packages() {
    let files = Fixtures::new("package-trust");
    files.keygen("fleet");
    files.synth(1, 3);
    let model = files.init_model("m", "nano", 0);
    let golden = files.golden("crazing_1.jpg");
    let pkg = files.path("v1.edgepkg");
    e2e::package(&model, &files.path("keys/fleet.key"), 1, &golden, &pkg);
    let image = golden.display().to_string();
    let key = files.p("keys/fleet.pub");
    let detect = |model: &str, extra: &[&str]| {
        let mut args = vec!["detect", "--model", model, &image];
        args.extend_from_slice(extra);
        run("edge", &args)
    };
    let p = pkg.display().to_string();
    // Signed by the fleet key, not the release key the tools trust by default.
    let (ok, out) = detect(&p, &[]);
    assert!(!ok && out.contains("package refused"), "{out}");
    run_ok(
        "edge",
        &["detect", "--model", &p, "--trusted-key", &key, &image],
    );
    // One bit flipped in the weights: refused even without a signature check.
    let bytes = std::fs::read(&pkg).unwrap();
    let mut flipped = bytes.clone();
    let at = flipped.len() - 1000;
    flipped[at] ^= 0x10;
    let fp = files.path("flipped.edgepkg");
    std::fs::write(&fp, &flipped).unwrap();
    let fps = fp.display().to_string();
    let (ok, out) = detect(&fps, &["--no-signature-check"]);
    assert!(!ok && out.contains("digest"), "{out}");
    let (ok, out) = detect(&fps, &["--trusted-key", &key]);
    assert!(!ok && out.contains("package refused"), "{out}");
    // The factory package verifies against the built-in release key.
    let factory = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../edge/models/neu-edge.edgepkg"
    );
    run_ok("edge", &["detect", "--model", factory, &image]);
}

/// A day offline, compressed: the broker stops (persistence on) while frames flow, the store
/// fills a small real filesystem (a 48 MiB tmpfs when the test may mount one) past its budget's
/// reserve (frames shed, verdicts kept), the edge is killed -9 with more than 1,000 verdicts
/// pending, then broker and edge come back: every verdict decided before the kill reaches an
/// independent `mosquitto_sub` consumer (persistent session, QoS 1); repeats are counted.
/// OUTAGE_S (default 20) sets how long the broker stays down at least; `scripts/faults/outage`
/// runs it with 60.
#[test]
fn offline_on_a_small_disk_then_kill9_loses_no_verdict() {
    let (files, public) = signed_nano_v1("outage", 1, 5);
    let outage = Duration::from_secs(
        std::env::var("OUTAGE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    // The edge's state on its own small filesystem where the test may mount one.
    let state = files.path("state-fs");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&state)
        .status()
        .is_ok_and(|s| s.success());
    struct Unmount(std::path::PathBuf, bool);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if self.1 {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
    }
    let _unmount = Unmount(state.clone(), mounted);
    if !mounted {
        eprintln!(
            "note: cannot mount a tmpfs here; the store budget is tested on the ordinary disk"
        );
    }

    let port = e2e::free_port();
    let mut broker = e2e::Broker::start_persistent(&files.dir, port);
    let received = files.path("consumer.txt");
    let mut consumer = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-c"])
        .args(["-i", "verdict-consumer", "-t", "edgeinsp/+/+/+/verdict"])
        .stdout(std::fs::File::create(&received).unwrap())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    std::thread::sleep(Duration::from_millis(500));

    let http = e2e::free_port();
    let config = format!(
        "{}\n[storage]\ndir = \"{}\"\n\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive_s = 2\n\n\
         [source]\nkind = \"synthetic\"\nfps = 60\n\n[pipeline]\non_full = \"block\"\n\n\
         [store]\nkeep_frames = \"all\"\ndisk_budget_mb = 3\nreserve_mb = 3\n\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n",
        e2e::offline_edge_config("cam1", &[], &public, &files.path("v1.edgepkg"), "")
            .replace("[storage]\ndir = \"state\"\n", ""),
        state.display()
    );
    let mut edge = Edge::start(&files.dir, "cam1", &config);
    let metrics = || e2e::metrics_page(http);
    let wait_for = |what: &str, until: Duration, ok: &dyn Fn(&str) -> bool| {
        e2e::wait_for_metrics(http, what, until, ok, &String::new)
    };
    wait_for("verdicts delivered", Duration::from_secs(60), &|m| {
        e2e::verdicts_counted(m, &["pass", "fail"]) > 50.0
    });
    // The broker goes away (SIGTERM: it saves its persistence file) while frames keep coming.
    broker.stop();
    let down = Instant::now();
    // The consumer's session and the verdicts queued for it are in the broker's file, or the
    // consumer would race the edge's drain after the restart.
    assert!(
        files
            .dir
            .join(format!("mosquitto-{port}-db/mosquitto.db"))
            .exists(),
        "mosquitto saved no persistence file:\n{}",
        broker.log()
    );
    let m = wait_for("1,000 verdicts pending", Duration::from_secs(180), &|m| {
        metric_or(m, "edge_outbox_pending").unwrap_or(0.0) >= 1000.0
    });
    std::thread::sleep(outage.saturating_sub(down.elapsed()));
    let m = metrics().unwrap_or(m);
    assert!(metric(&m, "edge_frames_shed_total") > 0.0, "{m}");
    // The whole budget is reserve (the store unit test covers the order frames, then
    // verdicts): every new frame is shed, verdicts are stored, the alarm is up.
    assert_eq!(metric(&m, "edge_store_in_reserve"), 1.0, "{m}");
    assert!(metric(&m, "edge_store_bytes") <= (3 << 20) as f64, "{m}");
    assert_eq!(metric(&m, "edge_verdicts_lost_total"), 0.0, "{m}");
    edge.kill9();
    // Every id decided before the kill is in the store (ids have no gaps): the consumer must
    // see them all.
    let last_id = {
        let store = edge::verdicts::store::VerdictStore::open(
            &state.join("verdicts.sled"),
            Default::default(),
        )
        .unwrap();
        let last = store
            .pending_after(0, usize::MAX)
            .unwrap()
            .last()
            .unwrap()
            .0;
        eprintln!("killed -9 with {} verdicts pending", store.pending());
        assert!(store.pending() >= 1000);
        last
    };
    broker.restart();
    edge.restart();
    let end = Instant::now() + Duration::from_secs(120);
    let (seen, repeats) = loop {
        let text = std::fs::read_to_string(&received).unwrap_or_default();
        let ids: Vec<u64> = text
            .lines()
            .filter_map(|l| Verdict::decode(l.as_bytes()).ok())
            .map(|v| v.id)
            .collect();
        let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        if (1..=last_id).all(|id| distinct.contains(&id)) {
            break (distinct.len(), ids.len() - distinct.len());
        }
        assert!(
            Instant::now() < end,
            "the consumer is missing {:?}... of 1..={last_id} (it has {} distinct, newest {:?}, \
             running: {}); edge metrics:\n{}\nbroker log:\n{}\nedge log:\n{}",
            (1..=last_id)
                .filter(|id| !distinct.contains(id))
                .take(10)
                .collect::<Vec<_>>(),
            distinct.len(),
            distinct.last(),
            consumer.try_wait().is_ok_and(|s| s.is_none()),
            metrics()
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("edge_outbox") || l.starts_with("edge_mqtt"))
                .collect::<Vec<_>>()
                .join("\n"),
            broker.log(),
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "consumer: all {last_id} verdicts decided before the kill arrived ({seen} distinct so far, {repeats} repeats, outage {:.0} s, tmpfs: {mounted})",
        down.elapsed().as_secs_f64()
    );
    let _ = consumer.kill();
    let _ = consumer.wait();
}
