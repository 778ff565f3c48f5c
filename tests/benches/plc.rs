//! Frame captured -> pass coil written at the PLC: `scripts/bench/plc`.
//!
//! The real `edge run` process with the factory model inspects a synthetic strip at a fixed frame
//! rate (one 200 x 200 frame per tile) and writes every verdict to an independent Modbus/TCP
//! server on loopback (tests/tools/modbus_plc.py, pymodbus), which timestamps each write it
//! applies. Per verdict, in the same run: the detector stage alone (the verdict's `latency_ms`),
//! frame captured -> verdict stored, and frame captured -> coil written (the PLC's clock is this
//! machine's). Prints p50/p99 of each and the PLC link's share.
//!
//! Environment: FPS (default 10), PHASE_S (default 30), EDGE_TEST_PYTHON (a Python with pymodbus).

use std::path::Path;
use std::time::Duration;

use e2e::{Edge, Fixtures, PlcServer, free_port};
use protocol::Verdict;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let fps = env_f64("FPS", 10.0);
    let phase = env_f64("PHASE_S", 30.0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let trusted = std::fs::read_to_string(root.join("edge/models/release.pub")).unwrap();
    let factory = root
        .join("edge/models/neu-edge.edgepkg")
        .canonicalize()
        .unwrap();
    let files = Fixtures::new("bench-plc");
    let plc = PlcServer::start(&files.dir);
    let http = free_port();
    let config = format!(
        "{}\n[source]\nkind = \"synthetic\"\nfps = {fps}\n\n[pipeline]\nmax_batch = 1\n\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n\n\
         [plc]\naddress = \"127.0.0.1:{}\"\nstale_ms = 10000\n",
        e2e::offline_edge_config("cam1", &[], trusted.trim(), &factory, ""),
        plc.port
    );
    let mut edge = Edge::start(&files.dir, "cam1", &config);
    // Warm-up (model load, first batches), then the measured phase.
    std::thread::sleep(Duration::from_secs(5));
    let start_ms = edge::capture::now_ms();
    std::thread::sleep(Duration::from_secs_f64(phase));
    assert!(edge.stop().success(), "{}", edge.log());

    let store = edge::verdicts::store::VerdictStore::open(
        &files.dir.join("cam1/state/verdicts.sled"),
        Default::default(),
    )
    .unwrap();
    let verdicts: Vec<Verdict> = store.since(0, usize::MAX).unwrap();
    let by_id: std::collections::HashMap<u64, &Verdict> =
        verdicts.iter().map(|v| (v.id, v)).collect();
    let writes = plc.writes();
    let (mut detector, mut stored, mut coil) = (vec![], vec![], vec![]);
    let mut missing = 0;
    for (i, w) in writes.iter().enumerate() {
        if w.fc != 16 || w.values.len() != 14 {
            continue;
        }
        let id = w.values[10..14]
            .iter()
            .fold(0u64, |id, &x| (id << 16) | x as u64);
        let Some(v) = by_id.get(&id) else { continue };
        if v.captured_ms < start_ms || v.undecided.is_some() {
            continue;
        }
        let Some(c) = writes[i + 1..].iter().find(|c| c.fc == 5) else {
            missing += 1;
            continue;
        };
        detector.push(v.latency_ms);
        stored.push((v.decided_ms - v.captured_ms) as f64);
        coil.push(c.t * 1e3 - v.captured_ms as f64);
    }
    for s in [&mut detector, &mut stored, &mut coil] {
        s.sort_by(f64::total_cmp);
    }
    let n_phase = verdicts
        .iter()
        .filter(|v| v.captured_ms >= start_ms)
        .count();
    println!(
        "plc bench: {fps} frames/s for {phase} s, factory model, max_batch 1: {} verdicts, {} written to the PLC with their coil ({missing} without)",
        n_phase,
        coil.len()
    );
    println!("| stage | p50 ms | p99 ms |");
    println!("| --- | --- | --- |");
    for (name, s) in [
        ("detector stage alone (reference)", &detector),
        ("frame captured -> verdict stored", &stored),
        ("frame captured -> coil written at the PLC", &coil),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} |",
            percentile(s, 0.5),
            percentile(s, 0.99)
        );
    }
    println!(
        "coil written / detector alone, p50: {:.2}x; PLC link after the verdict is stored, p50: {:.1} ms",
        percentile(&coil, 0.5) / percentile(&detector, 0.5),
        percentile(&coil, 0.5) - percentile(&stored, 0.5)
    );
}
