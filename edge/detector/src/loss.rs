//! Training losses of the detection head and the assignment of ground truth to its
//! locations: quality focal loss for the class scores (GFL, Li et al. 2020), GIoU loss for the
//! boxes (Rezatofighi et al. 2019), FCOS's centre sampling and per-level size ranges.

use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, sigmoid};

use super::head::{HeadOutput, location_centres};

/// A ground-truth box in input pixels with its class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub class_id: usize,
    /// Identity of the labeled box this one came from (through augmentation), when the trainer
    /// tracks each box's loss (noisy-label filtering); `DetectionLoss::per_box` reports it.
    pub id: Option<u32>,
    /// Weight of this box's locations in the loss (1: a label trusted fully; 0: ignored).
    pub weight: f32,
}

/// How ground truth is assigned to locations and how the parts are weighed.
#[derive(Config, Debug)]
pub struct LossConfig {
    /// A location is positive only within this many strides of a box centre (FCOS centre sampling).
    #[config(default = 1.5)]
    pub center_radius: f32,
    /// Upper bound of the largest ltrb distance each level regresses, finest first; the last
    /// level takes everything above the previous bound.
    #[config(default = "vec![64.0, 128.0]")]
    pub level_bounds: Vec<f32>,
    #[config(default = 2.0)]
    pub qfl_beta: f64,
    #[config(default = 2.0)]
    pub box_weight: f64,
    /// Per-class weights on the class loss (empty: all 1), for long-tailed label sets.
    #[config(default = "Vec::new()")]
    pub class_weights: Vec<f32>,
}

/// Per-location targets for a batch, built on the host.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `[B * L]`: class of the assigned box, or `None` for background.
    pub class: Vec<Option<usize>>,
    /// `[B * L]` target boxes (x1, y1, x2, y2) for positives; zeros elsewhere.
    pub boxes: Vec<[f32; 4]>,
    /// `[B * L]`: the assigned box's identity and weight (`GtBox::id`, `GtBox::weight`).
    pub owner: Vec<(Option<u32>, f32)>,
}

/// FCOS assignment: a location is positive for a box when it lies inside the box, within
/// `center_radius` strides of its centre, and the box's largest ltrb distance falls in the
/// location's level range; among several such boxes the smallest wins.
pub fn assign(
    gt: &[Vec<GtBox>],
    level_sizes: &[[usize; 2]],
    strides: &[usize],
    config: &LossConfig,
) -> Targets {
    let points = location_centres(level_sizes, strides);
    let mut level_of_point = Vec::with_capacity(points.len());
    for (level, [h, w]) in level_sizes.iter().enumerate() {
        level_of_point.extend(std::iter::repeat_n(level, h * w));
    }
    let bound = |level: usize| -> (f32, f32) {
        let lo = if level == 0 {
            0.0
        } else {
            config
                .level_bounds
                .get(level - 1)
                .copied()
                .unwrap_or(f32::INFINITY)
        };
        let hi = config
            .level_bounds
            .get(level)
            .copied()
            .filter(|_| level + 1 < level_sizes.len())
            .unwrap_or(f32::INFINITY);
        (lo, hi)
    };
    let mut class = Vec::with_capacity(gt.len() * points.len());
    let mut boxes = Vec::with_capacity(gt.len() * points.len());
    let mut owner = Vec::with_capacity(gt.len() * points.len());
    for image_boxes in gt {
        for (p, &(x, y, s)) in points.iter().enumerate() {
            let (lo, hi) = bound(level_of_point[p]);
            let mut best: Option<(f32, &GtBox)> = None;
            for b in image_boxes {
                let (l, t, r, bo) = (x - b.x1, y - b.y1, b.x2 - x, b.y2 - y);
                if l <= 0.0 || t <= 0.0 || r <= 0.0 || bo <= 0.0 {
                    continue;
                }
                let (cx, cy) = ((b.x1 + b.x2) / 2.0, (b.y1 + b.y2) / 2.0);
                let radius = config.center_radius * s;
                if (x - cx).abs() >= radius || (y - cy).abs() >= radius {
                    continue;
                }
                let reach = l.max(t).max(r).max(bo);
                if reach <= lo || reach > hi {
                    continue;
                }
                let area = (b.x2 - b.x1) * (b.y2 - b.y1);
                if best.is_none_or(|(a, _)| area < a) {
                    best = Some((area, b));
                }
            }
            match best {
                Some((_, b)) => {
                    class.push(Some(b.class_id));
                    boxes.push([b.x1, b.y1, b.x2, b.y2]);
                    owner.push((b.id, b.weight));
                }
                None => {
                    class.push(None);
                    boxes.push([0.0; 4]);
                    owner.push((None, 1.0));
                }
            }
        }
    }
    Targets {
        class,
        boxes,
        owner,
    }
}

/// Sigmoid focal loss (RetinaNet), summed. `targets` in {0, 1}, same shape as `logits`.
pub fn sigmoid_focal_loss<const D: usize>(
    logits: Tensor<D>,
    targets: Tensor<D>,
    alpha: f64,
    gamma: f64,
) -> Tensor<1> {
    let p = sigmoid(logits.clone());
    let ce = binary_cross_entropy_with_logits(logits, targets.clone());
    let p_t = p.clone() * targets.clone() + (p.neg() + 1.0) * (targets.clone().neg() + 1.0);
    let alpha_t = targets.clone() * alpha + (targets.neg() + 1.0) * (1.0 - alpha);
    (alpha_t * (p_t.neg() + 1.0).powf_scalar(gamma) * ce).sum()
}

/// Quality focal loss (GFL): BCE against a soft target `score` in [0, 1] (the IoU of the
/// predicted box at positives, 0 elsewhere), scaled by `|score - sigmoid(logit)|^beta`. Summed;
/// `weights` (same shape or broadcastable) multiplies each element.
pub fn quality_focal_loss<const D: usize>(
    logits: Tensor<D>,
    score: Tensor<D>,
    beta: f64,
    weights: Option<Tensor<D>>,
) -> Tensor<1> {
    let p = sigmoid(logits.clone());
    let modulator = (score.clone() - p).abs().powf_scalar(beta);
    let loss = binary_cross_entropy_with_logits(logits, score) * modulator;
    match weights {
        Some(w) => (loss * w).sum(),
        None => loss.sum(),
    }
}

/// Elementwise `-(y log s(x) + (1 - y) log(1 - s(x)))`, stable for large |x|.
pub fn binary_cross_entropy_with_logits<const D: usize>(
    logits: Tensor<D>,
    targets: Tensor<D>,
) -> Tensor<D> {
    let log_p = log_sigmoid(logits.clone());
    let log_not_p = log_sigmoid(logits.neg());
    (targets.clone() * log_p + (targets.neg() + 1.0) * log_not_p).neg()
}

/// IoU and GIoU of paired boxes `[N, 4]` (x1, y1, x2, y2): returns `(iou, giou)`, each `[N]`.
pub fn iou_giou(pred: Tensor<2>, target: Tensor<2>) -> (Tensor<1>, Tensor<1>) {
    let [n, _] = pred.dims();
    let col = |t: &Tensor<2>, i: usize| t.clone().narrow(1, i, 1).reshape([n]);
    let (px1, py1, px2, py2) = (col(&pred, 0), col(&pred, 1), col(&pred, 2), col(&pred, 3));
    let (tx1, ty1, tx2, ty2) = (
        col(&target, 0),
        col(&target, 1),
        col(&target, 2),
        col(&target, 3),
    );
    let area_p =
        (px2.clone() - px1.clone()).clamp_min(0.0) * (py2.clone() - py1.clone()).clamp_min(0.0);
    let area_t =
        (tx2.clone() - tx1.clone()).clamp_min(0.0) * (ty2.clone() - ty1.clone()).clamp_min(0.0);
    let iw = (px2.clone().min_pair(tx2.clone()) - px1.clone().max_pair(tx1.clone())).clamp_min(0.0);
    let ih = (py2.clone().min_pair(ty2.clone()) - py1.clone().max_pair(ty1.clone())).clamp_min(0.0);
    let inter = iw * ih;
    let union = area_p + area_t - inter.clone() + 1e-7;
    let iou = inter / union.clone();
    let hw = px2.max_pair(tx2) - px1.min_pair(tx1);
    let hh = py2.max_pair(ty2) - py1.min_pair(ty1);
    let hull = hw * hh + 1e-7;
    let giou = iou.clone() - (hull.clone() - union) / hull;
    (iou, giou)
}

/// The parts of the detection loss for one batch, each a scalar tensor.
#[derive(Debug, Clone)]
pub struct DetectionLoss {
    pub total: Tensor<1>,
    pub cls: Tensor<1>,
    pub boxes: Tensor<1>,
    pub positives: usize,
    /// Each tracked box's disagreement with the model on this batch (boxes with an `id` that
    /// got positive locations): the mean over its locations of `(1 - IoU of the predicted
    /// box) + (1 - predicted probability of its class)`, in [0, 2].
    pub per_box: Vec<(u32, f32)>,
}

/// Loss of the head outputs against ground truth for the batch (boxes in input pixels).
pub fn detection_loss(
    output: &HeadOutput,
    gt: &[Vec<GtBox>],
    strides: &[usize],
    config: &LossConfig,
) -> DetectionLoss {
    let device = output.cls_logits.device();
    let [b, l, k] = output.cls_logits.dims();
    let targets = assign(gt, &output.level_sizes, strides, config);
    let points = location_centres(&output.level_sizes, strides);
    let positive: Vec<usize> = (0..b * l).filter(|&i| targets.class[i].is_some()).collect();
    let num_pos = positive.len();
    // Down-weighted boxes (noisy-label filtering) weigh their locations in both terms, and
    // the terms are normalised by the positives' total weight; all weights 1 is the plain loss.
    let positive_weights: Option<Vec<f32>> = positive
        .iter()
        .any(|&i| targets.owner[i].1 != 1.0)
        .then(|| positive.iter().map(|&i| targets.owner[i].1).collect());
    let weight_sum = positive_weights
        .as_ref()
        .map_or(num_pos as f64, |w| w.iter().map(|&v| v as f64).sum::<f64>())
        .max(1.0);

    let logits = output.cls_logits.clone().reshape([b * l, k]);
    // Soft class target: IoU of the (detached) predicted box at positives, 0 elsewhere.
    let mut score = vec![0f32; b * l * k];
    let (box_loss, ious) = if num_pos > 0 {
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                positive.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [num_pos],
            ),
            &device,
        );
        let ltrb = output.box_ltrb.clone().reshape([b * l, 4]).select(0, index);
        let mut centres = Vec::with_capacity(num_pos * 4);
        let mut target_boxes = Vec::with_capacity(num_pos * 4);
        for &i in &positive {
            let (x, y, _) = points[i % l];
            centres.extend_from_slice(&[x, y, x, y]);
            target_boxes.extend_from_slice(&targets.boxes[i]);
        }
        let centres = Tensor::<2>::from_data(TensorData::new(centres, [num_pos, 4]), &device);
        let sign = Tensor::<2>::from_data(
            TensorData::new(vec![-1f32, -1.0, 1.0, 1.0], [1, 4]),
            &device,
        );
        let pred_boxes = centres + ltrb * sign;
        let target_boxes =
            Tensor::<2>::from_data(TensorData::new(target_boxes, [num_pos, 4]), &device);
        let (iou, giou) = iou_giou(pred_boxes, target_boxes);
        let ious: Vec<f32> = iou
            .detach()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap_or_default();
        let per_location = giou.neg() + 1.0;
        let loss = match &positive_weights {
            None => per_location.sum() / num_pos as f64,
            Some(w) => {
                let w = Tensor::<1>::from_data(TensorData::new(w.clone(), [num_pos]), &device);
                (per_location * w).sum() / weight_sum
            }
        };
        (loss, ious)
    } else {
        (Tensor::zeros([1], &device), Vec::new())
    };
    for (n, &i) in positive.iter().enumerate() {
        if let Some(c) = targets.class[i] {
            score[i * k + c] = ious.get(n).copied().unwrap_or(0.0).max(0.0);
        }
    }
    // Each tracked box's disagreement: mean over its locations of (1 - IoU) + (1 - p(class)).
    let mut per_box = Vec::new();
    if num_pos > 0 && positive.iter().any(|&i| targets.owner[i].0.is_some()) {
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                positive.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [num_pos],
            ),
            &device,
        );
        let probs: Vec<f32> = sigmoid(logits.clone().detach().select(0, index))
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap_or_default();
        let mut sums: std::collections::BTreeMap<u32, (f32, usize)> = Default::default();
        for (n, &i) in positive.iter().enumerate() {
            if let (Some(id), Some(c)) = (targets.owner[i].0, targets.class[i]) {
                let miss = (1.0 - ious.get(n).copied().unwrap_or(0.0).max(0.0))
                    + (1.0 - probs.get(n * k + c).copied().unwrap_or(0.0));
                let e = sums.entry(id).or_default();
                e.0 += miss;
                e.1 += 1;
            }
        }
        per_box = sums
            .into_iter()
            .map(|(id, (sum, n))| (id, sum / n as f32))
            .collect();
    }
    let score = Tensor::<2>::from_data(TensorData::new(score, [b * l, k]), &device);
    let mut weights = (!config.class_weights.is_empty()).then(|| {
        let mut w = config.class_weights.clone();
        w.resize(k, 1.0);
        Tensor::<2>::from_data(TensorData::new(w, [1, k]), &device)
    });
    if positive_weights.is_some() {
        let rows: Vec<f32> = targets.owner.iter().map(|&(_, w)| w).collect();
        let rows = Tensor::<2>::from_data(TensorData::new(rows, [b * l, 1]), &device);
        weights = Some(match weights {
            Some(w) => rows * w,
            None => rows.repeat_dim(1, k),
        });
    }
    let cls_loss = quality_focal_loss(logits, score, config.qfl_beta, weights) / weight_sum;
    let total = cls_loss.clone() + box_loss.clone() * config.box_weight;
    DetectionLoss {
        total,
        cls: cls_loss,
        boxes: box_loss,
        positives: num_pos,
        per_box,
    }
}

/// The distillation terms of a student's head outputs against a teacher's on the same batch
/// (same locations and classes; the teacher's tensors carry no graph): the class term is the
/// quality focal loss of the student's logits with the teacher's probabilities as soft targets at
/// every location, divided by `normalizer` (the task loss's positives, so both terms weigh
/// alike); the box term is the GIoU loss between the two boxes at each location, weighed by the
/// teacher's top class probability where that is at least `min_weight`, a weighted mean.
/// Returns `(cls, boxes)`.
pub fn distillation_loss(
    student: &HeadOutput,
    teacher_probs: Tensor<3>,
    teacher_ltrb: Tensor<3>,
    normalizer: f64,
    beta: f64,
    min_weight: f32,
) -> (Tensor<1>, Tensor<1>) {
    let device = student.cls_logits.device();
    let [b, l, k] = student.cls_logits.dims();
    // Each location's box weight: the teacher's top class probability, 0 under `min_weight`.
    let top = teacher_probs.clone().max_dim(2).reshape([b * l]);
    let weights = top.clone().mask_fill(top.lower_elem(min_weight), 0.0);
    let cls = quality_focal_loss(
        student.cls_logits.clone().reshape([b * l, k]),
        teacher_probs.reshape([b * l, k]),
        beta,
        None,
    ) / normalizer.max(1.0);
    // GIoU does not depend on where the pair is, so both boxes sit on the origin: (-l, -t, r, b).
    let sign = Tensor::<2>::from_data(
        TensorData::new(vec![-1f32, -1.0, 1.0, 1.0], [1, 4]),
        &device,
    );
    let boxes = |ltrb: Tensor<3>| ltrb.reshape([b * l, 4]) * sign.clone();
    let (_, giou) = iou_giou(boxes(student.box_ltrb.clone()), boxes(teacher_ltrb));
    let total = weights.clone().sum().clamp_min(1e-6);
    let boxes = ((giou.neg() + 1.0) * weights).sum() / total;
    (cls, boxes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_data().try_into_vec_as::<f32>().unwrap()[0]
    }

    fn t1(values: &[f32]) -> Tensor<1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Device::flex(),
        )
    }

    #[test]
    fn focal_loss_hand_values() {
        // logit 0, target 1: p = 0.5, 0.25 * 0.5^2 * ln 2 = 0.0433217.
        let loss = scalar(sigmoid_focal_loss(t1(&[0.0]), t1(&[1.0]), 0.25, 2.0));
        assert!((loss - 0.043_321_7).abs() < 1e-6, "{loss}");
        // logit ln 3 (p = 0.75), target 0: 0.75 * 0.75^2 * ln 4 = 0.5848.
        let loss = scalar(sigmoid_focal_loss(t1(&[3f32.ln()]), t1(&[0.0]), 0.25, 2.0));
        assert!((loss - 0.75 * 0.5625 * 4f32.ln()).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn quality_focal_loss_hand_values() {
        // logit 0, soft target 0.8: BCE = ln 2, modulator |0.8 - 0.5|^2 = 0.09.
        let loss = scalar(quality_focal_loss(t1(&[0.0]), t1(&[0.8]), 2.0, None));
        assert!((loss - 0.09 * 2f32.ln()).abs() < 1e-6, "{loss}");
        // A perfect prediction costs nothing.
        let loss = scalar(quality_focal_loss(t1(&[-30.0]), t1(&[0.0]), 2.0, None));
        assert!(loss.abs() < 1e-9, "{loss}");
    }

    fn head(logits: Vec<f32>, ltrb: Vec<f32>, locations: usize, classes: usize) -> HeadOutput {
        let d = Device::flex();
        HeadOutput {
            cls_logits: Tensor::from_data(TensorData::new(logits, [1, locations, classes]), &d),
            box_ltrb: Tensor::from_data(TensorData::new(ltrb, [1, locations, 4]), &d),
            level_sizes: vec![[1, locations]],
        }
    }

    #[test]
    fn distillation_is_zero_at_the_teacher_and_grows_away_from_it() {
        let logits = vec![2.0f32, -3.0, -1.0, 0.5, -6.0, -6.0];
        let ltrb = vec![
            4.0f32, 5.0, 6.0, 7.0, 10.0, 2.0, 3.0, 9.0, 1.0, 1.0, 1.0, 1.0,
        ];
        let teacher = head(logits.clone(), ltrb.clone(), 3, 2);
        let probs = sigmoid(teacher.cls_logits.clone());
        let distill = |student: &HeadOutput, min_weight: f32| {
            let (c, b) = distillation_loss(
                student,
                probs.clone(),
                teacher.box_ltrb.clone(),
                2.0,
                2.0,
                min_weight,
            );
            (scalar(c), scalar(b))
        };
        let (c, b) = distill(&teacher, 0.05);
        assert!(c.abs() < 1e-7 && b.abs() < 1e-6, "{c} {b}");
        // Boxes 10% and 50% too wide, logits pushed off: both terms grow with the distance.
        let wider = |f: f32| ltrb.iter().map(|v| v * f).collect::<Vec<_>>();
        let off = |f: f32| logits.iter().map(|v| v + f).collect::<Vec<_>>();
        let (c1, b1) = distill(&head(off(0.5), wider(1.1), 3, 2), 0.05);
        let (c2, b2) = distill(&head(off(2.0), wider(1.5), 3, 2), 0.05);
        assert!(c1 > 1e-4 && c2 > c1, "{c1} {c2}");
        assert!(b1 > 1e-3 && b2 > b1, "{b1} {b2}");
        // Location 3 (teacher's top probability 0.0025) carries no box weight: changing its box
        // changes nothing; above every location's weight, the box term is zero.
        let mut far = ltrb.clone();
        far[8..].copy_from_slice(&[50.0, 50.0, 1.0, 1.0]);
        assert_eq!(distill(&head(logits.clone(), far, 3, 2), 0.05).1, 0.0);
        assert_eq!(distill(&head(off(1.0), wider(2.0), 3, 2), 0.99).1, 0.0);
    }

    #[test]
    fn giou_hand_values() {
        let d = Device::flex();
        let a = Tensor::<2>::from_data(
            TensorData::new(vec![0f32, 0., 2., 2., 0., 0., 2., 2.], [2, 4]),
            &d,
        );
        let b = Tensor::<2>::from_data(
            TensorData::new(vec![1f32, 1., 3., 3., 0., 0., 2., 2.], [2, 4]),
            &d,
        );
        let (iou, giou) = iou_giou(a, b);
        let iou = iou.into_data().try_into_vec_as::<f32>().unwrap();
        let giou = giou.into_data().try_into_vec_as::<f32>().unwrap();
        // Overlap 1, union 7, hull 9: IoU 1/7, GIoU 1/7 - 2/9.
        assert!((iou[0] - 1.0 / 7.0).abs() < 1e-6);
        assert!((giou[0] - (1.0 / 7.0 - 2.0 / 9.0)).abs() < 1e-6);
        assert!((iou[1] - 1.0).abs() < 1e-6 && (giou[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_box_at_weight_zero_is_ignored_and_tracked_boxes_report_their_disagreement() {
        let config = LossConfig::new();
        let sizes = vec![[8, 8], [4, 4], [2, 2]];
        let l = 64 + 16 + 4;
        let d = Device::flex();
        let output = HeadOutput {
            cls_logits: Tensor::from_data(
                TensorData::new(
                    (0..l * 2).map(|i| (i % 7) as f32 - 3.0).collect(),
                    [1, l, 2],
                ),
                &d,
            ),
            box_ltrb: Tensor::from_data(TensorData::new(vec![8f32; l * 4], [1, l, 4]), &d),
            level_sizes: sizes.clone(),
        };
        let gt = |x: f32, class_id, id, weight| GtBox {
            x1: x,
            y1: x,
            x2: x + 24.0,
            y2: x + 24.0,
            class_id,
            id,
            weight,
        };
        let (a, b) = (gt(4.0, 0, Some(0), 1.0), gt(36.0, 1, Some(1), 1.0));
        let loss = |boxes: Vec<GtBox>| detection_loss(&output, &[boxes], &[8, 16, 32], &config);
        let plain = loss(vec![GtBox { id: None, ..a }, GtBox { id: None, ..b }]);
        let tracked = loss(vec![a, b]);
        assert_eq!(scalar(plain.total.clone()), scalar(tracked.total));
        assert!(plain.per_box.is_empty());
        assert_eq!(
            tracked.per_box.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(tracked.per_box.iter().all(|p| p.1 > 0.0 && p.1 <= 2.0));
        // B at weight 0: the box term is A's alone; the class term loses B's locations, which
        // A alone would count as background.
        let ignored = loss(vec![a, GtBox { weight: 0.0, ..b }]);
        let alone = loss(vec![a]);
        assert!((scalar(ignored.boxes) - scalar(alone.boxes)).abs() < 1e-6);
        assert!(scalar(ignored.cls) < scalar(alone.cls));
        assert_eq!(
            ignored.per_box.len(),
            2,
            "a box set aside is still measured"
        );
    }

    #[test]
    fn assignment_uses_centre_and_level_ranges() {
        let config = LossConfig::new();
        // One 40x40 box centred at (52, 52) on a 3-level 64x64 input (strides 8, 16, 32).
        let gt = vec![vec![GtBox {
            x1: 32.0,
            y1: 32.0,
            x2: 72.0,
            y2: 72.0,
            class_id: 3,
            id: None,
            weight: 1.0,
        }]];
        let sizes = [[8, 8], [4, 4], [2, 2]];
        let t = assign(&gt, &sizes, &[8, 16, 32], &config);
        let positives: Vec<usize> = (0..t.class.len())
            .filter(|&i| t.class[i].is_some())
            .collect();
        // Level 0 centres within 12 px of 52: x, y in {44, 52, 60} -> 9 locations, all level 0
        // (reach <= 28 < 64).
        assert_eq!(positives.len(), 9, "{positives:?}");
        assert!(positives.iter().all(|&i| i < 64 && t.class[i] == Some(3)));
    }
}
