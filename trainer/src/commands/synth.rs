//! `trainer synth`: write a synthetic NEU-DET-style dataset (JPEG + VOC XML, NEU layout).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (gets images/ and annotations/).
    #[arg(long)]
    out: PathBuf,
    /// Images per class (six classes).
    #[arg(long, default_value_t = 50)]
    per_class: usize,
    /// Defect-free images besides (`clean_N`, no objects): a detector that judges pass/fail
    /// needs to see clean steel.
    #[arg(long, default_value_t = 0)]
    clean: usize,
    /// Seed of the procedural textures and defects (same seed, same images).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        out,
        per_class,
        clean,
        seed,
    } = args;

    let classes: Vec<String> = edge_detector::NEU_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let n = crate::data::synth::write_dataset(&out, &classes, per_class, clean, seed)?;
    println!("wrote {n} images to {}", out.display());
    Ok(())
}
