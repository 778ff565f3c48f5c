//! `trainer corrupt-labels`: a copy of a VOC folder with a share of its training split's boxes
//! made wrong (class or place), and the list of what was changed: a test bed for
//! `finetune --noisy-labels`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct Args {
    /// Dataset folder with images/ and annotations/.
    #[arg(long)]
    data: PathBuf,
    /// Output folder (images/ as hard links, annotations/, corruptions.json).
    #[arg(long)]
    out: PathBuf,
    /// Share of the training split's boxes made wrong (half by class, half by place).
    #[arg(long, default_value_t = 0.2)]
    rate: f64,
    /// Seed of which boxes and how.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The split to keep clean, as `finetune` draws it.
    #[arg(long, default_value_t = 42)]
    split_seed: u64,
    /// Fraction of images held out for validation, per class, as `finetune` holds them out.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
}

pub fn run(args: Args) -> Result<()> {
    if !(0.0..=1.0).contains(&args.rate) {
        bail!("--rate {}: give a share in [0, 1]", args.rate);
    }
    if args.out.join("annotations").exists() {
        bail!(
            "{} already holds a dataset: choose another --out",
            args.out.display()
        );
    }
    let classes: Vec<String> = edge_detector::NEU_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dataset = crate::data::voc::load(&args.data, &classes)
        .with_context(|| format!("loading {}", args.data.display()))?;
    let (samples, changes) = crate::noisy::corrupt(
        &dataset,
        args.val_fraction,
        args.split_seed,
        args.rate,
        args.seed,
    );
    crate::noisy::write_voc(&samples, &classes, &args.out)?;
    let list = args.out.join("corruptions.json");
    std::fs::write(&list, serde_json::to_vec_pretty(&changes)?)
        .with_context(|| format!("writing {}", list.display()))?;
    let boxes: usize = samples.iter().map(|s| s.objects.len()).sum();
    println!(
        "wrote {} images ({boxes} boxes) to {}: {} training boxes made wrong ({} by class, {} by place), listed in {}",
        samples.len(),
        args.out.display(),
        changes.len(),
        changes.iter().filter(|c| c.kind == "class").count(),
        changes.iter().filter(|c| c.kind == "place").count(),
        list.display()
    );
    Ok(())
}
