//! Mixed precision (`--precision bf16`): the step computes in bf16 and every gradient reaches its
//! f32 weight (a whole bf16 run: `finetune.rs`).

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use edge_detector::{Detector, DetectorConfig, SwinConfig};
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
