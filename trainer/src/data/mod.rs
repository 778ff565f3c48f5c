//! Data: VOC/NEU-DET loading, the synthetic NEU-style generator, splits and k-shot sampling,
//! augmentation with box handling, and batch loading that keeps training fed.

pub mod augment;
pub mod loader;
pub mod mixers;
pub mod synth;
pub mod voc;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

pub use voc::{DataError, Dataset, Object, Sample};

/// The image-level group of a sample for stratified splitting: its NEU file-name class when it
/// has one, else the class of its first box.
fn group_of(sample: &Sample, classes: &[String]) -> usize {
    sample
        .name_class(classes)
        .or_else(|| sample.objects.first().map(|o| o.class_id))
        .unwrap_or(classes.len())
}

/// Splits into (train, validation), stratified by image-level class, deterministic for a seed
/// whatever order the files were listed in.
pub fn split(dataset: &Dataset, val_fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let mut by_group: Vec<Vec<Sample>> = vec![Vec::new(); dataset.classes.len() + 1];
    let mut samples = dataset.samples.clone();
    samples.sort_by(|a, b| a.stem.cmp(&b.stem));
    for s in samples {
        by_group[group_of(&s, &dataset.classes)].push(s);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut group in by_group {
        group.shuffle(&mut rng);
        let n_val = (group.len() as f64 * val_fraction).round() as usize;
        val.extend(group.drain(..n_val));
        train.extend(group);
    }
    (train, val)
}

/// `k` images per class (an image counts for every class it has a box of), drawn with `seed`;
/// an image is used once. Fewer than `k` when a class has fewer images. When the set has
/// defect-free images (no boxes), `k` of them come too: a model that decides pass/fail must see
/// clean surface, or it learns that every image has a defect.
pub fn k_shot(samples: &[Sample], num_classes: usize, k: usize, seed: u64) -> Vec<Sample> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by(|&a, &b| samples[a].stem.cmp(&samples[b].stem));
    order.shuffle(&mut rng);
    let mut taken = vec![false; samples.len()];
    let mut chosen = Vec::new();
    for class in 0..num_classes {
        let mut count = 0;
        for &i in &order {
            if count == k {
                break;
            }
            if !taken[i] && samples[i].objects.iter().any(|o| o.class_id == class) {
                taken[i] = true;
                chosen.push(samples[i].clone());
                count += 1;
            }
        }
    }
    chosen.extend(
        order
            .iter()
            .filter(|&&i| samples[i].objects.is_empty())
            .take(k)
            .map(|&i| samples[i].clone()),
    );
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sample(stem: &str, class_id: usize) -> Sample {
        Sample {
            stem: stem.into(),
            image_path: PathBuf::from(format!("{stem}.jpg")),
            width: 10,
            height: 10,
            objects: vec![Object {
                class_id,
                bbox: [0.0, 0.0, 5.0, 5.0],
                difficult: false,
                id: None,
                ignore: false,
            }],
        }
    }

    fn dataset() -> Dataset {
        let classes = vec!["a".to_string(), "b".to_string()];
        let mut samples: Vec<Sample> = (0..20).map(|i| sample(&format!("a_{i}"), 0)).collect();
        samples.extend((0..10).map(|i| sample(&format!("b_{i}"), 1)));
        Dataset {
            root: PathBuf::new(),
            classes,
            samples,
            warnings: vec![],
        }
    }

    #[test]
    fn split_is_stratified_and_order_independent() {
        let d = dataset();
        let (train, val) = split(&d, 0.2, 7);
        assert_eq!((train.len(), val.len()), (24, 6));
        assert_eq!(val.iter().filter(|s| s.stem.starts_with("a_")).count(), 4);
        let mut reversed = d.clone();
        reversed.samples.reverse();
        let (_, val2) = split(&reversed, 0.2, 7);
        assert_eq!(val, val2);
        let (_, val3) = split(&d, 0.2, 8);
        assert_ne!(val, val3, "another seed, another split");
    }

    #[test]
    fn k_shot_takes_k_per_class_without_repeats() {
        let d = dataset();
        let chosen = k_shot(&d.samples, 2, 3, 1);
        assert_eq!(chosen.len(), 6);
        assert_eq!(
            chosen.iter().filter(|s| s.objects[0].class_id == 1).count(),
            3
        );
        assert_eq!(k_shot(&d.samples, 2, 3, 1), chosen, "deterministic");
        assert_eq!(
            k_shot(&d.samples, 2, 15, 1).len(),
            25,
            "class b has only 10"
        );
    }
}
