//! `trainer demo`: the whole product on one machine, with no setup. An MQTT broker (rumqttd,
//! in-process, unless `--broker` names one); a release key pair; the synthetic NEU-DET-style set
//! (or a real one, `--data`); SimCLR pretraining; few-shot fine-tuning; evaluation; INT8
//! compression; a signed package rolled out over MQTT to a real `edge` daemon that inspects a
//! synthetic line-scan strip and publishes a verdict per frame, printed here as they arrive;
//! then a summary checked against the strip's own ground truth. One file: it is one flow, stage by
//! stage, read in the order it runs.
//!
//! Every stage is the real command (`trainer pretrain`, `finetune`, ...), run as a child process
//! of this binary, so what the demo prints is what a user of those commands sees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use protocol::Verdict;
use protocol::messages::Message;

/// How much CPU the learning stages get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// Seconds per stage: checks the plumbing (the end-to-end test).
    Smoke,
    /// The demo: about 4 minutes on a 2-core machine.
    Standard,
}

/// `trainer demo`'s flags.
#[derive(clap::Args, Debug)]
pub struct DemoOptions {
    /// Work folder (data, runs, report, keys, the daemon's state and log).
    #[arg(long, default_value = "demo-run")]
    pub out: PathBuf,
    /// Use this MQTT broker (HOST:PORT) instead of starting one in-process.
    #[arg(long)]
    pub broker: Option<String>,
    /// A VOC / NEU-DET folder instead of the synthetic set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// smoke: seconds per learning stage (checks the plumbing); standard: the demo.
    #[arg(long, value_enum, default_value = "standard")]
    pub budget: Budget,
    /// Strip frames (400x200) the daemon inspects with the new model; the frames the factory
    /// model judged before the switch come on top.
    #[arg(long, default_value_t = 90)]
    pub frames: u64,
    /// Detector the few-shot fine-tune starts from (a nano detector trained on the synthetic
    /// drawing: the role a factory model plays for a new surface).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/strip-nano.safetensors"))]
    pub base: PathBuf,
    /// Fine-tune from the SimCLR backbone instead of --base (useful with a longer budget).
    #[arg(long)]
    pub from_simclr: bool,
    /// Factory package the daemon starts with (release.pub must sit beside it).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../edge/models/neu-edge.edgepkg"))]
    pub factory: PathBuf,
    /// Keep the daemon and broker running at the end (open the labeling page); Ctrl-C ends.
    #[arg(long)]
    pub keep_running: bool,
}

struct Stage {
    n: usize,
    total: usize,
    started: Instant,
}

impl Stage {
    fn next(&mut self, title: &str) {
        self.n += 1;
        println!(
            "\n=== [{}/{}] {title}  (demo time {:.0} s)",
            self.n,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `trainer ARGS` (this binary) to completion, its output going to ours.
fn trainer(args: &[&str]) -> Result<()> {
    let exe = std::env::current_exe().context("locating the trainer binary")?;
    let status = Command::new(&exe)
        .args(args)
        .status()
        .with_context(|| format!("running trainer {}", args.join(" ")))?;
    if !status.success() {
        bail!("`trainer {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// rumqttd on a loopback port, in this process.
fn start_broker(port: u16) -> Result<()> {
    let config: rumqttd::Config = serde_json::from_value(serde_json::json!({
        "id": 0,
        "router": {
            "max_connections": 100,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104857600,
            "max_segment_count": 10,
        },
        "v4": {
            "1": {
                "name": "demo",
                "listen": format!("127.0.0.1:{port}"),
                "next_connection_delay_ms": 1,
                "connections": {
                    "connection_timeout_ms": 60000,
                    "max_payload_size": 4 << 20,
                    "max_inflight_count": 500,
                    "dynamic_filters": true,
                },
            },
        },
    }))
    .context("broker configuration")?;
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = rumqttd::Broker::new(config).start() {
                eprintln!("demo broker stopped: {e}");
            }
        })?;
    // Listening once the port cannot be bound (a probe connection would log an error there).
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        if Instant::now() > until {
            bail!("the in-process MQTT broker did not start on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Records the verdicts a device publishes and prints each as it arrives.
fn watch_verdicts(
    host: &str,
    port: u16,
    topic: String,
) -> Result<Arc<Mutex<BTreeMap<u64, Verdict>>>> {
    let seen: Arc<Mutex<BTreeMap<u64, Verdict>>> = Default::default();
    let mut options =
        rumqttc::MqttOptions::new(format!("demo-watch-{}", std::process::id()), host, port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 64);
    client.subscribe(&topic, rumqttc::QoS::AtLeastOnce)?;
    let log = seen.clone();
    std::thread::Builder::new()
        .name("verdicts".into())
        .spawn(move || {
            let _client = client;
            for event in connection.iter() {
                let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event else {
                    if event.is_err() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    continue;
                };
                let Ok(v) = Verdict::decode(&p.payload) else {
                    continue;
                };
                let mut log = log.lock().expect("lock");
                if log.contains_key(&v.id) {
                    continue; // a redelivery
                }
                let failing: Vec<String> = v
                    .defects
                    .iter()
                    .filter(|d| d.fails)
                    .map(|d| {
                        format!(
                            "{} {:.2} [{:.0},{:.0},{:.0},{:.0}]",
                            d.class, d.score, d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3]
                        )
                    })
                    .collect();
                println!(
                    "  frame {:>4}  line {:>6}  {}  model v{}  {:>4.0} ms  {}",
                    v.frame,
                    v.line,
                    if v.pass { "PASS" } else { "FAIL" },
                    v.model.as_ref().map_or(0, |m| m.1),
                    v.latency_ms,
                    failing.join("; ")
                );
                log.insert(v.id, v);
            }
        })?;
    Ok(seen)
}

struct Daemon(Child);

impl Daemon {
    /// SIGTERM: the daemon finishes the frames in hand, delivers its verdicts and exits.
    fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { kill(pid, 15) };
        }
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The strip the daemon inspects (the same parameters make the same frames and defects).
const STRIP: (usize, usize, f64, u64) = (2, 200, 0.4, 2026);

pub fn run(o: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    let mut stage = Stage {
        n: 0,
        total: 10,
        started,
    };
    let out = &o.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let p = |n: &str| out.join(n).display().to_string();
    for (what, path) in [("--base", &o.base), ("--factory", &o.factory)] {
        if !path.exists() {
            bail!(
                "{what} {}: not found (run the demo from the repository, or pass {what})",
                path.display()
            );
        }
    }
    let smoke = o.budget == Budget::Smoke;
    // The new model must be newer than the factory one: devices refuse downgrades.
    let release_pub = std::fs::read_to_string(
        o.factory
            .parent()
            .map(|d| d.join("release.pub"))
            .context("factory path")?,
    )
    .context("the release key (release.pub) next to the factory package")?;
    let factory_version = protocol::package::Package::read(&o.factory)?
        .verify(&[protocol::package::parse_public_key(release_pub.trim())?])
        .with_context(|| {
            format!(
                "{}: not signed by release.pub beside it",
                o.factory.display()
            )
        })?
        .version;
    let version = factory_version + 1;
    let version_arg = version.to_string();
    let package = p(&format!("demo-v{version}.edgepkg"));

    stage.next("MQTT broker");
    let (host, port) = match &o.broker {
        Some(b) => {
            let (h, port) = b.rsplit_once(':').unwrap_or((b.as_str(), "1883"));
            let port: u16 = port
                .parse()
                .with_context(|| format!("--broker {b}: port"))?;
            println!("using the broker at {h}:{port}");
            (h.to_string(), port)
        }
        None => {
            let port = free_port()?;
            start_broker(port)?;
            println!("rumqttd (in-process) listening on 127.0.0.1:{port}");
            ("127.0.0.1".to_string(), port)
        }
    };
    let broker = format!("{host}:{port}");

    stage.next("Signing key for this demo's models");
    trainer(&["keygen", "--out", &p("keys"), "--name", "demo"])?;

    stage.next("Data");
    let data = match &o.data {
        Some(d) => {
            println!("using {}", d.display());
            d.display().to_string()
        }
        None => {
            trainer(&[
                "synth",
                "--out",
                &p("data"),
                "--per-class",
                if smoke { "3" } else { "20" },
                "--clean",
                if smoke { "3" } else { "20" },
                "--seed",
                "7",
            ])?;
            p("data")
        }
    };

    stage.next("SimCLR pretraining on the images (labels unused)");
    // Standard: 140 images, ~7 steps of 16 per epoch; smoke: 21 images, 2 steps.
    trainer(&[
        "pretrain",
        "--data",
        &data,
        "--out",
        &p("simclr"),
        "--size",
        "nano",
        "--batch-size",
        if smoke { "8" } else { "16" },
        "--epochs",
        if smoke { "1" } else { "20" },
    ])?;

    stage.next("Few-shot fine-tuning (5 labeled images per class, 5 defect-free)");
    let init = if o.from_simclr {
        p("simclr/backbone.safetensors")
    } else {
        o.base.display().to_string()
    };
    println!("starting from {init}");
    trainer(&[
        "finetune",
        "--data",
        &data,
        "--init",
        &init,
        "--shots",
        "5",
        "--out",
        &p("finetune"),
        // 36 images (5 per class, 5 clean): 4 steps of 8 per epoch. A gentle rate: 36 images
        // pull a model away from what it knew quickly.
        "--epochs",
        if smoke { "1" } else { "20" },
        "--batch-size",
        "8",
        "--lr",
        "1e-4",
        "--warmup-epochs",
        "1",
        "--eval-every",
        if smoke { "1" } else { "5" },
        "--seed",
        "1",
    ])?;
    // The checkpoint with the best validation mAP (the last one when only the end is evaluated).
    let trained = Some(out.join("finetune/best.safetensors"))
        .filter(|b| b.exists())
        .unwrap_or_else(|| out.join("finetune/model.safetensors"));

    stage.next("Evaluation on the validation split");
    trainer(&[
        "eval",
        "--model",
        &trained.display().to_string(),
        "--data",
        &data,
        "--out",
        &p("report"),
    ])?;

    stage.next("Compression (INT8 weights after a sensitivity scan) and signing");
    trainer(&[
        "compress",
        "--model",
        &trained.display().to_string(),
        "--int8",
        "--data",
        &data,
        "--calibration-images",
        if smoke { "4" } else { "16" },
        "--out",
        &p("model-int8.safetensors"),
    ])?;
    let golden = if o.data.is_some() {
        // Any image of the set the model was evaluated on.
        std::fs::read_dir(Path::new(&data).join("images"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.is_file())
            .context("no image to use as a golden sample")?
    } else {
        out.join("data/images/scratches_1.jpg")
    };
    trainer(&[
        "package",
        "--model",
        &p("model-int8.safetensors"),
        "--key",
        &p("keys/demo.key"),
        "--version",
        &version_arg,
        "--id",
        "demo-strip",
        "--golden",
        &golden.display().to_string(),
        "--metrics",
        &p("report/report.json"),
        "--out",
        &package,
    ])?;

    stage.next("Edge daemon: factory model, inspecting a synthetic strip");
    let edge_bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("edge"))
        .filter(|e| e.exists())
        .context("the edge binary is not next to trainer: build with `cargo build --release --workspace`")?;
    let http_port = free_port()?;
    let token = format!("{:032x}", rand::RngExt::random::<u128>(&mut rand::rng()));
    let demo_pub = std::fs::read_to_string(out.join("keys/demo.pub"))?;
    let (tiles, height, rate, seed) = STRIP;
    let fps = if smoke { 10.0 } else { 3.0 };
    let edge_dir = out.join("edge");
    std::fs::create_dir_all(&edge_dir)?;
    let _ = std::fs::remove_dir_all(edge_dir.join("state"));
    let config = format!(
        r#"# Written by `trainer demo`.
[device]
id = "demo-01"
site = "demo"
line = "line1"

[storage]
dir = "state"

[mqtt]
host = "{host}"
port = {port}
keep_alive_s = 5

[models]
trusted_keys = ["{release}", "{demo}"]
factory = "{factory}"
confirm_after_s = 10

[http]
listen = "127.0.0.1:{http_port}"

[source]
kind = "synthetic"
tiles = {tiles}
frame_height = {height}
defect_rate = {rate}
seed = {seed}
fps = {fps}

[pipeline]
tile = 200
tile_overlap = 0
on_full = "block"

[rules]
min_score = 0.15

[review]
labelers = {{ demo = "{token}" }}
pass_rate = 0.05
"#,
        release = release_pub.trim(),
        demo = demo_pub.trim(),
        factory = o.factory.canonicalize()?.display(),
    );
    std::fs::write(edge_dir.join("edge.toml"), config)?;
    let topics = protocol::topics::Topics::new("demo")?;
    let seen = watch_verdicts(
        &host,
        port,
        topics.up("line1", "demo-01", protocol::topics::UpKind::Verdict),
    )?;
    let log = std::fs::File::create(edge_dir.join("edge.log"))?;
    let mut daemon = Daemon(
        Command::new(&edge_bin)
            .args(["run", "--config"])
            .arg(edge_dir.join("edge.toml"))
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting the edge daemon")?,
    );
    println!(
        "edge daemon pid {} (log {}); verdicts as they arrive over MQTT:",
        daemon.0.id(),
        edge_dir.join("edge.log").display()
    );
    // Let the factory model judge a few frames first.
    let until = Instant::now() + Duration::from_secs(60);
    while seen.lock().expect("lock").len() < 3 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }

    stage.next("Rollout of the new model over MQTT (signed, chunked, self-tested)");
    trainer(&[
        "publish",
        &package,
        "--to",
        "device:demo-01",
        "--broker",
        &broker,
        "--site",
        "demo",
        "--verify-with",
        &p("keys/demo.pub"),
        "--chunk-kib",
        "64",
        "--timeout",
        "120",
    ])?;

    stage.next("Inspection with the new model");
    let until = Instant::now() + Duration::from_secs((o.frames as f64 / fps) as u64 * 3 + 60);
    loop {
        let n = seen
            .lock()
            .expect("lock")
            .values()
            .filter(|v| v.model.as_ref().is_some_and(|m| m.1 == version))
            .count() as u64;
        if n >= o.frames {
            break;
        }
        if Instant::now() > until {
            println!(
                "(stopped waiting: {n} of {} verdicts by the new model)",
                o.frames
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !o.keep_running {
        daemon.stop();
    }
    std::thread::sleep(Duration::from_millis(500));

    // Summary, checked against the strip's ground truth.
    // The strip is redrawn from its seed; a frame is defective when a defect reaches into the
    // strip lines its verdict says it covers.
    let verdicts: Vec<Verdict> = seen.lock().expect("lock").values().cloned().collect();
    let end = verdicts
        .iter()
        .map(|v| v.line + v.height as u64)
        .max()
        .unwrap_or(0);
    let mut strip = edge_detector::synth::Strip::new(tiles, rate, seed);
    let mut defects = Vec::new();
    loop {
        let band = strip.next_band();
        if band.top >= end {
            break;
        }
        defects.extend(band.defects);
    }
    let truth: BTreeMap<u64, bool> = verdicts
        .iter()
        .map(|v| {
            let (top, bottom) = (v.line as f32, (v.line + v.height as u64) as f32);
            (v.frame, defects.iter().any(|d| d.within_lines(top, bottom)))
        })
        .collect();
    let mut by_version: BTreeMap<u64, (usize, usize, usize, Vec<f64>)> = BTreeMap::new();
    for v in &verdicts {
        let ver = v.model.as_ref().map_or(0, |m| m.1);
        let e = by_version.entry(ver).or_default();
        e.0 += 1;
        e.1 += (!v.pass) as usize;
        if truth.get(&v.frame) == Some(&!v.pass) {
            e.2 += 1;
        }
        e.3.push(v.latency_ms);
    }
    let report = out.join("report/report.md");
    println!(
        "\n=== Summary ({:.1} min)",
        started.elapsed().as_secs_f64() / 60.0
    );
    println!("frames inspected: {}", verdicts.len());
    for (v, (n, fails, agree, mut lat)) in by_version {
        lat.sort_by(f64::total_cmp);
        let q = |f: f64| lat[((lat.len() - 1) as f64 * f) as usize];
        println!(
            "  model v{v} ({}): {n} frames, {fails} failed, {agree}/{n} agree with the strip's ground truth ({:.0}%), latency p50 {:.0} ms, p99 {:.0} ms",
            if v == version {
                "demo-strip, just trained"
            } else {
                "factory NEU-DET model"
            },
            100.0 * agree as f64 / n as f64,
            q(0.5),
            q(0.99),
        );
    }
    println!("evaluation report: {}", report.display());
    println!(
        "training curves: {}",
        out.join("finetune/curves.png").display()
    );
    println!("labeling page: http://127.0.0.1:{http_port}/label  (token {token})");
    println!("metrics: http://127.0.0.1:{http_port}/metrics");
    if o.keep_running {
        println!("\nThe daemon and the broker keep running; Ctrl-C ends the demo.");
        let (tx, rx) = std::sync::mpsc::channel();
        ctrlc::set_handler(move || {
            let _ = tx.send(());
        })?;
        let _ = rx.recv();
    }
    drop(daemon);
    if verdicts.is_empty() {
        bail!(
            "no verdict arrived from the daemon; see {}",
            edge_dir.join("edge.log").display()
        );
    }
    Ok(())
}
