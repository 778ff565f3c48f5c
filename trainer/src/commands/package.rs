//! `trainer package`: sign a model into a package for the fleet (manifest, golden samples, weights).

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (SafeTensors written by `trainer finetune`).
    #[arg(long)]
    model: PathBuf,
    /// Secret key from `trainer keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Package version: devices only accept versions newer than their active one.
    #[arg(long)]
    version: u64,
    /// Model name in the manifest.
    #[arg(long, default_value = "neu-edge")]
    id: String,
    /// Golden images (repeat the flag): the device must reproduce their detections before
    /// it switches to the model.
    #[arg(long, required = true)]
    golden: Vec<PathBuf>,
    /// report.json from `trainer eval` or a run: its mAP goes into the manifest.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Oldest edge release that may run it.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    min_edge_version: String,
    /// Detections scoring at least this are part of the golden expectations.
    #[arg(long, default_value_t = 0.3)]
    golden_min_score: f32,
    /// Package file to write (.edgepkg).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let Args {
        model,
        key,
        version,
        id,
        golden,
        metrics,
        min_edge_version,
        golden_min_score,
        out,
    } = args;

    let key = protocol::package::read_signing_key(&key)?;
    let spec = crate::package::PackageSpec {
        id,
        version,
        golden,
        tolerance: protocol::package::GoldenTolerance {
            min_score: golden_min_score,
            ..Default::default()
        },
        metrics: match metrics {
            Some(p) => crate::package::metrics_from_report(&p)?,
            None => Default::default(),
        },
        min_edge_version,
    };
    let package = crate::package::build(&model, &spec, &key, device)?;
    package.write(&out)?;
    println!(
        "wrote {} (v{version}, {} bytes, {} golden sample(s))",
        out.display(),
        package.to_bytes().len(),
        spec.golden.len()
    );
    Ok(())
}
