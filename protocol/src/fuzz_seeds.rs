//! The committed seeds of the `decoders` fuzz target (`protocol/fuzz/corpus/decoders`): one
//! valid example of every input its decoders take. The test fails when the protocol changes and
//! the seeds no longer match; `FUZZ_CORPUS_WRITE=1 cargo test -p protocol fuzz_seeds` rewrites
//! them.

use std::path::Path;

use crate::messages::*;
use crate::package::{Package, SigningKey};
use crate::topics::Target;

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let key = SigningKey::from_bytes(&[11; 32]);
    let weights: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let manifest = crate::package::tests::manifest_for(&weights, 3);
    let package = Package::build(&manifest, weights.clone(), &key).unwrap();
    let target: Target = "group:canary".parse().unwrap();
    let offer = crate::rollout::offer_for(&package, &target, MIN_CHUNK).unwrap();
    let transfer = transfer_id(&offer.transfer).unwrap();
    let chunk = Chunk {
        transfer,
        index: 1,
        count: 3,
        data: &weights[MIN_CHUNK..2 * MIN_CHUNK],
    };
    let verdict = Verdict {
        id: 42,
        device: "cam1".into(),
        frame: 7,
        line: 1400,
        origin: "line-scan".into(),
        width: 2048,
        height: 200,
        captured_ms: 1_700_000_000_000,
        decided_ms: 1_700_000_000_050,
        latency_ms: 50.0,
        pass: false,
        defects: vec![Defect {
            class: "scratches".into(),
            score: 0.9,
            bbox: [1.0, 2.0, 30.0, 40.0],
            fails: true,
        }],
        model: Some(("neu-edge".into(), 5)),
        undecided: None,
        position_mm: None,
    };
    let undecided = Verdict {
        undecided: Some(Undecided {
            cause: UndecidedCause::DetectorError,
            reason: "detector: out of memory".into(),
        }),
        defects: vec![],
        ..verdict.clone()
    };
    let model = ModelRef {
        id: "neu-edge".into(),
        version: 5,
        sha256: "ab".repeat(32),
    };
    let status = Status {
        device: "cam1".into(),
        line: "line1".into(),
        groups: vec!["canary".into()],
        edge_version: "0.2.0".into(),
        online: true,
        active: Some(model.clone()),
        previous: vec![model],
        on_trial: true,
        last_event: Some("activated v5".into()),
        updated_unix: 1_700_000_000,
    };
    let report = Report {
        device: "cam1".into(),
        transfer: Some(offer.transfer.clone()),
        version: Some(3),
        state: ReportState::Receiving,
        have: 1,
        missing: vec![[0, 0], [2, 2]],
        reason: None,
    };
    let command = Command {
        action: CommandAction::Rollback {
            to_version: Some(4),
        },
        target: target.clone(),
        site: "plant-a".into(),
        issued_ms: 1_700_000_000_000,
        expires_ms: 1_700_000_600_000,
    };
    vec![
        ("offer.json", offer.encode()),
        ("chunk.bin", chunk.encode()),
        (
            "complete.json",
            Complete {
                transfer: offer.transfer.clone(),
                chunks: 3,
            }
            .encode(),
        ),
        ("report.json", report.encode()),
        ("status.json", status.encode()),
        ("verdict.json", verdict.encode()),
        ("verdict-undecided.json", undecided.encode()),
        ("command.json", SignedCommand::sign(&command, &key).encode()),
        ("command-body.json", serde_json::to_vec(&command).unwrap()),
        ("package.edgepkg", package.to_bytes()),
        ("manifest.json", package.manifest_bytes.clone()),
        ("target.txt", b"device:cam-01".to_vec()),
    ]
}

#[test]
fn fuzz_seeds_are_committed_and_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decoders");
    let write = std::env::var_os("FUZZ_CORPUS_WRITE").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (FUZZ_CORPUS_WRITE=1 cargo test -p protocol fuzz_seeds)",
                path.display()
            )
        });
        assert!(
            committed == bytes,
            "{} is stale: FUZZ_CORPUS_WRITE=1 cargo test -p protocol fuzz_seeds",
            path.display()
        );
    }
}
