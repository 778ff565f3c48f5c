//! A real GigE Vision camera on loopback: Aravis's `arv-fake-gv-camera-0.8` (Debian's
//! aravis-tools), a GigE Vision device with a GenICam description that streams test frames over
//! UDP. The daemon inspects it software-triggered (the frame rate follows the trigger), then
//! free-running as a line-scan camera (buffers of 50 lines assembled into overlapping frames
//! stamped with their strip line); the camera is killed mid-run (the daemon reports the loss,
//! naming the camera, and keeps running) and started again: acquisition resumes without a
//! restart, and every verdict served before the loss is in the store at the end.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use e2e::{Edge, metric, metric_or, signed_nano_v1, try_get};
use protocol::Verdict;

/// The fake camera (one per machine: GigE Vision control is on UDP port 3956).
struct FakeCamera(Option<Child>);

impl FakeCamera {
    fn start() -> FakeCamera {
        let child = Command::new("arv-fake-gv-camera-0.8")
            .args(["-i", "127.0.0.1", "-s", "E2E01"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("arv-fake-gv-camera-0.8 (apt-get install aravis-tools)");
        std::thread::sleep(Duration::from_millis(500));
        FakeCamera(Some(child))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for FakeCamera {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_gige_vision_camera_is_inspected_triggered_and_survives_its_loss() {
    let (files, public) = signed_nano_v1("genicam", 1, 13);
    let mut camera = FakeCamera::start();
    let http = e2e::free_port();
    let base = format!("http://127.0.0.1:{http}");
    let metrics = || e2e::metrics_page(http);
    let config = |source: &str| {
        format!(
            "{}\n[source]\nkind = \"genicam\"\ncamera = \"127.0.0.1\"\n{source}\n\
             [pipeline]\non_full = \"block\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
            e2e::offline_edge_config("cam1", &[], &public, &files.path("v1.edgepkg"), ""),
        )
    };
    let wait_for = |edge: &Edge, what: &str, ok: &dyn Fn(&str) -> bool| {
        e2e::wait_for_metrics(http, what, Duration::from_secs(90), ok, &|| edge.log())
    };
    let frames = |m: &str| metric_or(m, "edge_camera_frames_total").unwrap_or(0.0);

    // Software trigger at 4 Hz: the camera sends a frame per trigger (it free-runs at 25 Hz).
    let mut edge = Edge::start(
        &files.dir,
        "trig",
        &config(
            "trigger = \"software\"\nsoftware_trigger_hz = 4.0\n\
             features = { Width = 256, Height = 200 }\n",
        ),
    );
    let m = wait_for(&edge, "the first triggered frames", &|m| frames(m) >= 2.0);
    let (t0, f0) = (Instant::now(), frames(&m));
    std::thread::sleep(Duration::from_secs(5));
    let m = metrics().unwrap();
    let rate = (frames(&m) - f0) / t0.elapsed().as_secs_f64();
    assert!(
        (2.5..=5.5).contains(&rate),
        "{rate:.1} frames/s at a 4 Hz trigger\n{m}"
    );
    assert_eq!(
        metric(&m, "edge_camera_incomplete_buffers_total"),
        0.0,
        "{m}"
    );
    let verdicts = |m: &str| e2e::verdicts_counted(m, &["pass", "fail"]);
    assert!(verdicts(&m) >= 10.0, "{m}");
    assert!(edge.stop().success(), "{}", edge.log());

    // Free-running line-scan: 50-line buffers into 200-line frames that share 20 lines.
    let mut edge = Edge::start(
        &files.dir,
        "line",
        &config(
            "lost_after_ms = 1000\nfeatures = { Width = 256, Height = 50, AcquisitionFrameRate = 40.0 }\n\
             line_scan = { frame_height = 200, overlap = 20, line_pitch_mm = 0.05 }\n",
        ),
    );
    wait_for(&edge, "line-scan verdicts", &|m| verdicts(m) >= 8.0);
    let served: Vec<Verdict> =
        serde_json::from_str(&try_get(&format!("{base}/api/verdicts?since=0")).unwrap().1).unwrap();
    assert!(served.len() >= 8);
    // Frames follow one another on the strip: each starts 180 lines after the previous.
    for pair in served.windows(2) {
        assert_eq!(
            pair[1].line,
            pair[0].line + 180,
            "{:?} then {:?}",
            pair[0].line,
            pair[1].line
        );
        assert_eq!((pair[1].width, pair[1].height), (256, 200));
        let mm = pair[1].position_mm.expect("a position in mm");
        assert!(
            (mm - pair[1].line as f64 * 0.05).abs() < 1e-9,
            "{mm} mm at line {}",
            pair[1].line
        );
    }

    // The cable is pulled: the daemon reports the loss by name and keeps serving.
    camera.kill();
    let m = wait_for(&edge, "the loss reported", &|m| {
        metric_or(m, "edge_camera_losses_total").unwrap_or(0.0) >= 1.0
            && metric_or(m, "edge_camera_connected") == Some(0.0)
    });
    let before_return = frames(&m);
    assert!(
        edge.log().contains("genicam: camera 127.0.0.1 lost"),
        "{}",
        edge.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(try_get(&format!("{base}/healthz")).is_ok_and(|(s, _)| s == 200));

    // The camera comes back: acquisition resumes without a restart.
    let _camera = FakeCamera::start();
    let m = wait_for(&edge, "acquisition resumed", &|m| {
        metric_or(m, "edge_camera_connected") == Some(1.0) && frames(m) >= before_return + 20.0
    });
    assert!(
        metric(&m, "edge_camera_gap_milliseconds_total") >= 2000.0,
        "{m}"
    );
    assert!(
        edge.log()
            .contains("genicam: camera 127.0.0.1 is back after"),
        "{}",
        edge.log()
    );
    let pid = edge.pid();
    assert!(
        edge.stop().success(),
        "the daemon (pid {pid:?}) kept running through the loss:\n{}",
        edge.log()
    );

    // Nothing inspected before the loss is lost.
    let store = edge::verdicts::store::VerdictStore::open(
        &files.dir.join("line/state/verdicts.sled"),
        Default::default(),
    )
    .unwrap();
    let stored: Vec<Verdict> = store.since(0, usize::MAX).unwrap();
    for v in &served {
        assert!(
            stored.iter().any(|s| s.id == v.id && s.line == v.line),
            "verdict {} missing",
            v.id
        );
    }
    assert!(stored.len() > served.len(), "{} stored", stored.len());
    eprintln!(
        "genicam: {rate:.1} frames/s at a 4 Hz trigger; line-scan {} verdicts stored, loss and return handled",
        stored.len()
    );
}
