//! Mixed precision (`--precision bf16`): the step computes in bf16, every gradient reaches its
//! f32 weight, training follows the f32 run closely, and what is saved stays f32.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use edge::detector::{Detector, DetectorConfig, NEU_CLASSES, SwinConfig};
use trainer::data::augment::AugmentConfig;
use trainer::finetune::{FinetuneConfig, run};
use trainer::precision::{Precision, to_f32};

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// ||a - b|| / ||b||
fn rel_diff<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> f32 {
    let (a, b) = (values(a), values(b));
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|x| x * x).sum();
    (num / den).sqrt()
}

fn nano96() -> DetectorConfig {
    let mut config = DetectorConfig::edge_neu();
    config.backbone = SwinConfig::nano().with_img_size([96, 96]);
    config.preprocess.input_size = [96, 96];
    config
}

/// Counts float parameters, and those that got a gradient in one pass but not the other.
struct SameGradients<'a>(&'a GradientsParams, &'a GradientsParams, usize, Vec<String>);
impl burn::module::ModuleVisitor for SameGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.2 += 1;
        let (a, b) = (self.0.get::<D>(param.id), self.1.get::<D>(param.id));
        if a.is_some() != b.is_some() || a.is_some_and(|g| g.dtype() != DType::F32) {
            self.3.push(format!("{:?}", param.val().dims()));
        }
    }
}

#[test]
fn bf16_step_computes_in_bf16_and_reaches_the_f32_weights() {
    let device = Device::flex().autodiff();
    device.seed(7);
    let detector = Detector::new(nano96(), &device).unwrap();
    let input = Tensor::<4>::random([2, 3, 96, 96], Distribution::Default, &device);
    let reference = detector.model.forward(input.clone());

    let compute = Precision::Bf16.compute_copy(&detector.model);
    let output = compute.forward(Precision::Bf16.input(input.clone()));
    assert_eq!(output.cls_logits.dtype(), DType::BF16);
    assert_eq!(output.box_ltrb.dtype(), DType::BF16);
    let cls = to_f32(output.cls_logits);
    let boxes = to_f32(output.box_ltrb);
    // bf16 keeps 8 significant bits (0.4% per rounding): close to f32, not equal to it.
    let (e_cls, e_box) = (
        rel_diff(&cls, &reference.cls_logits),
        rel_diff(&boxes, &reference.box_ltrb),
    );
    assert!(e_cls < 0.02 && e_box < 0.02, "cls {e_cls}, box {e_box}");
    assert!(
        e_cls > 1e-5 && e_box > 1e-5,
        "cls {e_cls}, box {e_box}: not bf16"
    );

    // The gradients land on the f32 parameters (every one of them), in f32, and agree with the
    // f32 step's gradients.
    let grads_of = |cls: Tensor<3>, boxes: Tensor<3>| {
        let loss = cls.powf_scalar(2.0).mean() + boxes.sqrt().mean();
        GradientsParams::from_grads(loss.backward(), &detector.model)
    };
    let mixed = grads_of(cls, boxes);
    let full = grads_of(reference.cls_logits, reference.box_ltrb);
    let mut same = SameGradients(&mixed, &full, 0, Vec::new());
    burn::module::Module::visit(&detector.model, &mut same);
    // The backbone's final norm (weight, bias) is not on the detector's path.
    assert!(
        same.2 > 50 && mixed.len() + 2 >= same.2,
        "{} of {}",
        mixed.len(),
        same.2
    );
    assert!(
        same.3.is_empty(),
        "gradients differ in presence or dtype: {:?}",
        same.3
    );
    let embed = detector.model.backbone.patch_embed.proj.weight.id;
    let (g_mixed, g_full) = (
        mixed.get::<4>(embed).unwrap(),
        full.get::<4>(embed).unwrap(),
    );
    assert_eq!(g_mixed.dtype(), DType::F32);
    let e_grad = rel_diff(&g_mixed, &g_full);
    assert!(
        e_grad < 0.05,
        "patch-embedding gradient off by {e_grad} (relative)"
    );
}

#[test]
fn bf16_training_follows_f32_and_saves_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes: Vec<String> = NEU_CLASSES.iter().map(|s| s.to_string()).collect();
    trainer::data::synth::write_dataset(&data, &classes, 4, 0, 1).unwrap();
    // Both runs start from the same weights (burn initialises parameters lazily, in the order
    // they are first used, so a fresh model's draws depend on the first pass).
    let start = dir.path().join("start.safetensors");
    Detector::new(nano96(), &Device::flex())
        .unwrap()
        .save(&start)
        .unwrap();
    let train = |precision: Precision| {
        let mut config = FinetuneConfig::new(data.clone());
        config.init = Some(start.clone());
        config.input_size = 96;
        config.batch_size = 4;
        config.lr = 1e-3;
        config.warmup_epochs = 0.0;
        config.eval_every = 100;
        config.max_steps = Some(4);
        config.augment = AugmentConfig::none();
        config.precision = precision;
        let out = dir.path().join(precision.name());
        run(
            &config,
            &out,
            &Device::flex(),
            false,
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        out
    };
    let (f32_run, bf16_run) = (train(Precision::F32), train(Precision::Bf16));
    let losses = |run: &std::path::Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
            .collect()
    };
    let (a, b) = (losses(&f32_run), losses(&bf16_run));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 0.03 * x.abs(),
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
    Detector::load(bf16_run.join("model.safetensors"), &Device::flex()).unwrap();
}
