//! The GPU machine's run, rehearsed on the CPU so that the first run on a GPU works the first
//! time: `scripts/gpu/device-run` on the CPU backend, with a synthetic data set and tiny budgets,
//! must check the device (parity with timm, verdicts identical to the CPU's, speed at each batch
//! size), train, evaluate, and return its summary and a model whose parts join into a file the
//! trainer loads.

use std::path::Path;
use std::process::Command;

use e2e::{Fixtures, bin, run_ok};

#[test]
fn device_run_rehearses_on_the_cpu() {
    let files = Fixtures::new("device-run");
    files.synth(5, 5);
    let out = files.path("out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu/device-run");
    let output = Command::new(&script)
        .env("OUT", &out)
        .env("DEVICE", "flex")
        .env("PRECISION", "f32")
        .env("TRAIN_S", "25")
        .env("PROBE_STEPS", "2")
        .env("BATCH", "2")
        .env("ITERATIONS", "2")
        .env("BATCHES", "1,2")
        .env("TRAINER", bin("trainer"))
        .env("DATA", files.path("synth"))
        .output()
        .expect("running scripts/gpu/device-run");
    let log = std::fs::read_to_string(out.join("run.log")).unwrap_or_default();
    assert!(output.status.success(), "device-run failed:\n{log}");

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json"))
            .expect("summary.json is JSON");
    let check = &summary["device_check"];
    for attention in ["timm_parity_fused", "timm_parity_explicit"] {
        let diff = check[attention]["max_abs_diff"].as_f64().expect(attention);
        assert!(diff <= 1e-4, "{attention}: {diff}\n{log}");
    }
    let detections = &check["detections"];
    assert_eq!(detections["images"], 30, "{log}");
    assert_eq!(detections["same_verdicts"], 30, "{log}");
    assert_eq!(
        check["speed"].as_array().map(Vec::len),
        Some(4),
        "two models x two batch sizes: {log}"
    );
    assert!(summary["steps_done"].as_u64().unwrap_or(0) >= 2, "{log}");
    assert!(summary["final_eval"]["map50"].is_number(), "{log}");

    // The model comes back in parts under the device tool's 16 MiB limit; joined, it loads.
    let parts = summary["model_parts"].as_array().expect("model_parts");
    assert!(!parts.is_empty(), "{log}");
    let mut joined = vec![];
    for part in parts {
        let part = out.join(part.as_str().unwrap());
        let bytes = std::fs::read(&part).unwrap();
        assert!(
            bytes.len() <= 16 << 20,
            "{} is {} bytes",
            part.display(),
            bytes.len()
        );
        joined.extend(bytes);
    }
    let model = files.path("joined.safetensors");
    std::fs::write(&model, joined).unwrap();
    run_ok(
        "trainer",
        &[
            "eval",
            "--model",
            &model.display().to_string(),
            "--data",
            &files.p("synth"),
            "--out",
            &files.p("eval-joined"),
        ],
    );
}
