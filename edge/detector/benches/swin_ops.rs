//! Where the Swin backbone's time goes on the default backend: the primitive operations of one
//! block, timed at each stage's shape of the edge model (224x224, batch from `--batch`, default 1)
//! and multiplied by the blocks per stage. Run by `scripts/bench/detector --breakdown`.

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every forward pass.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::nn::{LayerNormConfig, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use edge_detector::{SwinConfig, kernels};

/// Timed for comparison, not counted in the sum (the backbone uses the other variant).
const ALTERNATIVES: [&str; 3] = [
    "qkv + attention (burn fused op)",
    "qkv + attention (burn matmul+softmax)",
    "gelu (burn)",
];

mod common;
use common::{arg, time_ms};

fn main() {
    edge_detector::cpu::hold_freed_memory();
    let batch: usize = arg("--batch").and_then(|v| v.parse().ok()).unwrap_or(1);
    let device = Device::flex();
    let cfg = SwinConfig::edge();
    let mut totals: Vec<(String, f64)> = Vec::new();
    let mut add = |name: &str, ms: f64| match totals.iter_mut().find(|(n, _)| n == name) {
        Some((_, t)) => *t += ms,
        None => totals.push((name.to_string(), ms)),
    };
    let runs = 15;
    for stage in 0..cfg.depths.len() {
        let dim = cfg.embed_dim << stage;
        let side = 56 >> stage;
        let heads = cfg.num_heads[stage];
        let win = side.min(7);
        let nw = (side / win) * (side / win);
        let n = win * win;
        let tokens = batch * side * side;
        let blocks = cfg.depths[stage] as f64;
        let x = Tensor::<4>::random([batch, side, side, dim], Distribution::Default, &device);
        let norm = LayerNormConfig::new(dim).init(&device);
        let qkv = LinearConfig::new(dim, 3 * dim).init(&device);
        let proj = LinearConfig::new(dim, dim).init(&device);
        let fc1 = LinearConfig::new(dim, 4 * dim).init(&device);
        let fc2 = LinearConfig::new(4 * dim, dim).init(&device);
        let flat = x.clone().reshape([tokens, dim]);
        let hidden = Tensor::<2>::random([tokens, 4 * dim], Distribution::Default, &device);
        let hd = dim / heads;
        let bias = Tensor::<4>::random([1, heads, n, n], Distribution::Default, &device);
        let opts = AttentionModuleOptions {
            scale: Some((hd as f64).powf(-0.5)),
            softcap: None,
            is_causal: false,
        };
        let sync2 = |t: Tensor<2>| drop(t.into_data());
        add(
            "layer_norm x2",
            2.0 * blocks * time_ms(|| drop(norm.forward(x.clone()).into_data()), runs),
        );
        add(
            "linear proj",
            blocks * time_ms(|| sync2(proj.forward(flat.clone())), runs),
        );
        add(
            "linear fc1",
            blocks * time_ms(|| sync2(fc1.forward(flat.clone())), runs),
        );
        add(
            "linear fc2",
            blocks * time_ms(|| sync2(fc2.forward(hidden.clone())), runs),
        );
        add(
            "gelu (ours, fast erf)",
            blocks * time_ms(|| sync2(kernels::gelu(hidden.clone())), runs),
        );
        add(
            "gelu (burn)",
            blocks * time_ms(|| sync2(gelu(hidden.clone())), runs),
        );
        // Window attention from the window tokens to the merged heads, qkv projection included
        // (our kernel reads q, k, v out of the projection; burn's op needs them split first).
        let windows = Tensor::<3>::random([batch * nw, n, dim], Distribution::Default, &device);
        let scale = (hd as f64).powf(-0.5);
        let split = |qkv: Tensor<3>| {
            let qkv = qkv
                .reshape([batch * nw, n, 3, heads, hd])
                .permute([2, 0, 3, 1, 4]);
            let part = |i: usize| {
                qkv.clone()
                    .narrow(0, i, 1)
                    .reshape([batch * nw, heads, n, hd])
            };
            (part(0), part(1), part(2))
        };
        let merge = |out: Tensor<4>| {
            drop(
                out.swap_dims(1, 2)
                    .reshape([batch * nw, n, dim])
                    .into_data(),
            )
        };
        add(
            "qkv + attention (ours, kernel)",
            blocks
                * time_ms(
                    || {
                        let out = kernels::window_attention(
                            qkv.forward(windows.clone()),
                            bias.clone(),
                            heads,
                            scale as f32,
                        );
                        drop(out.into_data())
                    },
                    runs,
                ),
        );
        add(
            "qkv + attention (burn fused op)",
            blocks
                * time_ms(
                    || {
                        let (q, k, v) = split(qkv.forward(windows.clone()));
                        merge(attention(q, k, v, None, Some(bias.clone()), opts))
                    },
                    runs,
                ),
        );
        add(
            "qkv + attention (burn matmul+softmax)",
            blocks
                * time_ms(
                    || {
                        let (q, k, v) = split(qkv.forward(windows.clone()));
                        let s = (q * scale).matmul(k.swap_dims(2, 3)) + bias.clone();
                        merge(softmax(s, 3).matmul(v))
                    },
                    runs,
                ),
        );
        // Layout work: window partition and reverse (a permute copy each), and in shifted blocks
        // two rolls.
        let copy = || {
            let y = x
                .clone()
                .reshape([batch, side / win, win, side / win, win, dim])
                .permute([0, 1, 3, 2, 4, 5]);
            drop(y.reshape([tokens, dim]).into_data());
        };
        let copy_ms = time_ms(copy, runs);
        add("window partition + reverse", 2.0 * blocks * copy_ms);
        if side > win {
            add(
                "roll x2 (shifted blocks)",
                2.0 * (blocks / 2.0)
                    * time_ms(
                        || drop(x.clone().roll(&[-3i64, -3], &[1, 2]).into_data()),
                        runs,
                    ),
            );
        }
        add(
            "residual add x2",
            2.0 * blocks * time_ms(|| drop((x.clone() + x.clone()).into_data()), runs),
        );
    }
    let total: f64 = totals
        .iter()
        .filter(|(n, _)| !ALTERNATIVES.contains(&n.as_str()))
        .map(|(_, t)| t)
        .sum();
    println!("edge Swin backbone at 224, batch {batch}: time by operation (summed over blocks)");
    for (name, ms) in &totals {
        let share = if ALTERNATIVES.contains(&name.as_str()) {
            String::from("(alt.)")
        } else {
            format!("{:5.1}%", 100.0 * ms / total)
        };
        println!("  {name:30} {ms:8.2} ms  {share}");
    }
    println!("  {:30} {total:8.2} ms", "sum");
}
