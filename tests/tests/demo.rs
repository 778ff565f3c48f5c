//! The README's demo, as processes against a real mosquitto broker with the smallest budgets:
//! data, SimCLR, few-shot fine-tuning, evaluation, INT8, a signed package rolled out over MQTT to
//! a real edge daemon, verdicts from the new model that agree with the strip's ground truth.

use e2e::{Broker, run};

#[test]
fn demo_runs_the_whole_product_against_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let out = dir.path().join("demo");
    let (ok, text) = run(
        "trainer",
        &[
            "demo",
            "--budget",
            "smoke",
            "--broker",
            &broker.addr(),
            "--frames",
            "12",
            "--out",
            &out.display().to_string(),
        ],
    );
    let log = std::fs::read_to_string(out.join("edge/edge.log")).unwrap_or_default();
    assert!(ok, "demo failed:\n{text}\nedge log:\n{log}");
    for stage in 1..=10 {
        assert!(
            text.contains(&format!("=== [{stage}/10]")),
            "stage {stage} missing:\n{text}"
        );
    }
    // The rollout reached the device and it switched.
    assert!(text.contains("demo-01"), "{text}");
    // The summary: verdicts by the new model, checked against the strip's own ground truth.
    let line = text
        .lines()
        .find(|l| l.contains("(demo-strip, just trained)"))
        .unwrap_or_else(|| panic!("no verdicts by the new model:\n{text}\nedge log:\n{log}"));
    let numbers: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    // "model vV (...): N frames, F failed, A/N agree ... (P%)"
    let (frames, agree) = (numbers[1], numbers[3]);
    assert!(frames >= 12.0, "{line}");
    assert!(
        agree / frames >= 0.75,
        "the new model agrees with the strip's ground truth on {agree}/{frames} frames: {line}"
    );
    assert!(out.join("report/report.md").exists());
    // Each training run draws its curves: loss with kNN accuracy, loss with mAP.
    for run in ["simclr", "finetune"] {
        let png = out.join(run).join("curves.png");
        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!((img.width(), img.height()), (900, 500), "{}", png.display());
    }
    // The demo's package is one version above the factory model's (devices refuse downgrades).
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge/models");
    let release = std::fs::read_to_string(models.join("release.pub")).unwrap();
    let factory = protocol::package::Package::read(&models.join("neu-edge.edgepkg"))
        .unwrap()
        .verify(&[protocol::package::parse_public_key(release.trim()).unwrap()])
        .unwrap();
    let package = out.join(format!("demo-v{}.edgepkg", factory.version + 1));
    assert!(package.exists(), "{} missing", package.display());
    assert!(text.contains("labeling page: http://127.0.0.1:"), "{text}");
}
