//! Latency and size of detector model files on the CPU backend: `scripts/bench/compress`.
//! For each file: parameters, bytes on disk, weight storage, GFLOPs, median forward time at batch
//! 1 and 8 (224x224, random pixels; the models take turns, one forward each), and the speed-up
//! over the first file, in the same run.
//! Threads: `RAYON_NUM_THREADS` (the script sets 2).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use edge_detector::Detector;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    edge_detector::cpu::hold_freed_memory();
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
    let models: Vec<(String, usize, String, Detector)> = files
        .iter()
        .map(|file| {
            let mut bytes = std::fs::read(file).expect("model file");
            if bytes.starts_with(protocol::package::MAGIC) {
                // A package (e.g. the factory model): its model file.
                bytes = protocol::package::Package::from_bytes(bytes, file)
                    .expect("package")
                    .weights;
            }
            let quantization = edge_detector::quant::quantization_of(&bytes);
            let size = bytes.len();
            let detector = Detector::from_bytes(bytes, file, &device).expect("model loads");
            (file.clone(), size, quantization, detector)
        })
        .collect();
    // Interleaved: one forward of each model in turn, so drift in the machine's speed hits all
    // of them alike; medians per model.
    let mut times = vec![[Vec::new(), Vec::new()]; models.len()];
    for (b, batch) in [1usize, 8].into_iter().enumerate() {
        let n = if batch == 8 { runs.div_ceil(2) } else { runs };
        for round in 0..n + 2 {
            for (i, (_, _, _, detector)) in models.iter().enumerate() {
                let [h, w] = detector.config.preprocess.input_size;
                let input = Tensor::<4>::random([batch, 3, h, w], Distribution::Default, &device);
                let start = Instant::now();
                let out = detector.model.forward(input);
                let _ = out.box_ltrb.into_data();
                if round >= 2 {
                    times[i][b].push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    let base = [median(times[0][0].clone()), median(times[0][1].clone())];
    for ((file, size, quantization, detector), t) in models.iter().zip(times) {
        let row = [median(t[0].clone()), median(t[1].clone())];
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
                "speedup_b1": (base[0] / row[0] * 100.0).round() / 100.0,
                "speedup_b8": (base[1] / row[1] * 100.0).round() / 100.0,
                "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
            })
        );
    }
}
