//! Reports a person reads: evaluation as JSON and Markdown with precision-recall curves drawn
//! to PNG, and a run's loss / validation-mAP curves.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::eval::EvalReport;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The legend box both charts use.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))
}

fn register_font() {
    // Embedded, so charts render the same on a machine with no fonts installed.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn save_png(buffer: Vec<u8>, width: u32, height: u32, path: &Path) -> Result<()> {
    let image = image::RgbImage::from_raw(width, height, buffer).context("chart buffer size")?;
    image
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `report.json`, `report.md` and `pr_curves.png` into `dir`.
pub fn write(report: &EvalReport, dir: &Path, split: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    let mut md = format!(
        "# Evaluation ({split}, {} images)\n\n| metric | value |\n| --- | --- |\n| mAP@0.5 (VOC, all-point) | {:.4} |\n| mAP@[.5:.95] (COCO) | {:.4} |\n| AP@0.5 (COCO, 101-point) | {:.4} |\n\n| class | ground truth | predictions | AP@0.5 | AP@[.5:.95] |\n| --- | --- | --- | --- | --- |\n",
        report.images, report.map50, report.map50_95, report.coco_ap50
    );
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    for c in &report.classes {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            c.name,
            c.ground_truth,
            c.predictions,
            fmt(c.ap50),
            fmt(c.ap50_95)
        ));
    }
    md.push_str("\n![precision-recall curves at IoU 0.5](pr_curves.png)\n");
    std::fs::write(dir.join("report.md"), md)?;
    plot_pr_curves(report, &dir.join("pr_curves.png"))
}

fn plot_pr_curves(report: &EvalReport, path: &Path) -> Result<()> {
    register_font();
    let (w, h) = (900u32, 650u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Precision-recall at IoU 0.5 (mAP {:.3})", report.map50),
                ("sans-serif", 24),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc("recall")
            .y_desc("precision")
            .label_style(("sans-serif", 16))
            .draw()?;
        for (i, c) in report.classes.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = c
                .recall
                .iter()
                .copied()
                .zip(c.precision.iter().copied())
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!(
                    "{} (AP {})",
                    c.name,
                    c.ap50
                        .map(|v| format!("{v:.3}"))
                        .unwrap_or_else(|| "-".into())
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        root.present()?;
    }
    save_png(buffer, w, h, path)
}

/// Training loss per step and a validation metric per evaluation (`metric`: its key in the
/// run's `metrics.jsonl`, e.g. `val_map50`; `label`: how the plot names it).
pub fn plot_training_curves(metrics: &Path, path: &Path, metric: &str, label: &str) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut loss: Vec<(f64, f64)> = Vec::new();
    let mut map: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            loss.push((step, l));
        }
        if let Some(m) = v[metric].as_f64() {
            map.push((step, m));
        }
    }
    if loss.is_empty() {
        return Ok(());
    }
    // A running mean over 20 steps makes the trend readable.
    let smoothed: Vec<(f64, f64)> = (0..loss.len())
        .map(|i| {
            let lo = i.saturating_sub(19);
            (
                loss[i].0,
                loss[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64,
            )
        })
        .collect();
    register_font();
    let (w, h) = (900u32, 500u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_step = loss.last().map(|p| p.0).unwrap_or(1.0).max(1.0);
        let max_loss = smoothed
            .iter()
            .map(|p| p.1)
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Training loss (20-step mean) and {label}"),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .right_y_label_area_size(55)
            .build_cartesian_2d(0f64..max_step, 0f64..max_loss)?
            .set_secondary_coord(0f64..max_step, 0f64..1f64);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 16))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc(label)
            .label_style(("sans-serif", 16))
            .draw()?;
        chart
            .draw_series(LineSeries::new(smoothed, COLORS[0].stroke_width(2)))?
            .label("loss")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], COLORS[0].stroke_width(2))
            });
        chart
            .draw_secondary_series(LineSeries::new(map.clone(), COLORS[1].stroke_width(2)))?
            .label(label)
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], COLORS[1].stroke_width(2))
            });
        chart.draw_secondary_series(map.iter().map(|&p| Circle::new(p, 4, COLORS[1].filled())))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
        root.present()?;
    }
    save_png(buffer, w, h, path)
}
