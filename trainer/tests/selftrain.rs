//! Self-training and noisy-label filtering on generated data, as a user runs them: the rounds'
//! folders and pseudo-labels, the unlabeled pool kept apart from labeled and validation images,
//! resume of a finished run, and the boxes set aside by `--noisy-labels`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use edge_detector::{NEU_CLASSES, SwinConfig};
use trainer::data::augment::AugmentConfig;
use trainer::finetune::{FinetuneConfig, load_splits};
use trainer::noisy::NoisyLabelConfig;
use trainer::selftrain::{PseudoLabels, RoundSummary, SelfTrainConfig, Unlabeled};

fn classes() -> Vec<String> {
    NEU_CLASSES.iter().map(|s| s.to_string()).collect()
}

fn small_config(data: &Path) -> FinetuneConfig {
    let mut config = FinetuneConfig::new(data.to_path_buf());
    config.backbone = SwinConfig::nano();
    config.input_size = 96;
    config.batch_size = 4;
    config.epochs = 2;
    config.lr = 2e-3;
    config.warmup_epochs = 0.5;
    config.eval_every = 100;
    config.augment = AugmentConfig::none();
    config
}

fn stems(samples: &[trainer::data::Sample]) -> Vec<String> {
    samples.iter().map(|s| s.stem.clone()).collect()
}

fn stem_of(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

#[test]
fn self_training_labels_the_rest_of_the_split_and_trains_on_it_in_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    trainer::data::synth::write_dataset(&data, &classes(), 6, 0, 5).unwrap();
    let mut config = small_config(&data);
    config.shots = Some(2);
    config.seed = 1;
    let st = SelfTrainConfig {
        unlabeled: Unlabeled::Rest,
        rounds: 1,
        // An all but untrained model scores near its prior (0.01): keep what it finds.
        threshold: 0.002,
        ignore_threshold: Some(0.001),
        steps: Some(2),
        labeled_share: 0.5,
    };
    let out = dir.path().join("run");
    let device = Device::flex();
    let stop = Arc::new(AtomicBool::new(false));
    let outcome =
        trainer::selftrain::run(&config, &st, &out, &device, false, stop.clone()).unwrap();
    assert!(!outcome.stopped);
    assert_eq!(outcome.rounds.len(), 2);
    assert_eq!(outcome.rounds[0].pseudo_images, 0);
    assert!(out.join("model.safetensors").exists());
    let saved: Vec<RoundSummary> =
        serde_json::from_slice(&std::fs::read(out.join("rounds.json")).unwrap()).unwrap();
    assert_eq!(saved.len(), 2);

    // The pool is the training split less the shots: never a labeled or validation image.
    let (labeled, val, _) = load_splits(&config, &classes()).unwrap();
    let labels = PseudoLabels::read(&out.join("round-1/pseudo-labels.json")).unwrap();
    assert_eq!(labels.pool, 36 - val.len() - labeled.len());
    assert!(!labels.images.is_empty());
    // Unsure boxes (between the two thresholds) are regions to ignore, and never all an image has.
    for image in &labels.images {
        assert!(image.boxes.iter().any(|b| !b.ignore));
        for b in &image.boxes {
            assert_eq!(b.ignore, b.score < 0.002, "{b:?}");
            assert!(b.score >= 0.001);
        }
    }
    for image in &labels.images {
        let stem = stem_of(&image.path);
        assert!(
            !stems(&labeled).contains(&stem) && !stems(&val).contains(&stem),
            "{stem} is labeled or held out"
        );
    }
    let round1 = &outcome.rounds[1];
    assert_eq!(round1.pseudo_images, labels.images.len());
    assert_eq!(round1.steps, 2);
    assert!(
        !round1.quality.is_empty(),
        "the rest of a labeled split has labels to compare"
    );
    // Round 1 trained on the labeled images, repeated, and the pseudo-labeled ones.
    let round_config: FinetuneConfig =
        serde_json::from_slice(&std::fs::read(out.join("round-1/config.json")).unwrap()).unwrap();
    assert_eq!(
        round_config.init,
        Some(out.join("round-0/model.safetensors"))
    );
    assert_eq!(round_config.max_steps, Some(2));
    let (train, _, _) = load_splits(&round_config, &classes()).unwrap();
    assert_eq!(
        train.len(),
        labeled.len() * round1.labeled_repeats + labels.images.len()
    );

    // A finished run resumes as a no-op; without --resume its folder is refused.
    let steps_logged = std::fs::read_to_string(out.join("round-1/metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    let again = trainer::selftrain::run(&config, &st, &out, &device, true, stop.clone()).unwrap();
    assert_eq!(again.rounds.len(), 2);
    assert_eq!(
        std::fs::read_to_string(out.join("round-1/metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        steps_logged
    );
    let e = trainer::selftrain::run(&config, &st, &out, &device, false, stop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn a_folder_pool_leaves_out_held_out_names_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    trainer::data::synth::write_dataset(&data, &classes(), 3, 0, 6).unwrap();
    let mut config = small_config(&data);
    config.shots = Some(1);
    let (_, val, _) = load_splits(&config, &classes()).unwrap();
    // A camera's folder: two new frames, a copy of a validation image, a broken file.
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let other = dir.path().join("other");
    trainer::data::synth::write_dataset(&other, &classes(), 1, 0, 7).unwrap();
    let mut new: Vec<PathBuf> = std::fs::read_dir(other.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    new.sort();
    for (i, path) in new.iter().take(2).enumerate() {
        std::fs::copy(path, frames.join(format!("frame_{i}.jpg"))).unwrap();
    }
    std::fs::copy(
        &val[0].image_path,
        frames.join(val[0].image_path.file_name().unwrap()),
    )
    .unwrap();
    std::fs::write(frames.join("broken.jpg"), b"not a jpeg").unwrap();

    let (pool, notes) =
        trainer::selftrain::unlabeled_pool(&config, &Unlabeled::Folder(frames.clone()), &classes())
            .unwrap();
    assert_eq!(stems(&pool), vec!["frame_0", "frame_1"]);
    assert!(pool.iter().all(|s| s.objects.is_empty()));
    assert!(notes.iter().any(|n| n.contains("broken.jpg")), "{notes:?}");
    assert!(
        notes.iter().any(|n| n.contains("1 images share a name")),
        "{notes:?}"
    );
    // `rest` needs shots; an empty folder is an error naming the source.
    config.shots = None;
    let e = trainer::selftrain::unlabeled_pool(&config, &Unlabeled::Rest, &classes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--shots"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = trainer::selftrain::unlabeled_pool(&config, &Unlabeled::Folder(empty), &classes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no images"), "{e}");
}

#[test]
fn noisy_label_filtering_sets_boxes_aside_and_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean");
    trainer::data::synth::write_dataset(&clean, &classes(), 4, 0, 8).unwrap();
    // A corrupted copy reads back with exactly the labels it was written with.
    let dataset = trainer::data::voc::load(&clean, &classes()).unwrap();
    let (samples, changes) = trainer::noisy::corrupt(&dataset, 0.2, 42, 0.5, 3);
    assert!(!changes.is_empty());
    let noisy = dir.path().join("noisy");
    trainer::noisy::write_voc(&samples, &classes(), &noisy).unwrap();
    let back = trainer::data::voc::load(&noisy, &classes()).unwrap();
    assert_eq!(back.samples.len(), samples.len());
    for (a, b) in back.samples.iter().zip(&samples) {
        assert_eq!(a.stem, b.stem);
        let rounded = |s: &trainer::data::Sample| {
            s.objects
                .iter()
                .map(|o| (o.class_id, o.bbox.map(|v| v.round() as i64)))
                .collect::<Vec<_>>()
        };
        assert_eq!(rounded(a), rounded(b), "{}", a.stem);
    }

    let mut config = small_config(&noisy);
    config.noisy_labels = Some(NoisyLabelConfig {
        share: 0.5,
        warmup_epochs: 1,
        weight: 0.0,
    });
    let out = dir.path().join("run");
    trainer::finetune::run(
        &config,
        &out,
        &Device::flex(),
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("noisy-labels.json")).unwrap()).unwrap();
    let (train, _, _) = load_splits(&config, &classes()).unwrap();
    let boxes: usize = train.iter().map(|s| s.objects.len()).sum();
    // Half of each class's boxes seen in epoch 1 (rounded per class): about half of all.
    assert!(
        listed.len() * 3 >= boxes && listed.len() * 3 <= boxes * 2,
        "{} of {boxes}",
        listed.len()
    );
    for entry in &listed {
        let stem = stem_of(Path::new(entry["image"].as_str().unwrap()));
        assert!(
            stems(&train).contains(&stem),
            "{stem} is not a training image"
        );
        assert!(entry["disagreement"].as_f64().unwrap() > 0.0);
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let set_aside: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["set_aside"].as_u64())
        .collect();
    assert_eq!(set_aside.first(), Some(&0), "none in the warm-up epoch");
    assert_eq!(set_aside.last(), Some(&(listed.len() as u64)));
    assert!(out.join("checkpoint/noisy.json").exists());
}
