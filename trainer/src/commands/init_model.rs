//! `trainer init-model`: write an untrained detector (random weights), for pipeline tests and benchmarks.

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;
use edge_detector::Detector;

use super::swin_size;

#[derive(clap::Args)]
pub struct Args {
    /// Model file to write (SafeTensors).
    #[arg(long)]
    out: PathBuf,
    /// Backbone size: nano (tests), edge (the product), tiny (Swin-T).
    #[arg(long, default_value = "edge")]
    size: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args, device: &Device) -> Result<()> {
    let Args { out, size, seed } = args;

    use edge_detector::DetectorConfig;
    let mut config = DetectorConfig::edge_neu();
    config.backbone = swin_size(&size)?;
    device.seed(seed);
    let detector = Detector::new(config, device)?;
    detector.save(&out)?;
    use burn::module::Module;
    println!(
        "wrote {} ({} parameters)",
        out.display(),
        detector.model.num_params()
    );
    Ok(())
}
