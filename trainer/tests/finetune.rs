//! Fine-tuning on generated data, as a user runs it: the loss falls on a small set the model
//! can fit, a stopped run resumes where it stopped, and the run folder holds what it promises.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use edge_detector::{NEU_CLASSES, SwinConfig};
use trainer::data::augment::AugmentConfig;
use trainer::finetune::{FinetuneConfig, run};
use trainer::precision::Precision;

fn small_config(data: &std::path::Path) -> FinetuneConfig {
    let mut config = FinetuneConfig::new(data.to_path_buf());
    config.backbone = SwinConfig::nano();
    config.input_size = 96;
    config.batch_size = 4;
    config.epochs = 25;
    config.lr = 2e-3;
    config.warmup_epochs = 0.5;
    config.eval_every = 100;
    config.augment = AugmentConfig::none();
    config
}

/// SimCLR on 18 images: 3 steps an epoch, 2 epochs.
fn nano_pretraining(data: &std::path::Path) -> trainer::simclr::PretrainConfig {
    let mut config = trainer::simclr::PretrainConfig::new(data.to_path_buf());
    config.backbone = SwinConfig::nano();
    config.input_size = 64;
    config.batch_size = 6;
    config.epochs = 2;
    config.knn_k = 3;
    config
}

/// Both runs logged `steps` losses, step by step equal to 1e-4 (relative).
fn assert_same_losses(
    straight: &std::path::Path,
    resumed: &std::path::Path,
    steps: usize,
    why: &str,
) {
    let a = losses(straight);
    let b = losses(resumed);
    assert_eq!(a.len(), steps, "{why}");
    assert_eq!(
        a.iter().map(|p| p.0).collect::<Vec<_>>(),
        b.iter().map(|p| p.0).collect::<Vec<_>>()
    );
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1.0),
            "step {step}: straight run loss {x:.6}, stopped-and-resumed run {y:.6}\nstraight {a:?}\nresumed {b:?}"
        );
    }
}

/// burn's random draws (initial weights, dropout) come from one seeded generator per process:
/// tests that train hold this lock so that a concurrent test's draws do not interleave with theirs
/// (the resume test compares two runs of the same seed step by step).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One fine-tuning run to its end (no Ctrl-C), into `out`.
fn train_to_end(config: &FinetuneConfig, out: &std::path::Path) {
    run(
        config,
        out,
        &Device::flex(),
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
}

fn losses(run_dir: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

#[test]
fn loss_falls_and_a_stopped_run_resumes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    trainer::data::synth::write_dataset(&data, &classes, 4, 0, 1).unwrap();
    let config = small_config(&data);
    let run_dir = dir.path().join("run");
    let device = Device::flex();

    // Ctrl-C before the first step: one step runs, then a checkpoint is written.
    let outcome = run(
        &config,
        &run_dir,
        &device,
        false,
        Arc::new(AtomicBool::new(true)),
    )
    .unwrap();
    assert!(outcome.stopped);
    assert_eq!(outcome.state.step, 1);
    assert!(
        run_dir.join("checkpoint/state.json").exists()
            && run_dir.join("checkpoint/optim.bpk").exists()
            && run_dir.join("checkpoint/model.bpk").exists()
    );
    // A second start without --resume refuses to overwrite the run.
    let err = run(
        &config,
        &run_dir,
        &device,
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--resume"), "{err}");

    let outcome = run(
        &config,
        &run_dir,
        &device,
        true,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    assert!(!outcome.stopped && outcome.state.finished);
    let steps: Vec<u64> = losses(&run_dir).iter().map(|p| p.0).collect();
    let expected: Vec<u64> = (1..=outcome.state.step as u64).collect();
    assert_eq!(
        steps, expected,
        "every step logged once across the stop and the resume"
    );
    assert_eq!(
        outcome.state.step,
        25 * 4,
        "18 training images at batch 4: 4 steps an epoch"
    );

    let l = losses(&run_dir);
    // Means over the first and last two epochs (the weights are seeded, so this is repeatable).
    let first: f64 = l[..8].iter().map(|p| p.1).sum::<f64>() / 8.0;
    let last: f64 = l[l.len() - 8..].iter().map(|p| p.1).sum::<f64>() / 8.0;
    assert!(
        last < 0.85 * first,
        "loss should fall when fitting 18 images: first {first:.3}, last {last:.3}"
    );

    let report = outcome.last_report.expect("evaluated at the end");
    assert_eq!(report.images, 6, "one validation image per class");
    assert!(
        run_dir.join("model.safetensors").exists() && run_dir.join("best.safetensors").exists()
    );
}

#[test]
fn simclr_backbone_initialises_finetuning() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    trainer::data::synth::write_dataset(&data, &classes, 4, 0, 2).unwrap();
    let pre = nano_pretraining(&data);
    let run_dir = dir.path().join("simclr");
    let outcome = trainer::simclr::run(
        &pre,
        &run_dir,
        &Device::flex(),
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    assert_eq!(outcome.state.step, 2 * 3, "18 training images at batch 6");
    // kNN accuracy before training and after each epoch, in [0, 1].
    assert_eq!(outcome.state.knn.len(), 3);
    assert!(
        outcome
            .state
            .knn
            .iter()
            .all(|(_, a)| (0.0..=1.0).contains(a))
    );
    let backbone = run_dir.join("backbone.safetensors");
    assert!(backbone.exists());

    let mut config = small_config(&data);
    config.input_size = 64;
    config.epochs = 1;
    config.init = Some(backbone);
    let outcome = run(
        &config,
        &dir.path().join("ft"),
        &Device::flex(),
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    assert_eq!(outcome.state.step, 4);
}

/// A SimCLR backbone pretrained at 112 px has a 4x4 last stage, hence one 4x4 window and 7x7
/// relative-position tables; the detector at 224 px has 7x7 windows and 13x13 tables. Loading
/// resizes the tables (bicubic, per head, as timm does): a table constant per head stays that
/// constant, so the heads are not mixed up on the way.
#[test]
fn a_backbone_pretrained_at_another_size_loads_with_resized_position_tables() {
    let _serial = serial();
    let device = Device::flex();
    let mut small = SwinConfig::nano().with_img_size([112, 112]).init(&device);
    let last = small.layers.len() - 1;
    for block in &mut small.layers[last].blocks {
        let [len, heads] = block.attn.relative_position_bias_table.dims();
        assert_eq!(len, 49, "one 4x4 window: 7x7 offsets");
        let values: Vec<f32> = (0..len * heads).map(|i| (i % heads) as f32 + 0.5).collect();
        block.attn.relative_position_bias_table = burn::module::Param::from_tensor(
            Tensor::from_data(TensorData::new(values, [len, heads]), &device),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backbone.safetensors");
    trainer::simclr::save_backbone_timm(&small, &path).unwrap();

    let mut large = SwinConfig::nano().with_img_size([224, 224]).init(&device);
    large.load_timm(&path).unwrap();
    for block in &large.layers[last].blocks {
        let table = block.attn.relative_position_bias_table.val();
        let [len, heads] = table.dims();
        assert_eq!(len, 169, "7x7 windows: 13x13 offsets");
        let values = table.into_data().try_to_vec::<f32>().unwrap();
        for (i, v) in values.iter().enumerate() {
            let want = (i % heads) as f32 + 0.5;
            assert!(
                (v - want).abs() < 1e-4,
                "offset {} head {}: {v}, want {want}",
                i / heads,
                i % heads
            );
        }
    }
    // The stages whose windows agree load unchanged.
    let a = small.layers[0].blocks[0]
        .attn
        .relative_position_bias_table
        .val();
    let b = large.layers[0].blocks[0]
        .attn
        .relative_position_bias_table
        .val();
    assert_eq!(
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap()
    );
}

/// Every parameter of a new detector (and of the SimCLR model) takes part in training. Layers
/// whose weights were re-initialised with `Param::map` lost the gradient flag, so the Swin's
/// Linear layers (qkv, proj, MLP, merges) stayed at their random initial values in every run
/// that started from scratch, and in every SimCLR run.
#[test]
fn every_parameter_of_a_new_model_is_trained() {
    let _serial = serial();
    struct Frozen(usize, usize);
    impl burn::module::ModuleVisitor for Frozen {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            self.0 += 1;
            if !param.val().is_require_grad() {
                self.1 += 1;
            }
        }
    }
    let device = Device::flex().autodiff();
    let mut config = edge_detector::DetectorConfig::edge_neu();
    config.backbone = SwinConfig::nano();
    let detector = edge_detector::Detector::new(config, &device).unwrap();
    let mut frozen = Frozen(0, 0);
    burn::module::Module::visit(&detector.model, &mut frozen);
    assert!(frozen.0 > 50);
    assert_eq!(
        frozen.1, 0,
        "{} of {} detector parameters get no gradient",
        frozen.1, frozen.0
    );

    let data = tempfile::tempdir().unwrap();
    let mut pretrain = trainer::simclr::PretrainConfig::new(data.path().to_path_buf());
    pretrain.backbone = SwinConfig::nano();
    let model = trainer::simclr::SimclrModel::new(&pretrain, &device);
    let mut frozen = Frozen(0, 0);
    burn::module::Module::visit(&model, &mut frozen);
    assert_eq!(
        frozen.1, 0,
        "{} of {} SimCLR parameters get no gradient",
        frozen.1, frozen.0
    );
}

/// A run stopped after its first step and resumed takes the same later steps as a run that was
/// never stopped: the weights, the data position and AdamW's moments all come back. (Resuming
/// from the SafeTensors weights alone gave the parameters fresh ids, so AdamW restarted its
/// moments and the losses drifted by about 1% within two steps.)
#[test]
fn a_resumed_run_takes_the_same_steps_as_a_straight_run() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    trainer::data::synth::write_dataset(&data, &classes, 4, 0, 3).unwrap();
    let mut config = small_config(&data);
    config.epochs = 1;
    config.backbone.drop_path_rate = 0.0;
    let device = Device::flex();

    let straight = dir.path().join("straight");
    run(
        &config,
        &straight,
        &device,
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();

    let resumed = dir.path().join("resumed");
    let outcome = run(
        &config,
        &resumed,
        &device,
        false,
        Arc::new(AtomicBool::new(true)),
    )
    .unwrap();
    assert_eq!(outcome.state.step, 1);
    run(
        &config,
        &resumed,
        &device,
        true,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();

    assert_same_losses(
        &straight,
        &resumed,
        4,
        "18 training images at batch 4: 4 steps",
    );
}

/// The same for SimCLR pretraining, stopped in the middle of an epoch.
#[test]
fn a_resumed_pretraining_takes_the_same_steps_as_a_straight_one() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    trainer::data::synth::write_dataset(&data, &classes, 4, 0, 4).unwrap();
    let config = nano_pretraining(&data);
    let device = Device::flex();
    let pretrain = |dir: &std::path::Path, resume: bool, stop: bool| {
        trainer::simclr::run(
            &config,
            dir,
            &device,
            resume,
            Arc::new(AtomicBool::new(stop)),
        )
        .unwrap()
    };
    let straight = dir.path().join("straight");
    let full = pretrain(&straight, false, false);
    let resumed = dir.path().join("resumed");
    let first = pretrain(&resumed, false, true);
    assert!(first.stopped);
    assert_eq!(
        (first.state.step, first.state.epoch),
        (1, 0),
        "stopped in epoch 1"
    );
    let rest = pretrain(&resumed, true, false);
    assert_eq!(rest.state.step, full.state.step);
    assert_eq!(
        rest.state.knn.len(),
        full.state.knn.len(),
        "one kNN check per epoch"
    );

    assert_same_losses(
        &straight,
        &resumed,
        6,
        "18 training images at batch 6, 2 epochs",
    );
}

/// Largest absolute change of the `backbone.*` and of the other (neck, head) tensors between two
/// model files.
fn largest_changes(before: &std::path::Path, after: &std::path::Path) -> (f32, f32) {
    let a = std::fs::read(before).unwrap();
    let b = std::fs::read(after).unwrap();
    let a = safetensors::SafeTensors::deserialize(&a).unwrap();
    let b = safetensors::SafeTensors::deserialize(&b).unwrap();
    let (mut backbone, mut rest) = (0f32, 0f32);
    for (name, view) in a.tensors() {
        let other = b.tensor(&name).unwrap();
        let values = |data: &[u8]| -> Vec<f32> {
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let change = values(view.data())
            .iter()
            .zip(values(other.data()))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if name.starts_with("backbone.") {
            backbone = backbone.max(change);
        } else {
            rest = rest.max(change);
        }
    }
    (backbone, rest)
}

/// A synthetic set (4 images per class, seed 2) and a saved nano detector at 96 px to
/// start runs from: `(tempdir, data, start.safetensors)`.
fn data_and_start() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    trainer::data::synth::write_dataset(&data, &classes, 4, 0, 2).unwrap();
    let mut detector_config = edge_detector::DetectorConfig::edge_neu();
    detector_config.backbone = SwinConfig::nano().with_img_size([96, 96]);
    detector_config.preprocess.input_size = [96, 96];
    let start = dir.path().join("start.safetensors");
    edge_detector::Detector::new(detector_config, &Device::flex())
        .unwrap()
        .save(&start)
        .unwrap();
    (dir, data, start)
}

/// Trains `steps` steps from `start` (no warmup, `adjust` applied to the small config) into
/// `out` and returns [`largest_changes`] of its model against `start`.
fn changes_after_steps(
    data: &std::path::Path,
    start: &std::path::Path,
    out: &std::path::Path,
    steps: usize,
    adjust: impl Fn(&mut FinetuneConfig),
) -> (f32, f32) {
    let mut config = small_config(data);
    config.init = Some(start.to_path_buf());
    config.max_steps = Some(steps);
    config.warmup_epochs = 0.0;
    adjust(&mut config);
    train_to_end(&config, out);
    largest_changes(start, &out.join("model.safetensors"))
}

/// `backbone_lr_scale` slows the backbone alone: from the same start, two AdamW steps move the
/// backbone about scale x as far as an unscaled run does, and the neck and head as far.
#[test]
fn backbone_lr_scale_slows_the_backbone_only() {
    let _serial = serial();
    let (dir, data, start) = data_and_start();

    let train = |scale: f64, name: &str| {
        changes_after_steps(&data, &start, &dir.path().join(name), 2, |config| {
            config.backbone_lr_scale = scale;
        })
    };
    let (backbone_full, head_full) = train(1.0, "full");
    let (backbone_slow, head_slow) = train(0.01, "slow");
    assert!(backbone_full > 1e-3, "the backbone trains: {backbone_full}");
    assert!(
        backbone_slow < 0.05 * backbone_full,
        "backbone moved {backbone_slow} at scale 0.01, {backbone_full} at 1"
    );
    assert!(
        head_slow > 0.5 * head_full && head_slow < 2.0 * head_full,
        "head moved {head_slow} at scale 0.01, {head_full} at 1"
    );
}

/// `freeze_backbone_epochs`: while frozen, the backbone does not move at all (no gradient, no
/// weight decay) and the neck and head train; after the warm-up the backbone trains.
#[test]
fn a_frozen_backbone_stays_put_until_its_warm_up_ends() {
    let _serial = serial();
    let (dir, data, start) = data_and_start();

    // 18 training images at batch 4: 4 steps an epoch; the first epoch is the frozen one.
    let train = |steps: usize, name: &str| {
        changes_after_steps(&data, &start, &dir.path().join(name), steps, |config| {
            config.epochs = 2;
            config.freeze_backbone_epochs = 1;
            config.backbone_lr_scale = 0.5;
        })
    };
    let (backbone, head) = train(4, "warm-up");
    assert_eq!(backbone, 0.0, "the frozen backbone moved");
    assert!(
        head > 1e-3,
        "the head trains while the backbone is frozen: {head}"
    );
    let (backbone, _) = train(6, "after");
    assert!(
        backbone > 1e-4,
        "the backbone trains after its warm-up: {backbone}"
    );
}

/// Mixed precision: from the same weights, a bf16 run's losses follow the f32 run's, and what it
/// saves is f32.
#[test]
fn bf16_training_follows_f32_and_saves_f32() {
    let _serial = serial();
    // Both runs start from the same weights (burn initialises parameters lazily, in the order
    // they are first used, so a fresh model's draws depend on the first pass).
    let (dir, data, start) = data_and_start();
    let train = |precision: Precision| {
        let mut config = small_config(&data);
        config.init = Some(start.clone());
        config.lr = 1e-3;
        config.warmup_epochs = 0.0;
        // Three steps: AdamW's first updates are nearly sign(gradient), so runs in any two
        // precisions drift apart after a few steps; the first ones show whether bf16 computes
        // the same step.
        config.max_steps = Some(3);
        config.precision = precision;
        let out = dir.path().join(precision.name());
        train_to_end(&config, &out);
        out
    };
    let (f32_run, bf16_run) = (train(Precision::F32), train(Precision::Bf16));
    let loss_values =
        |run: &std::path::Path| -> Vec<f64> { losses(run).into_iter().map(|p| p.1).collect() };
    let (a, b) = (loss_values(&f32_run), loss_values(&bf16_run));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 0.02 * x.abs(),
            "step {}: f32 loss {x}, bf16 loss {y}\n{a:?}\n{b:?}",
            step + 1
        );
    }
    assert_ne!(a, b, "the bf16 run computed exactly like the f32 run");

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bf16_run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["precision"], "bf16");
    let bytes = std::fs::read(bf16_run.join("model.safetensors")).unwrap();
    let saved = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in saved.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }
    edge_detector::Detector::load(bf16_run.join("model.safetensors"), &Device::flex()).unwrap();
}

/// Distillation (`teacher`): every step logs the two distillation terms, and training on them
/// moves the student towards the teacher's outputs (both terms fall); a teacher that sees
/// another input size is refused with both sizes named.
#[test]
fn a_student_learns_its_teachers_outputs() {
    let _serial = serial();
    let (dir, data, start) = data_and_start();
    // The teacher: another nano detector at the same size (other weights) that scores every
    // location about 0.5 (the student starts at its prior, 0.01), so its boxes weigh too.
    let teacher = dir.path().join("teacher.safetensors");
    let mut teacher_config = edge_detector::DetectorConfig::edge_neu();
    teacher_config.backbone = SwinConfig::nano().with_img_size([96, 96]);
    teacher_config.preprocess.input_size = [96, 96];
    teacher_config.head.prior_prob = 0.5;
    let device = Device::flex();
    device.seed(7);
    edge_detector::Detector::new(teacher_config, &device)
        .unwrap()
        .save(&teacher)
        .unwrap();
    // The same 12 steps with and without the distillation terms in the loss.
    let terms = |weight: f64, name: &str| -> Vec<f64> {
        let out = dir.path().join(name);
        changes_after_steps(&data, &start, &out, 12, |config| {
            config.teacher = Some(teacher.clone());
            config.distill_weight = weight;
            config.epochs = 3;
        });
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v["distill_cls"].as_f64()? + v["distill_box"].as_f64()?)
            })
            .collect()
    };
    let distilled = terms(20.0, "distilled");
    let plain = terms(0.0, "plain");
    assert_eq!(distilled.len(), 12, "{distilled:?}");
    assert_eq!(plain.len(), 12, "{plain:?}");
    let tail = |t: &[f64]| t[9..].iter().sum::<f64>();
    assert!(
        tail(&distilled) < 0.5 * tail(&plain),
        "the distilled student is not nearer its teacher: {distilled:?} against {plain:?} without the terms"
    );

    // A teacher at 64 px for a student at 96 px.
    let mut other = edge_detector::DetectorConfig::edge_neu();
    other.backbone = SwinConfig::nano().with_img_size([64, 64]);
    other.preprocess.input_size = [64, 64];
    let wrong = dir.path().join("wrong.safetensors");
    edge_detector::Detector::new(other, &device)
        .unwrap()
        .save(&wrong)
        .unwrap();
    let mut config = small_config(&data);
    config.init = Some(start.clone());
    config.teacher = Some(wrong.clone());
    config.max_steps = Some(1);
    let err = run(
        &config,
        &dir.path().join("refused"),
        &device,
        false,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("wrong.safetensors")
            && message.contains("[64, 64]")
            && message.contains("[96, 96]"),
        "{message}"
    );
}

/// Largest absolute change between two model files over the tensors whose name `pick` accepts.
fn largest_change_where(
    before: &std::path::Path,
    after: &std::path::Path,
    pick: impl Fn(&str) -> bool,
) -> f32 {
    let a = std::fs::read(before).unwrap();
    let b = std::fs::read(after).unwrap();
    let a = safetensors::SafeTensors::deserialize(&a).unwrap();
    let b = safetensors::SafeTensors::deserialize(&b).unwrap();
    let values = |data: &[u8]| -> Vec<f32> {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    a.tensors()
        .into_iter()
        .filter(|(name, _)| pick(name))
        .map(|(name, view)| {
            values(view.data())
                .iter()
                .zip(values(b.tensor(&name).unwrap().data()))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max)
}

/// `no_decay_norms`: under a large weight decay and a tiny learning rate (decay dominates each
/// step), norm weights, biases and position tables stay put while the other weights decay; the
/// group covers exactly those parameters.
#[test]
fn norms_biases_and_tables_can_train_without_weight_decay() {
    let _serial = serial();
    let (dir, data, start) = data_and_start();
    let paths = trainer::finetune::no_decay_paths(
        &edge_detector::Detector::load(&start, &Device::flex())
            .unwrap()
            .model,
    );
    let exempt = |name: &str| {
        name.ends_with(".bias")
            || name.ends_with(".gamma")
            || name.ends_with(".beta")
            || name.ends_with("relative_position_bias_table")
            // The head's per-level box scales (one value each).
            || name.starts_with("head.scales.")
    };
    assert!(paths.iter().all(|p| exempt(p)), "{paths:?}");
    assert!(
        paths.contains(&"backbone.layers.0.blocks.0.attn.relative_position_bias_table".into())
            && paths.contains(&"backbone.layers.0.blocks.0.norm1.gamma".into())
            && paths.contains(&"head.cls_tower.0.norm.gamma".into())
            && paths.contains(&"head.cls_out.bias".into()),
        "{paths:?}"
    );
    let train = |no_decay: bool, name: &str| {
        let out = dir.path().join(name);
        changes_after_steps(&data, &start, &out, 2, |config| {
            config.lr = 1e-6;
            config.weight_decay = 500.0;
            config.no_decay_norms = no_decay;
        });
        let model = out.join("model.safetensors");
        (
            largest_change_where(&start, &model, |n| n.ends_with("norm1.gamma")),
            largest_change_where(&start, &model, |n| n.ends_with("qkv.weight")),
        )
    };
    let (gamma_decayed, qkv_decayed) = train(false, "decay");
    let (gamma_kept, qkv_still_decayed) = train(true, "no-decay");
    // Two steps of lr x decay = 5e-4 on gammas of 1: about 1e-3; Adam's own steps are ~2e-6.
    assert!(gamma_decayed > 5e-4, "{gamma_decayed}");
    assert!(gamma_kept < 1e-5, "{gamma_kept}");
    assert!(
        (qkv_still_decayed - qkv_decayed).abs() < 0.1 * qkv_decayed,
        "{qkv_still_decayed} against {qkv_decayed}"
    );
}

/// Global gradient-norm clipping: above the limit, all gradients together get exactly the limit's
/// norm, each scaled by the same factor (direction kept); below it nothing changes.
#[test]
fn global_clipping_scales_all_gradients_alike() {
    use burn::optim::GradientsParams;
    let device = Device::flex().autodiff();
    let model = burn::nn::LinearConfig::new(8, 4).init(&device);
    let x = Tensor::<2>::random(
        [16, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let loss = model.forward(x).powf_scalar(2.0).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let weight = |g: &GradientsParams| -> Vec<f32> {
        g.get::<2>(model.weight.id)
            .unwrap()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let bias = |g: &GradientsParams| -> Vec<f32> {
        g.get::<1>(model.bias.as_ref().unwrap().id)
            .unwrap()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let (w0, b0) = (weight(&grads), bias(&grads));
    let norm0 = w0.iter().chain(&b0).map(|v| v * v).sum::<f32>().sqrt();
    assert!(norm0 > 1.0, "{norm0}");

    let mut clipped = grads;
    let reported = trainer::finetune::clip_global_norm(&model, &mut [&mut clipped], 0.5);
    assert!(
        (reported - norm0).abs() < 1e-4 * norm0,
        "{reported} {norm0}"
    );
    let (w1, b1) = (weight(&clipped), bias(&clipped));
    let norm1 = w1.iter().chain(&b1).map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm1 - 0.5).abs() < 1e-5, "{norm1}");
    for (a, b) in w0.iter().chain(&b0).zip(w1.iter().chain(&b1)) {
        assert!((a * 0.5 / norm0 - b).abs() < 1e-6, "{a} -> {b}");
    }
    // Under the limit: unchanged.
    let before = weight(&clipped);
    trainer::finetune::clip_global_norm(&model, &mut [&mut clipped], 10.0);
    assert_eq!(weight(&clipped), before);
}
