//! The INT8 kernel against burn's float Linear on the edge model's Linear shapes (224x224,
//! batch from `--batch`, default 1), in the same run: median ms per call and the ratio
//! (float time / INT8 time, above 1 the INT8 kernel is faster). The INT8 time includes
//! quantizing the input and the conversions from and to burn tensors.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;
use edge_detector::int8::{Int8Conv, Int8Linear};

mod common;
use common::{arg, time_ms};

fn main() {
    edge_detector::cpu::hold_freed_memory();
    let batch: usize = arg("--batch").and_then(|v| v.parse().ok()).unwrap_or(1);
    // `--only TEXT`: just the rows whose name contains TEXT (for profiling one shape).
    let only = arg("--only");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    if !Int8Linear::supported() {
        println!("this CPU has no AVX2: the INT8 kernel does not run here");
        return;
    }
    let device = Device::flex();
    let runs = 30;
    println!("| layer | m x k x n | burn f32 ms | int8 ms | f32 / int8 |");
    println!("| --- | --- | --- | --- | --- |");
    let (mut total_f, mut total_q) = (0.0, 0.0);
    for stage in 0..4 {
        let dim = 48usize << stage;
        let side = 56 >> stage;
        let m = batch * side * side;
        let hidden_pruned = (dim * 4 * 35) / 100;
        for (name, k, n) in [
            ("qkv", dim, 3 * dim),
            ("proj", dim, dim),
            ("fc1", dim, 4 * dim),
            ("fc2", 4 * dim, dim),
            ("fc1 pruned 35%", dim, hidden_pruned),
            ("fc2 pruned 35%", hidden_pruned, dim),
        ] {
            if !wanted(name) {
                continue;
            }
            let layer = LinearConfig::new(k, n).init(&device);
            let w = layer.weight.val().into_data().try_to_vec::<f32>().unwrap();
            let b = layer
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let q = Int8Linear::quantize(&w, k, n, Some(&b));
            let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let f = time_ms(|| drop(layer.forward(x.clone()).into_data()), runs);
            let i = time_ms(|| drop(q.forward(x.clone()).into_data()), runs);
            if !name.contains("pruned") {
                total_f += f;
                total_q += i;
            }
            println!(
                "| stage {stage} {name} | {m} x {k} x {n} | {f:.3} | {i:.3} | {:.2} |",
                f / i
            );
        }
    }
    println!(
        "| sum over the unpruned layers (one block per stage) | | {total_f:.2} | {total_q:.2} | {:.2} |",
        total_f / total_q
    );
    println!();
    println!("| convolution | input | burn f32 ms | int8 ms | f32 / int8 |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, cin, cout, k, stride, pad, side) in [
        ("patch embedding 4x4/4", 3, 48, 4, 4, 0, 224),
        ("head 3x3, stride-8 level", 64, 64, 3, 1, 1, 28),
        ("head 3x3, stride-16 level", 64, 64, 3, 1, 1, 14),
        ("head 3x3, stride-32 level", 64, 64, 3, 1, 1, 7),
        ("lateral 1x1, stride-8 level", 96, 64, 1, 1, 0, 28),
    ] {
        if !wanted(name) {
            continue;
        }
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .init(&device);
        let q = Int8Conv::from_conv(&conv).unwrap();
        let x = Tensor::<4>::random(
            [batch, cin, side, side],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let f = time_ms(|| drop(conv.forward(x.clone()).into_data()), runs);
        let i = time_ms(|| drop(q.forward(x.clone()).into_data()), runs);
        println!(
            "| {name} | {batch} x {cin} x {side} x {side} | {f:.3} | {i:.3} | {:.2} |",
            f / i
        );
    }
}
