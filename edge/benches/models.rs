//! Latency and size of detector model files on the CPU backend: `scripts/bench-compress`.
//! For each file: parameters, bytes on disk, weight storage, GFLOPs, median forward time at batch
//! 1 and 8 (224x224, random pixels), and the speed-up over the first file, in the same run.
//! Threads: `RAYON_NUM_THREADS` (the script sets 2).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use edge::detector::Detector;

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    f();
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let files: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    assert!(!files.is_empty(), "usage: models FILE.safetensors...");
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let device = Device::flex();
    let mut first: Option<(f64, f64)> = None;
    for file in &files {
        let bytes = std::fs::read(file).expect("model file");
        let quantization = edge::detector::quant::quantization_of(&bytes);
        let size = bytes.len();
        let detector = Detector::from_bytes(bytes, file, &device).expect("model loads");
        let [h, w] = detector.config.preprocess.input_size;
        let mut row = vec![];
        for batch in [1usize, 8] {
            let input = Tensor::<4>::random([batch, 3, h, w], Distribution::Default, &device);
            let n = if batch == 8 { runs.div_ceil(2) } else { runs };
            row.push(median_ms(
                || {
                    let out = detector.model.forward(input.clone());
                    let _ = out.box_ltrb.into_data();
                },
                n,
            ));
        }
        let base = *first.get_or_insert((row[0], row[1]));
        println!(
            "{}",
            serde_json::json!({
                "impl": "burn-flex",
                "model": file,
                "params": detector.model.num_params(),
                "bytes": size,
                "weights": quantization,
                "gflops": 2.0 * detector.config.macs() as f64 / 1e9,
                "b1_ms": (row[0] * 100.0).round() / 100.0,
                "b8_ms": (row[1] * 100.0).round() / 100.0,
                "speedup_b1": (base.0 / row[0] * 100.0).round() / 100.0,
                "speedup_b8": (base.1 / row[1] * 100.0).round() / 100.0,
                "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
            })
        );
    }
}
