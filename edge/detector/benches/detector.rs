//! Forward-pass timing of the Swin backbone and the full detector on the default backend.
//! Prints one JSON object per line; `scripts/bench/detector` runs it beside PyTorch and ONNX
//! Runtime and prints the ratios. Threads: `RAYON_NUM_THREADS` (the script sets 2).

// Every tensor op allocates; mimalloc keeps freed blocks for reuse instead of returning them
// to the kernel, which saves page faults on every forward pass.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use edge_detector::device::DeviceChoice;
use edge_detector::{AttentionImpl, DetectorConfig, NEU_CLASSES, SwinConfig};

fn median_ms(mut f: impl FnMut(), warmup: usize, runs: usize) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

fn main() {
    edge_detector::cpu::hold_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|i| args.get(i + 1).cloned());
    let device_name = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "flex".into());
    let choice = <DeviceChoice as clap::ValueEnum>::from_str(&device_name, true)
        .expect("--device flex|wgpu|cuda");
    let device = choice.device().expect("device compiled in");
    let runs: usize = if quick { 3 } else { 10 };
    for (name, swin) in [("edge", SwinConfig::edge()), ("tiny", SwinConfig::tiny())] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mut backbone = swin.clone().init(&device);
        let mut detector_config = DetectorConfig::edge_neu();
        detector_config.backbone = swin.clone();
        let detector = detector_config.init(&device).expect("valid config");
        for batch in [1usize, 8] {
            let input = Tensor::<4>::random([batch, 3, 224, 224], Distribution::Default, &device);
            let runs = if batch == 8 { runs.div_ceil(2) } else { runs };
            for (label, attention) in [
                ("kernel", AttentionImpl::Kernel),
                ("fused", AttentionImpl::Fused),
                ("explicit", AttentionImpl::Explicit),
            ] {
                backbone.set_attention_impl(attention);
                let (median, best) = median_ms(
                    || {
                        let f = backbone.forward(input.clone());
                        let _ = f.last_normed.into_data();
                    },
                    2,
                    runs,
                );
                println!(
                    "{{\"impl\":\"burn-{device_name}\",\"part\":\"backbone\",\"attention\":\"{label}\",\"model\":\"{name}\",\"batch\":{batch},\"median_ms\":{median:.2},\"best_ms\":{best:.2}}}"
                );
            }
            let (median, best) = median_ms(
                || {
                    let out = detector.forward(input.clone());
                    let _ = out.cls_logits.into_data();
                    let _ = out.box_ltrb.into_data();
                },
                2,
                runs,
            );
            println!(
                "{{\"impl\":\"burn-{device_name}\",\"part\":\"detector\",\"attention\":\"kernel\",\"model\":\"{name}\",\"batch\":{batch},\"median_ms\":{median:.2},\"best_ms\":{best:.2},\"classes\":{}}}",
                NEU_CLASSES.len()
            );
        }
    }
}
