//! Daemon throughput, latency, drops and memory: `scripts/bench/daemon`.
//!
//! The real `edge run` process against a loopback mosquitto, replaying JPEG frames from a folder:
//! - 224x224 frames (one model input each) and 2048x1024 line-scan frames (tiled, 224-px tiles
//!   with 32 px overlap: 66 tiles per frame);
//! - capacity: frames as fast as the daemon takes them (`on_full = "block"`): sustained frames/s;
//! - at 80% and at 150% of that rate (`on_full = "drop_oldest"`): frame-to-verdict latency
//!   p50/p99 (captured -> decided, queueing included) and the frames dropped;
//! - memory: resident set size of the daemon sampled over a long 224x224 run at 80% of capacity.
//!
//! The reference, measured in the same run: the detector alone, in this process, on batches of
//! 224x224 tiles (no decode, queue, tiling, rules, store or MQTT): daemon frames/s x tiles per
//! frame / reference tiles/s is the share of the detector's speed the whole pipeline keeps.
//!
//! Environment: MODEL (a detector .safetensors; default: the factory model in edge/models/),
//! PHASE_S (seconds per phase, default 30), MEMORY_MIN (minutes of the memory run, default 10),
//! ONLY_MEMORY (skip the throughput phases), RAYON_NUM_THREADS (the script sets 2 for both).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::{Broker, Edge, Watcher, edge_config, free_port, run_ok};
use edge::capture::now_ms;
use edge_detector::{Detector, ImageView};
use protocol::Verdict;
use rand::SeedableRng;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A grey frame of synthetic steel with NEU-style defects.
fn frame(width: u32, height: u32, rng: &mut rand::rngs::StdRng) -> image::GrayImage {
    use rand::RngExt;
    let size = edge_detector::synth::SIZE;
    let mut out = image::GrayImage::new(width, height);
    for ty in 0..height.div_ceil(size) {
        for tx in 0..width.div_ceil(size) {
            let class = if rng.random_bool(0.3) {
                rng.random_range(0..6)
            } else {
                usize::MAX
            };
            let (tile, _) = edge_detector::synth::generate(class, rng);
            image::imageops::replace(&mut out, &tile, (tx * size) as i64, (ty * size) as i64);
        }
    }
    out
}

fn write_frames(dir: &Path, width: u32, height: u32, n: usize) -> PathBuf {
    let folder = dir.join(format!("frames-{width}x{height}"));
    std::fs::create_dir_all(&folder).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(width));
    for i in 0..n {
        frame(width, height, &mut rng)
            .save(folder.join(format!("{i:03}.jpg")))
            .unwrap();
    }
    folder
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn metric(port: u16, name: &str) -> f64 {
    let body = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Phase {
    fps: f64,
    p50: f64,
    p99: f64,
    frames: f64,
    dropped: f64,
    verdicts: usize,
}

struct Bench {
    dir: PathBuf,
    broker: Broker,
    public: String,
    package: PathBuf,
    runs: usize,
}

impl Bench {
    /// Runs the daemon on `folder` for `seconds` (after `warmup`); returns what it did.
    fn phase(
        &mut self,
        folder: &Path,
        tile: usize,
        fps: f64,
        block: bool,
        seconds: f64,
        mut sample: impl FnMut(u32, f64),
    ) -> Phase {
        self.runs += 1;
        let http = free_port();
        let base = edge_config(
            "bench",
            &[],
            self.broker.port,
            &self.public,
            &self.package,
            "",
        );
        let config = format!(
            "{base}\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[source]\nkind = \"folder\"\npath = \"{}\"\nfps = {fps}\nloop = true\n\n\
             [pipeline]\ntile = {tile}\ntile_overlap = 32\non_full = \"{}\"\n",
            folder.display(),
            if block { "block" } else { "drop_oldest" }
        );
        let watcher = Watcher::start(self.broker.port);
        let dir = self.dir.join(format!("run{}", self.runs));
        let mut edge = Edge::start(&dir, "bench", &config);
        let warm = watcher.wait::<Verdict>("/bench/verdict", Duration::from_secs(120), |_| true);
        assert!(warm.is_some(), "no verdict:\n{}", edge.log());
        std::thread::sleep(Duration::from_secs(3));
        let (frames0, dropped0) = (
            metric(http, "edge_frames_total"),
            metric(http, "edge_dropped_frames_total"),
        );
        let start_ms = now_ms();
        let started = Instant::now();
        let pid = edge.pid().expect("running");
        while started.elapsed().as_secs_f64() < seconds {
            std::thread::sleep(Duration::from_secs(1));
            sample(pid, started.elapsed().as_secs_f64());
        }
        let end_ms = now_ms();
        let (frames1, dropped1) = (
            metric(http, "edge_frames_total"),
            metric(http, "edge_dropped_frames_total"),
        );
        edge.stop();
        let window: Vec<Verdict> = watcher
            .all::<Verdict>("/bench/verdict")
            .into_iter()
            .filter(|v| v.decided_ms >= start_ms && v.decided_ms < end_ms)
            .collect();
        let mut latency: Vec<f64> = window
            .iter()
            .map(|v| v.decided_ms.saturating_sub(v.captured_ms) as f64)
            .collect();
        latency.sort_by(f64::total_cmp);
        Phase {
            fps: window.len() as f64 / ((end_ms - start_ms) as f64 / 1e3),
            p50: percentile(&latency, 0.5),
            p99: percentile(&latency, 0.99),
            frames: frames1 - frames0,
            dropped: dropped1 - dropped0,
            verdicts: window.len(),
        }
    }
}

fn main() {
    let phase_s = env_f64("PHASE_S", 30.0);
    let memory_min = env_f64("MEMORY_MIN", 10.0);
    let dir = tempfile::Builder::new()
        .prefix("bench-daemon")
        .tempdir()
        .unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    run_ok(
        "trainer",
        &["keygen", "--out", &d("keys"), "--name", "fleet"],
    );
    let model = match std::env::var("MODEL") {
        Ok(m) => m,
        Err(_) => {
            // The factory-default model that ships with the edge (pruned, INT8 weights).
            let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../edge/models/neu-edge.edgepkg");
            let package = protocol::package::Package::read(&shipped).expect("factory package");
            std::fs::write(d("factory.safetensors"), &package.weights).unwrap();
            d("factory.safetensors")
        }
    };
    let small = write_frames(dir.path(), 224, 224, 16);
    let large = write_frames(dir.path(), 2048, 1024, 3);
    e2e::package(
        Path::new(&model),
        &dir.path().join("keys/fleet.key"),
        1,
        &small.join("000.jpg"),
        &dir.path().join("m.edgepkg"),
    );

    // Reference: the detector alone on batches of 8 tiles.
    let device = edge_detector::device::DeviceChoice::Flex.device().unwrap();
    let detector = Detector::load(Path::new(&model), &device).expect("model loads");
    let tiles: Vec<image::GrayImage> = (0..8)
        .map(|i| {
            image::open(small.join(format!("{i:03}.jpg")))
                .unwrap()
                .into_luma8()
        })
        .collect();
    let views: Vec<ImageView> = tiles.iter().map(ImageView::grey).collect();
    for _ in 0..2 {
        detector.detect(&views).unwrap();
    }
    let t = Instant::now();
    let mut batches = 0;
    while t.elapsed().as_secs_f64() < 10.0 {
        detector.detect(&views).unwrap();
        batches += 1;
    }
    let ref_tiles_s = (batches * 8) as f64 / t.elapsed().as_secs_f64();
    drop(detector);

    let broker = Broker::start(dir.path());
    let fleet = std::fs::read_to_string(dir.path().join("keys/fleet.pub")).unwrap();
    let mut bench = Bench {
        dir: dir.path().to_path_buf(),
        broker,
        public: fleet.trim().to_string(),
        package: dir.path().join("m.edgepkg"),
        runs: 0,
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "edge daemon, model {model}, {threads} threads, loopback mosquitto, {phase_s} s per phase"
    );
    println!("reference: detector alone, batches of 8 tiles of 224x224: {ref_tiles_s:.1} tiles/s");
    println!(
        "{:<10} {:<22} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} | {:>10}",
        "frame",
        "input",
        "frames/s",
        "p50 ms",
        "p99 ms",
        "frames in",
        "dropped",
        "drop %",
        "x detector"
    );
    let only_memory = std::env::var("ONLY_MEMORY").is_ok();
    for (label, folder, tile, tiles_per_frame) in [
        ("224x224", &small, 0usize, 1.0),
        ("2048x1024", &large, 224, 66.0),
    ] {
        if only_memory {
            break;
        }
        let reference_fps = ref_tiles_s / tiles_per_frame;
        let seconds = phase_s * if tiles_per_frame > 1.0 { 2.0 } else { 1.0 };
        let capacity = bench.phase(folder, tile, 0.0, true, seconds, |_, _| {});
        let row = |input: String, p: &Phase| {
            println!(
                "{:<10} {:<22} {:>8.2} {:>8.0} {:>8.0} {:>9.0} {:>9.0} {:>8.1} | {:>10.2}",
                label,
                input,
                p.fps,
                p.p50,
                p.p99,
                p.frames,
                p.dropped,
                100.0 * p.dropped / p.frames.max(1.0),
                p.fps / reference_fps
            );
        };
        row("as fast as taken".into(), &capacity);
        for factor in [0.8, 1.5] {
            let rate = capacity.fps * factor;
            let p = bench.phase(folder, tile, rate, false, seconds, |_, _| {});
            row(format!("{rate:.2}/s ({:.0}% of cap.)", factor * 100.0), &p);
        }
        assert!(capacity.verdicts > 0);
    }

    // Memory over a long run: 224x224 at 80% of capacity.
    let capacity = bench.phase(&small, 0, 0.0, true, 10.0, |_, _| {});
    let mut samples: Vec<(f64, f64)> = vec![];
    let mut next = 0.0;
    let long = bench.phase(
        &small,
        0,
        capacity.fps * 0.8,
        false,
        memory_min * 60.0,
        |pid, t| {
            if t >= next {
                samples.push((t, rss_mib(pid)));
                next += 15.0;
            }
        },
    );
    let after_warmup: Vec<&(f64, f64)> = samples.iter().filter(|(t, _)| *t >= 60.0).collect();
    let first = after_warmup.first().map_or(f64::NAN, |s| s.1);
    let last = samples.last().map_or(f64::NAN, |s| s.1);
    let max = samples.iter().map(|s| s.1).fold(f64::NAN, f64::max);
    println!(
        "memory: {memory_min} min at {:.1} frames/s, {} verdicts, {} dropped: RSS {first:.0} MiB at 1 min, {last:.0} MiB at the end ({:+.1}%), max {max:.0} MiB",
        long.fps,
        long.verdicts,
        long.dropped,
        100.0 * (last - first) / first
    );
    println!(
        "RSS every minute (MiB): {}",
        samples
            .iter()
            .filter(|(t, _)| (*t as u64) % 60 < 15)
            .map(|(_, r)| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
