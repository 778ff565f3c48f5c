//! Detection metrics: VOC mAP@0.5 with all-point interpolation (the PASCAL VOC devkit's
//! algorithm since 2010) and COCO mAP@[.5:.95] (101-point, as pycocotools computes it), per
//! class, with the precision-recall curves. Both are checked against the reference
//! implementations on a committed fixture (`scripts/fixtures/make_map_fixture.py`).
//!
//! Boxes are continuous coordinates (no "+1 pixel"). Difficult ground truth is neither a miss
//! nor a match: in VOC a detection that hits it is ignored, in COCO it is a crowd region.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub image: usize,
    pub class_id: usize,
    /// x1, y1, x2, y2.
    pub bbox: [f64; 4],
    pub difficult: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub image: usize,
    pub class_id: usize,
    pub bbox: [f64; 4],
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    pub name: String,
    /// Non-difficult ground-truth boxes.
    pub ground_truth: usize,
    pub predictions: usize,
    /// VOC all-point AP at IoU 0.5 (None without ground truth).
    pub ap50: Option<f64>,
    /// COCO AP averaged over IoU 0.5:0.05:0.95 (None without ground truth).
    pub ap50_95: Option<f64>,
    /// VOC precision-recall curve at IoU 0.5, one point per prediction by descending score.
    pub recall: Vec<f64>,
    pub precision: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Mean of VOC AP@0.5 over classes with ground truth.
    pub map50: f64,
    /// COCO mAP@[.5:.95].
    pub map50_95: f64,
    /// COCO's AP@0.5 (101-point), for comparison with COCO-style tables.
    pub coco_ap50: f64,
    pub images: usize,
    pub classes: Vec<ClassReport>,
}

fn area(b: &[f64; 4]) -> f64 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    inter / (area(a) + area(b) - inter)
}

/// Predictions of one class sorted by descending score, ties in input order (stable).
fn sorted_by_score(predictions: &[Prediction], class_id: usize) -> Vec<&Prediction> {
    let mut ps: Vec<&Prediction> = predictions
        .iter()
        .filter(|p| p.class_id == class_id)
        .collect();
    ps.sort_by(|a, b| b.score.total_cmp(&a.score));
    ps
}

/// VOC AP for one class at an IoU threshold: returns (AP, recall curve, precision curve);
/// AP is None when the class has no non-difficult ground truth.
pub fn voc_ap(
    ground_truth: &[GroundTruth],
    predictions: &[Prediction],
    class_id: usize,
    threshold: f64,
) -> (Option<f64>, Vec<f64>, Vec<f64>) {
    let gts: Vec<&GroundTruth> = ground_truth
        .iter()
        .filter(|g| g.class_id == class_id)
        .collect();
    let npos = gts.iter().filter(|g| !g.difficult).count();
    let mut matched = vec![false; gts.len()];
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let (mut recall, mut precision) = (Vec::new(), Vec::new());
    for p in sorted_by_score(predictions, class_id) {
        // The ground-truth box of the same image with the highest overlap, even if taken.
        let best = gts
            .iter()
            .enumerate()
            .filter(|(_, g)| g.image == p.image)
            .map(|(j, g)| (j, iou(&p.bbox, &g.bbox)))
            .fold(None, |best: Option<(usize, f64)>, (j, o)| match best {
                Some((_, bo)) if bo >= o => best,
                _ => Some((j, o)),
            });
        match best {
            Some((j, overlap)) if overlap > threshold => {
                if !gts[j].difficult {
                    if matched[j] {
                        fp += 1.0;
                    } else {
                        matched[j] = true;
                        tp += 1.0;
                    }
                }
            }
            _ => fp += 1.0,
        }
        if npos > 0 {
            recall.push(tp / npos as f64);
            precision.push(tp / (tp + fp).max(f64::EPSILON));
        }
    }
    if npos == 0 {
        return (None, recall, precision);
    }
    // All-point interpolation: area under the precision envelope.
    let mut mrec = vec![0.0];
    mrec.extend_from_slice(&recall);
    mrec.push(1.0);
    let mut mpre = vec![0.0];
    mpre.extend_from_slice(&precision);
    mpre.push(0.0);
    for i in (1..mpre.len()).rev() {
        mpre[i - 1] = mpre[i - 1].max(mpre[i]);
    }
    let ap = (0..mrec.len() - 1)
        .filter(|&i| mrec[i + 1] != mrec[i])
        .map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1])
        .sum();
    (Some(ap), recall, precision)
}

/// COCO's IoU: x/y/width/height arithmetic as in pycocotools, and for a crowd (here:
/// difficult) ground truth the intersection over the detection's own area.
fn coco_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let (dw, dh, gw, gh) = (d[2] - d[0], d[3] - d[1], g[2] - g[0], g[3] - g[1]);
    let w = (d[0] + dw).min(g[0] + gw) - d[0].max(g[0]);
    let h = (d[1] + dh).min(g[1] + gh) - d[1].max(g[1]);
    if w <= 0.0 || h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let union = if crowd {
        dw * dh
    } else {
        dw * dh + gw * gh - inter
    };
    inter / union
}

/// COCO precision table for one class: `[threshold][recall point]`, or None without
/// non-ignored ground truth. Mirrors pycocotools' `evaluateImg` + `accumulate` (area "all",
/// 100 detections per image).
fn coco_precision(
    ground_truth: &[GroundTruth],
    predictions: &[Prediction],
    class_id: usize,
    images: usize,
) -> Option<Vec<Vec<f64>>> {
    const MAX_DETS: usize = 100;
    let thresholds: Vec<f64> = (0..10).map(|i| i as f64 * (0.45 / 9.0) + 0.5).collect();
    let recall_points: Vec<f64> = (0..101).map(|i| i as f64 * 0.01).collect();
    // Per image: matches per threshold, then pooled across images by score.
    let mut scores: Vec<f64> = Vec::new();
    let mut det_matched: Vec<Vec<bool>> = vec![Vec::new(); thresholds.len()];
    let mut det_ignored: Vec<Vec<bool>> = vec![Vec::new(); thresholds.len()];
    let mut not_ignored_gt = 0usize;
    for image in 0..images {
        let mut gts: Vec<&GroundTruth> = ground_truth
            .iter()
            .filter(|g| g.image == image && g.class_id == class_id)
            .collect();
        // Non-ignored first, stable.
        gts.sort_by_key(|g| g.difficult);
        let mut dts: Vec<&Prediction> = predictions
            .iter()
            .filter(|p| p.image == image && p.class_id == class_id)
            .collect();
        dts.sort_by(|a, b| b.score.total_cmp(&a.score));
        dts.truncate(MAX_DETS);
        not_ignored_gt += gts.iter().filter(|g| !g.difficult).count();
        let ious: Vec<Vec<f64>> = dts
            .iter()
            .map(|d| {
                gts.iter()
                    .map(|g| coco_iou(&d.bbox, &g.bbox, g.difficult))
                    .collect()
            })
            .collect();
        for (t, &threshold) in thresholds.iter().enumerate() {
            let mut gt_taken = vec![false; gts.len()];
            for (di, _) in dts.iter().enumerate() {
                let mut best_iou = threshold.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for (gi, g) in gts.iter().enumerate() {
                    if gt_taken[gi] && !g.difficult {
                        continue;
                    }
                    if let Some(mi) = m
                        && !gts[mi].difficult
                        && g.difficult
                    {
                        break;
                    }
                    if ious[di][gi] < best_iou {
                        continue;
                    }
                    best_iou = ious[di][gi];
                    m = Some(gi);
                }
                match m {
                    Some(gi) => {
                        gt_taken[gi] = true;
                        det_matched[t].push(true);
                        det_ignored[t].push(gts[gi].difficult);
                    }
                    None => {
                        det_matched[t].push(false);
                        det_ignored[t].push(false);
                    }
                }
            }
        }
        scores.extend(dts.iter().map(|d| d.score));
    }
    if not_ignored_gt == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let table = thresholds
        .iter()
        .enumerate()
        .map(|(t, _)| {
            let (mut tp, mut fp) = (0.0f64, 0.0f64);
            let mut recall = Vec::with_capacity(order.len());
            let mut precision = Vec::with_capacity(order.len());
            for &i in &order {
                if det_ignored[t][i] {
                    // pycocotools drops ignored detections from both counts but keeps the point.
                } else if det_matched[t][i] {
                    tp += 1.0;
                } else {
                    fp += 1.0;
                }
                recall.push(tp / not_ignored_gt as f64);
                precision.push(tp / (fp + tp + f64::EPSILON));
            }
            for i in (1..precision.len()).rev() {
                if precision[i] > precision[i - 1] {
                    precision[i - 1] = precision[i];
                }
            }
            recall_points
                .iter()
                .map(|&r| {
                    let index = recall.partition_point(|&x| x < r);
                    precision.get(index).copied().unwrap_or(0.0)
                })
                .collect()
        })
        .collect();
    Some(table)
}

/// Evaluates predictions against ground truth over `images` images.
pub fn evaluate(
    ground_truth: &[GroundTruth],
    predictions: &[Prediction],
    class_names: &[String],
    images: usize,
) -> EvalReport {
    let mut classes = Vec::with_capacity(class_names.len());
    let mut coco_all: Vec<f64> = Vec::new();
    let mut coco_50: Vec<f64> = Vec::new();
    for (class_id, name) in class_names.iter().enumerate() {
        let (ap50, recall, precision) = voc_ap(ground_truth, predictions, class_id, 0.5);
        let table = coco_precision(ground_truth, predictions, class_id, images);
        let ap50_95 = table.as_ref().map(|t| {
            let all: Vec<f64> = t.iter().flatten().copied().collect();
            coco_all.extend_from_slice(&all);
            coco_50.extend_from_slice(&t[0]);
            all.iter().sum::<f64>() / all.len() as f64
        });
        classes.push(ClassReport {
            name: name.clone(),
            ground_truth: ground_truth
                .iter()
                .filter(|g| g.class_id == class_id && !g.difficult)
                .count(),
            predictions: predictions
                .iter()
                .filter(|p| p.class_id == class_id)
                .count(),
            ap50,
            ap50_95,
            recall,
            precision,
        });
    }
    let mean = |v: Vec<f64>| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    EvalReport {
        map50: mean(classes.iter().filter_map(|c| c.ap50).collect()),
        map50_95: mean(coco_all),
        coco_ap50: mean(coco_50),
        images,
        classes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(image: usize, bbox: [f64; 4]) -> GroundTruth {
        GroundTruth {
            image,
            class_id: 0,
            bbox,
            difficult: false,
        }
    }

    fn pred(image: usize, bbox: [f64; 4], score: f64) -> Prediction {
        Prediction {
            image,
            class_id: 0,
            bbox,
            score,
        }
    }

    #[test]
    fn hand_computed_voc_ap() {
        // Two objects; detections by score: hit, miss, hit. Precision 1, 1/2, 2/3 at recall
        // 1/2, 1/2, 1: all-point AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333.
        let g = [gt(0, [0.0, 0.0, 10.0, 10.0]), gt(1, [0.0, 0.0, 10.0, 10.0])];
        let p = [
            pred(0, [0.0, 0.0, 10.0, 10.0], 0.9),
            pred(0, [50.0, 50.0, 60.0, 60.0], 0.8),
            pred(1, [1.0, 0.0, 10.0, 10.0], 0.7),
        ];
        let (ap, recall, precision) = voc_ap(&g, &p, 0, 0.5);
        assert!((ap.unwrap() - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
        assert_eq!(recall, vec![0.5, 0.5, 1.0]);
        assert!((precision[2] - 2.0 / 3.0).abs() < 1e-12);
        let report = evaluate(&g, &p, &["x".to_string()], 2);
        assert!(report.map50_95 > 0.0 && report.map50_95 <= report.coco_ap50);
    }

    #[test]
    fn a_duplicate_is_a_false_positive_and_difficult_is_ignored() {
        let g = [
            gt(0, [0.0, 0.0, 10.0, 10.0]),
            GroundTruth {
                difficult: true,
                ..gt(0, [20.0, 20.0, 30.0, 30.0])
            },
        ];
        let p = [
            pred(0, [0.0, 0.0, 10.0, 10.0], 0.9),
            pred(0, [0.0, 0.0, 10.0, 10.0], 0.8),
            pred(0, [20.0, 20.0, 30.0, 30.0], 0.7),
        ];
        let (ap, recall, precision) = voc_ap(&g, &p, 0, 0.5);
        assert_eq!(ap, Some(1.0));
        assert_eq!(recall, vec![1.0, 1.0, 1.0]);
        assert_eq!(precision[1], 0.5, "duplicate counted as false positive");
        assert_eq!(precision[2], 0.5, "hit on a difficult box changes nothing");
    }
}
