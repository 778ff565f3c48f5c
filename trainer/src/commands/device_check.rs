//! `trainer device-check`: does this device compute what the CPU computes, and how fast? The
//! backbone against timm's reference outputs (a parity fixture), a model's detections and
//! pass/fail verdicts on images against the same model on the CPU backend, and the model's
//! frames per second at several batch sizes (latency percentiles at batch 1). Run it with
//! `--device cuda` (or wgpu) on a new box before trusting it with a line; on the CPU it checks
//! itself, which is how it is tested.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use edge_detector::nms::box_iou;
use edge_detector::{AttentionImpl, Detection, Detector, ImageView};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// Model whose detections are compared with the CPU's (file or package).
    #[arg(long)]
    model: PathBuf,
    /// Folder of JPEG/PNG/BMP images to detect on (the first --max-images, sorted by name).
    #[arg(long)]
    images: PathBuf,
    /// Images compared with the CPU.
    #[arg(long, default_value_t = 32)]
    max_images: usize,
    /// A detection at or above this score fails a frame (the verdict compared with the CPU's).
    #[arg(long, default_value_t = 0.3)]
    verdict_score: f32,
    /// A timm parity fixture folder (scripts/fixtures/make_swin_fixture.py), e.g.
    /// edge/detector/tests/fixtures/swin_small.
    #[arg(long)]
    timm_fixture: Option<PathBuf>,
    /// More models to time besides --model (repeat the flag).
    #[arg(long)]
    speed_model: Vec<PathBuf>,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Timed calls per batch size (after 3 warm-up calls).
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// JSON report to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let cpu = Device::flex();
    let mut report = serde_json::Map::new();
    report.insert("device".into(), json!(format!("{device:?}")));

    if let Some(dir) = &args.timm_fixture {
        for attention in [AttentionImpl::Fused, AttentionImpl::Explicit] {
            let diffs = edge_detector::parity::timm_parity(dir, device, attention)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("parity fixture {}", dir.display()))?;
            let worst = diffs.iter().map(|d| d.1).fold(0f32, f32::max);
            println!("timm parity ({attention:?} attention): max |diff| {worst:.2e} {diffs:?}");
            report.insert(
                format!("timm_parity_{attention:?}").to_lowercase(),
                json!({"max_abs_diff": worst, "by_output": diffs}),
            );
        }
    }

    let images = read_images(&args.images, args.max_images)?;
    let views: Vec<ImageView> = images.iter().map(ImageView::grey).collect();
    let on_device = Detector::load(&args.model, device)?;
    let on_cpu = Detector::load(&args.model, &cpu)?;
    let (ours, reference) = (
        detect_each(&on_device, &views)?,
        detect_each(&on_cpu, &views)?,
    );
    let comparison = compare(&ours, &reference, args.verdict_score);
    println!(
        "{}: {}/{} verdicts as on the CPU, {} boxes unmatched, max score difference {:.2e}",
        args.model.display(),
        comparison.same_verdicts,
        views.len(),
        comparison.unmatched,
        comparison.max_score_diff
    );
    report.insert(
        "detections".into(),
        json!({"model": args.model, "images": views.len(), "same_verdicts": comparison.same_verdicts,
            "unmatched_boxes": comparison.unmatched, "max_score_diff": comparison.max_score_diff,
            "verdict_score": args.verdict_score}),
    );

    let mut speed = vec![];
    for path in std::iter::once(&args.model).chain(&args.speed_model) {
        let detector = Detector::load(path, device)?;
        for &batch in &args.batches {
            let batch_views: Vec<ImageView> = views.iter().cycle().take(batch).copied().collect();
            let timing = time_batches(&detector, &batch_views, args.iterations)?;
            println!(
                "{} batch {batch}: {:.1} frames/s, per call p50 {:.2} ms, p99 {:.2} ms",
                path.display(),
                timing.frames_per_s,
                timing.p50_ms,
                timing.p99_ms
            );
            speed.push(
                json!({"model": path, "batch": batch, "frames_per_s": timing.frames_per_s,
                "p50_ms": timing.p50_ms, "p99_ms": timing.p99_ms, "calls": args.iterations}),
            );
        }
    }
    report.insert("speed".into(), json!(speed));
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("report: {}", args.out.display());
    Ok(())
}

fn read_images(dir: &Path, max: usize) -> Result<Vec<image::GrayImage>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["jpg", "jpeg", "png", "bmp"].contains(&e.to_lowercase().as_str()))
        })
        .collect();
    files.sort();
    files.truncate(max);
    if files.is_empty() {
        bail!("{}: no JPEG/PNG/BMP images", dir.display());
    }
    files
        .iter()
        .map(|p| {
            Ok(image::open(p)
                .with_context(|| format!("decoding {}", p.display()))?
                .into_luma8())
        })
        .collect()
}

/// One image at a time, as a frame of the line would be.
fn detect_each(detector: &Detector, views: &[ImageView]) -> Result<Vec<Vec<Detection>>> {
    views
        .iter()
        .map(|v| Ok(detector.detect(std::slice::from_ref(v))?.remove(0)))
        .collect()
}

struct Comparison {
    same_verdicts: usize,
    /// Boxes at or above the verdict score on one side with no same-class box of IoU >= 0.5 on
    /// the other.
    unmatched: usize,
    max_score_diff: f32,
}

fn compare(ours: &[Vec<Detection>], reference: &[Vec<Detection>], score: f32) -> Comparison {
    let mut c = Comparison {
        same_verdicts: 0,
        unmatched: 0,
        max_score_diff: 0.0,
    };
    let corners = |d: &Detection| [d.x1, d.y1, d.x2, d.y2];
    for (a, b) in ours.iter().zip(reference) {
        let fails = |dets: &[Detection]| dets.iter().any(|d| d.score >= score);
        c.same_verdicts += (fails(a) == fails(b)) as usize;
        for (x, ys) in [(a, b), (b, a)] {
            for d in x.iter().filter(|d| d.score >= score) {
                let best = ys
                    .iter()
                    .filter(|e| e.class_id == d.class_id && box_iou(corners(d), corners(e)) >= 0.5)
                    .map(|e| (e.score - d.score).abs())
                    .fold(f32::INFINITY, f32::min);
                if best.is_finite() {
                    c.max_score_diff = c.max_score_diff.max(best);
                } else {
                    c.unmatched += 1;
                }
            }
        }
    }
    c
}

struct Timing {
    frames_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn time_batches(detector: &Detector, views: &[ImageView], iterations: usize) -> Result<Timing> {
    for _ in 0..3 {
        detector.detect(views)?;
    }
    let mut ms = Vec::with_capacity(iterations);
    let started = Instant::now();
    for _ in 0..iterations.max(1) {
        let t = Instant::now();
        detector.detect(views)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total = started.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Ok(Timing {
        frames_per_s: (views.len() * ms.len()) as f64 / total,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class_id: usize, score: f32, x: f32) -> Detection {
        Detection {
            x1: x,
            y1: 0.0,
            x2: x + 10.0,
            y2: 10.0,
            class_id,
            score,
        }
    }

    #[test]
    fn comparison_counts_verdicts_unmatched_boxes_and_score_drift() {
        let ours = vec![vec![det(0, 0.9, 0.0)], vec![det(1, 0.5, 0.0)], vec![]];
        let cpu = vec![vec![det(0, 0.88, 1.0)], vec![], vec![det(2, 0.1, 0.0)]];
        let c = compare(&ours, &cpu, 0.3);
        assert_eq!(c.same_verdicts, 2);
        assert_eq!(c.unmatched, 1);
        assert!((c.max_score_diff - 0.02).abs() < 1e-6);
    }
}
