//! GenICam acquisition through Aravis (cargo feature `genicam`; the configuration is
//! [`super::genicam`]).
//!
//! One acquisition thread owns the Aravis camera and stream: it sets the pixel format, the
//! trigger and the GenICam features named in the config, keeps `buffers` stream buffers queued,
//! fires software triggers at the configured rate, converts each complete buffer to grey (Mono8,
//! Mono16 scaled to its bit depth, Bayer through a 2x2 box filter) and hands it over a bounded
//! queue (a full queue drops the frame, counted). An incomplete buffer becomes a bad frame (the
//! fail-safe verdict). A camera that goes away (its control channel lost, or no buffer for
//! `lost_after_ms` while free-running or software-triggered) is logged by name and counted; the
//! thread reopens it every second and acquisition resumes where it left off: frames already
//! handed over are inspected as usual, and the gap is in `edge_camera_gap_milliseconds_total`.
//!
//! Line-scan cameras: with `line_scan`, consecutive buffers are rows of one continuous strip,
//! assembled into overlapping frames stamped with their strip line, as for the other line-scan
//! sources.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aravis::glib::object::ObjectExt;
use aravis::prelude::*;
use aravis::{Camera, Stream};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::genicam::{GenicamConfig, Trigger, to_grey};
use super::{Frame, FrameSource, LineScanAssembler, SourceError, now_ms};

/// The line engineer's counters (`edge_camera_*` in `/metrics`).
#[derive(Default)]
pub struct CameraMetrics {
    pub frames: Counter,
    pub incomplete: Counter,
    pub dropped: Counter,
    pub resent_packets: Gauge,
    pub missing_packets: Gauge,
    pub losses: Counter,
    pub gap_ms: Counter,
    pub connected: Gauge,
}

impl CameraMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "camera_frames",
            "Complete buffers received from the GenICam camera",
            self.frames.clone(),
        );
        r.register(
            "camera_incomplete_buffers",
            "Buffers that arrived incomplete (missing packets, timeout, size mismatch): bad frames",
            self.incomplete.clone(),
        );
        r.register(
            "camera_dropped_frames",
            "Buffers dropped because the pipeline's queue was full",
            self.dropped.clone(),
        );
        r.register(
            "camera_resent_packets",
            "GigE Vision packets the camera resent (since the stream opened)",
            self.resent_packets.clone(),
        );
        r.register(
            "camera_missing_packets",
            "GigE Vision packets never received (since the stream opened)",
            self.missing_packets.clone(),
        );
        r.register(
            "camera_losses",
            "Times the camera went away (control lost or no buffer for lost_after_ms)",
            self.losses.clone(),
        );
        r.register(
            "camera_gap_milliseconds",
            "Time without the camera, summed over its losses",
            self.gap_ms.clone(),
        );
        r.register(
            "camera_connected",
            "1 while the camera is acquiring",
            self.connected.clone(),
        );
    }
}

/// Aravis keeps global state (the device list): one token for the process.
fn aravis() -> &'static std::sync::Mutex<Option<aravis::Aravis>> {
    static TOKEN: OnceLock<std::sync::Mutex<Option<aravis::Aravis>>> = OnceLock::new();
    TOKEN.get_or_init(|| std::sync::Mutex::new(aravis::Aravis::initialize().ok()))
}

/// The GenICam cameras this machine sees: id, vendor, model, address.
pub fn list() -> Vec<String> {
    let token = aravis().lock().expect("lock");
    let Some(token) = token.as_ref() else {
        return vec![];
    };
    token
        .get_device_list()
        .into_iter()
        .map(|d| {
            format!(
                "{} ({} {}, {} at {})",
                d.id.to_string_lossy(),
                d.vendor.to_string_lossy(),
                d.model.to_string_lossy(),
                d.protocol.to_string_lossy(),
                d.address.to_string_lossy()
            )
        })
        .collect()
}

pub struct GenicamSource {
    frames: Receiver<Result<Frame, SourceError>>,
    name: String,
    metrics: Arc<CameraMetrics>,
    stop: Arc<AtomicBool>,
}

impl GenicamSource {
    /// Opens the camera (an error names it and why) and starts acquisition.
    pub fn open(config: GenicamConfig) -> Result<Self, SourceError> {
        if config.buffers == 0 || !(1..=16).contains(&config.pixel_bits) {
            return Err(SourceError::Fatal(
                "genicam: buffers must be >= 1 and pixel_bits within 1..16".into(),
            ));
        }
        if config.trigger == Trigger::Software && config.software_trigger_hz <= 0.0 {
            return Err(SourceError::Fatal(
                "genicam: software_trigger_hz must be > 0".into(),
            ));
        }
        let name = config
            .camera
            .clone()
            .unwrap_or_else(|| "(first camera)".into());
        let metrics = Arc::new(CameraMetrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(config.buffers);
        let (opened_tx, opened_rx) = sync_channel(1);
        let thread = Acquisition {
            config,
            name: name.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            frames: tx,
        };
        std::thread::Builder::new()
            .name("genicam".into())
            .spawn(move || thread.run(opened_tx))
            .map_err(|e| SourceError::Fatal(format!("genicam: thread: {e}")))?;
        match opened_rx.recv() {
            Ok(Ok(described)) => {
                tracing::info!("genicam: {described}");
                Ok(Self {
                    frames: rx,
                    name: described,
                    metrics,
                    stop,
                })
            }
            Ok(Err(e)) => Err(SourceError::Fatal(format!("genicam camera {name}: {e}"))),
            Err(_) => Err(SourceError::Fatal(format!(
                "genicam camera {name}: the acquisition thread ended"
            ))),
        }
    }
}

impl Drop for GenicamSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl FrameSource for GenicamSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        match self.frames.recv() {
            Ok(frame) => frame.map(Some),
            Err(_) => Ok(None),
        }
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }
}

struct Acquisition {
    config: GenicamConfig,
    name: String,
    metrics: Arc<CameraMetrics>,
    stop: Arc<AtomicBool>,
    frames: SyncSender<Result<Frame, SourceError>>,
}

struct Opened {
    camera: Camera,
    stream: Stream,
    control_lost: Arc<AtomicBool>,
}

impl Acquisition {
    fn run(self, opened: SyncSender<Result<String, String>>) {
        let mut assembler = self
            .config
            .line_scan
            .as_ref()
            .map(|_| None::<LineScanAssembler>);
        let mut seq = 0u64;
        let mut first = Some(opened);
        let mut lost_at: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let cam = match self.open() {
                Ok(cam) => cam,
                Err(e) => {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let described = format!(
                "GenICam camera {} ({} {}), {}, trigger {:?}",
                self.name,
                cam.camera
                    .vendor_name()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                cam.camera
                    .model_name()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                self.config.pixel_format.name(),
                self.config.trigger
            );
            if let Some(tx) = first.take() {
                let _ = tx.send(Ok(described));
            }
            if let Some(t) = lost_at.take() {
                let gap = t.elapsed();
                self.metrics.gap_ms.inc_by(gap.as_millis() as u64);
                tracing::warn!(
                    "genicam: camera {} is back after {:.1} s: acquisition resumes",
                    self.name,
                    gap.as_secs_f64()
                );
            }
            self.metrics.connected.set(1);
            let why = self.acquire(&cam, &mut assembler, &mut seq);
            let _ = cam.camera.stop_acquisition();
            self.metrics.connected.set(0);
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            self.metrics.losses.inc();
            tracing::error!(
                "genicam: camera {} lost ({why}); inspection waits for it, reconnecting every second",
                self.name
            );
            lost_at = Some(Instant::now());
            // A partial line-scan frame does not continue across the gap.
            if let Some(a) = assembler.as_mut() {
                *a = None;
            }
        }
    }

    fn open(&self) -> Result<Opened, String> {
        // Re-read the device list so that a camera that came back is found.
        drop(list());
        let camera = Camera::new(self.config.camera.as_deref()).map_err(|e| e.to_string())?;
        let c = &self.config;
        camera
            .set_pixel_format_from_string(c.pixel_format.name())
            .map_err(|e| format!("pixel format {}: {e}", c.pixel_format.name()))?;
        camera
            .set_acquisition_mode(aravis::AcquisitionMode::Continuous)
            .map_err(|e| format!("acquisition mode: {e}"))?;
        match c.trigger {
            Trigger::Free => camera.clear_triggers(),
            Trigger::Software => camera.set_trigger("Software"),
            Trigger::Hardware => camera.set_trigger(&c.trigger_source),
        }
        .map_err(|e| format!("trigger {:?}: {e}", c.trigger))?;
        for (name, value) in &c.features {
            let set = match value {
                toml::Value::Float(v) => camera.set_float(name, *v),
                toml::Value::Integer(v) => camera.set_integer(name, *v),
                toml::Value::Boolean(v) => camera.set_boolean(name, *v),
                toml::Value::String(v) => camera.set_string(name, v),
                other => return Err(format!("feature {name}: unsupported value {other}")),
            };
            set.map_err(|e| format!("feature {name} = {value}: {e}"))?;
        }
        let control_lost = Arc::new(AtomicBool::new(false));
        if let Some(device) = camera.device() {
            let flag = control_lost.clone();
            device.connect_control_lost(move |_| flag.store(true, Ordering::Relaxed));
        }
        let stream = camera.create_stream().map_err(|e| format!("stream: {e}"))?;
        let payload = camera.payload().map_err(|e| format!("payload size: {e}"))? as usize;
        for _ in 0..self.config.buffers {
            stream.push_buffer(aravis::Buffer::new_allocate(payload));
        }
        camera
            .start_acquisition()
            .map_err(|e| format!("start acquisition: {e}"))?;
        Ok(Opened {
            camera,
            stream,
            control_lost,
        })
    }

    /// Runs until the camera is lost (returns why) or the source is stopped.
    fn acquire(
        &self,
        cam: &Opened,
        assembler: &mut Option<Option<LineScanAssembler>>,
        seq: &mut u64,
    ) -> String {
        let c = &self.config;
        let period = Duration::from_secs_f64(1.0 / c.software_trigger_hz.max(1e-3));
        let mut next_trigger = Instant::now();
        let mut last_buffer = Instant::now();
        // The GigE Vision packet counters are looked up by name: once a second, not per buffer.
        let mut counters_read = Instant::now();
        let lost_after = Duration::from_millis(c.lost_after_ms);
        while !self.stop.load(Ordering::Relaxed) {
            if cam.control_lost.load(Ordering::Relaxed) {
                return "control channel lost".into();
            }
            if c.trigger == Trigger::Software && Instant::now() >= next_trigger {
                if let Err(e) = cam.camera.software_trigger() {
                    return format!("software trigger: {e}");
                }
                next_trigger += period;
                if next_trigger < Instant::now() {
                    next_trigger = Instant::now() + period;
                }
            }
            let wait = if c.trigger == Trigger::Software {
                next_trigger
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            } else {
                Duration::from_millis(100)
            };
            let Some(buffer) = cam
                .stream
                .timeout_pop_buffer(wait.as_micros().max(1000) as u64)
            else {
                if c.trigger != Trigger::Hardware && last_buffer.elapsed() > lost_after {
                    return format!("no buffer for {} ms", c.lost_after_ms);
                }
                continue;
            };
            last_buffer = Instant::now();
            let frame = self.convert(&buffer, assembler, seq);
            cam.stream.push_buffer(buffer);
            if counters_read.elapsed() >= Duration::from_secs(1) {
                self.update_stream_counters(&cam.stream);
                counters_read = Instant::now();
            }
            for f in frame {
                match self.frames.try_send(f) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        self.metrics.dropped.inc();
                    }
                    Err(TrySendError::Disconnected(_)) => return "source closed".into(),
                }
            }
        }
        "stopped".into()
    }

    fn update_stream_counters(&self, stream: &Stream) {
        if stream.is::<aravis::GvStream>() {
            let resent = stream.info_uint64_by_name("n_resent_packets");
            let missing = stream.info_uint64_by_name("n_missing_packets");
            self.metrics.resent_packets.set(resent as i64);
            self.metrics.missing_packets.set(missing as i64);
        }
    }

    /// The buffer as frames (several or none in line-scan mode), or a bad frame.
    fn convert(
        &self,
        buffer: &aravis::Buffer,
        assembler: &mut Option<Option<LineScanAssembler>>,
        seq: &mut u64,
    ) -> Vec<Result<Frame, SourceError>> {
        let origin = format!("{}#{}", self.name, buffer.frame_id());
        let bad = |reason: String| {
            vec![Err(SourceError::BadFrame {
                origin: origin.clone(),
                reason,
            })]
        };
        let status = buffer.status();
        if status != aravis::BufferStatus::Success {
            self.metrics.incomplete.inc();
            return bad(format!("incomplete camera buffer ({status:?})"));
        }
        let (width, height) = (
            buffer.image_width() as usize,
            buffer.image_height() as usize,
        );
        let (ptr, len) = buffer.data();
        // SAFETY: Aravis owns `len` bytes at `ptr` until the buffer is pushed back, which
        // happens after this function returns; they are only read here.
        let data = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let grey = match to_grey(
            data,
            width,
            height,
            self.config.pixel_format,
            self.config.pixel_bits,
        ) {
            Ok(g) => g,
            Err(reason) => {
                self.metrics.incomplete.inc();
                return bad(reason);
            }
        };
        self.metrics.frames.inc();
        match assembler {
            None => {
                let frame = Frame {
                    seq: *seq,
                    line: 0,
                    captured_ms: now_ms(),
                    image: grey,
                    origin,
                    truth: vec![],
                    position_mm: None,
                };
                *seq += 1;
                vec![Ok(frame)]
            }
            Some(slot) => {
                let ls = self.config.line_scan.as_ref().expect("line_scan set");
                if slot.as_ref().is_some_and(|a| a.width() != width) {
                    *slot = None;
                }
                if slot.is_none() {
                    match LineScanAssembler::new(width, ls.frame_height, ls.overlap) {
                        Ok(a) => *slot = Some(a),
                        Err(e) => return vec![Err(e)],
                    }
                }
                let a = slot.as_mut().expect("set above");
                match a.push(grey.as_raw()) {
                    Ok(frames) => frames
                        .into_iter()
                        .map(|mut f| {
                            f.origin = origin.clone();
                            f.position_mm = ls.line_pitch_mm.map(|p| f.line as f64 * p);
                            Ok(f)
                        })
                        .collect(),
                    Err(e) => vec![Err(e)],
                }
            }
        }
    }
}
