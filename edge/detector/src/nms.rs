//! Class-wise greedy non-maximum suppression on the host.
//!
//! burn-vision's `Nms` also runs on the host, but enabling burn's `vision` feature pulls the
//! `image` crate with every default codec (an AV1 encoder among them), which costs minutes of
//! every cold build; the detector's few hundred candidates per image need only this loop.

use super::head::Detection;

/// IoU of two detections.
pub fn iou(a: &Detection, b: &Detection) -> f32 {
    box_iou([a.x1, a.y1, a.x2, a.y2], [b.x1, b.y1, b.x2, b.y2])
}

/// IoU of two `[x1, y1, x2, y2]` boxes.
pub fn box_iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Keeps, per class, each box that overlaps no higher-scoring kept box by more than
/// `iou_threshold`. Output is sorted by descending score.
pub fn class_wise_nms(mut boxes: Vec<Detection>, iou_threshold: f32) -> Vec<Detection> {
    boxes.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::with_capacity(boxes.len().min(128));
    for candidate in boxes {
        let suppressed = kept
            .iter()
            .any(|k| k.class_id == candidate.class_id && iou(k, &candidate) > iou_threshold);
        if !suppressed {
            kept.push(candidate);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x1: f32, y1: f32, x2: f32, y2: f32, class_id: usize, score: f32) -> Detection {
        Detection {
            x1,
            y1,
            x2,
            y2,
            class_id,
            score,
        }
    }

    #[test]
    fn suppresses_within_class_only() {
        let boxes = vec![
            det(0.0, 0.0, 10.0, 10.0, 0, 0.9),
            det(1.0, 1.0, 10.0, 10.0, 0, 0.8), // IoU 0.81 with the first: gone
            det(1.0, 1.0, 10.0, 10.0, 1, 0.7), // other class: kept
            det(20.0, 20.0, 30.0, 30.0, 0, 0.6), // no overlap: kept
        ];
        let kept = class_wise_nms(boxes, 0.5);
        let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.7, 0.6]);
    }

    #[test]
    fn iou_hand_value() {
        let a = det(0.0, 0.0, 2.0, 2.0, 0, 1.0);
        let b = det(1.0, 1.0, 3.0, 3.0, 0, 1.0);
        assert!((iou(&a, &b) - 1.0 / 7.0).abs() < 1e-6);
    }
}
