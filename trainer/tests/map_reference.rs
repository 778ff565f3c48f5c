//! mAP against the reference implementations (VOC devkit algorithm, pycocotools), on the
//! fixture written by `scripts/fixtures/make_map_fixture.py`: equal to 1e-6.

use serde_json::Value;
use trainer::eval::{GroundTruth, Prediction, evaluate};

fn bbox(v: &Value) -> [f64; 4] {
    let a: Vec<f64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    [a[0], a[1], a[2], a[3]]
}

#[test]
fn map_equals_voc_devkit_and_pycocotools() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/map_fixture.json"
    ))
    .unwrap();
    let f: Value = serde_json::from_str(&text).unwrap();
    let classes: Vec<String> = f["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let gts: Vec<GroundTruth> = f["ground_truth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| GroundTruth {
            image: g["image"].as_u64().unwrap() as usize,
            class_id: g["class"].as_u64().unwrap() as usize,
            bbox: bbox(&g["bbox"]),
            difficult: g["difficult"].as_bool().unwrap(),
        })
        .collect();
    let preds: Vec<Prediction> = f["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prediction {
            image: p["image"].as_u64().unwrap() as usize,
            class_id: p["class"].as_u64().unwrap() as usize,
            bbox: bbox(&p["bbox"]),
            score: p["score"].as_f64().unwrap(),
        })
        .collect();
    let report = evaluate(&gts, &preds, &classes, 30);
    let close = |a: f64, b: f64, what: &str| {
        assert!((a - b).abs() <= 1e-6, "{what}: ours {a} reference {b}")
    };
    close(
        report.map50,
        f["voc_map50"].as_f64().unwrap(),
        "VOC mAP@0.5",
    );
    close(
        report.map50_95,
        f["coco_map50_95"].as_f64().unwrap(),
        "COCO mAP@[.5:.95]",
    );
    close(
        report.coco_ap50,
        f["coco_ap50"].as_f64().unwrap(),
        "COCO AP@0.5",
    );
    for (k, c) in report.classes.iter().enumerate() {
        match f["voc_ap50"][&c.name].as_f64() {
            Some(reference) => close(c.ap50.unwrap(), reference, &format!("VOC AP {}", c.name)),
            None => assert_eq!(c.ap50, None, "class {} has no ground truth", c.name),
        }
        match f["coco_ap50_95_per_class"][k].as_f64() {
            Some(reference) => close(
                c.ap50_95.unwrap(),
                reference,
                &format!("COCO AP {}", c.name),
            ),
            None => assert_eq!(c.ap50_95, None),
        }
    }
}
