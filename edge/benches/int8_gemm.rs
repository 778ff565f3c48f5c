//! The INT8 kernel against burn's float Linear on the edge model's Linear shapes (224x224,
//! batch from `--batch`, default 1), in the same run: median ms per call and the ratio
//! (float time / INT8 time, above 1 the INT8 kernel is faster). The INT8 time includes
//! quantizing the input and the conversions from and to burn tensors.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use burn::nn::LinearConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use edge::detector::int8::Int8Linear;

fn time_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args
        .iter()
        .position(|a| a == "--batch")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
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
}
