//! A V4L2/UVC camera through nokhwa (cargo feature `camera`, on by default).
//!
//! nokhwa's camera handle is not `Send`, so it lives on its own capture thread; the
//! [`CameraSource`] the pipeline sees holds the receiving end of a small channel. Opening happens
//! before `open` returns, so a missing device or an unsupported format stops the daemon at start
//! with the reason, and a camera that disappears later ends the stream with an error naming it.

use std::sync::mpsc;
use std::time::Duration;

use nokhwa::Camera;
use nokhwa::pixel_format::LumaFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
    Resolution,
};

use super::{Frame, FrameSource, PixelFormat, SourceError, now_ms};

/// Frames waiting between the capture thread and the pipeline: a camera cannot be paused, so a
/// slow consumer loses the oldest frames at the pipeline's bounded queue, not here.
const CHANNEL: usize = 4;

/// The video devices this machine has, as "index: name (description)".
pub fn list() -> Result<Vec<String>, String> {
    let cameras = nokhwa::query(ApiBackend::Video4Linux).map_err(|e| e.to_string())?;
    Ok(cameras
        .iter()
        .map(|c| format!("{}: {} ({})", c.index(), c.human_name(), c.description()))
        .collect())
}

pub struct CameraSource {
    frames: mpsc::Receiver<Result<Frame, SourceError>>,
    description: String,
    seq: u64,
}

fn frame_format(p: PixelFormat) -> FrameFormat {
    match p {
        PixelFormat::Mjpeg => FrameFormat::MJPEG,
        PixelFormat::Yuyv => FrameFormat::YUYV,
        PixelFormat::Nv12 => FrameFormat::NV12,
        PixelFormat::Gray => FrameFormat::GRAY,
        PixelFormat::Rgb => FrameFormat::RAWRGB,
    }
}

impl CameraSource {
    /// Opens /dev/video`index` at the closest format the device offers to the one asked for.
    pub fn open(
        index: u32,
        width: u32,
        height: u32,
        fps: u32,
        pixel_format: PixelFormat,
    ) -> Result<Self, SourceError> {
        let name = format!("camera /dev/video{index}");
        if !std::path::Path::new(&format!("/dev/video{index}")).exists() {
            let found = list().unwrap_or_default();
            return Err(SourceError::Fatal(format!(
                "{name}: no such device (this machine has {}{})",
                if found.is_empty() {
                    "no video devices".to_string()
                } else {
                    format!("{} video device(s): ", found.len())
                },
                found.join("; ")
            )));
        }
        let wanted = CameraFormat::new(
            Resolution::new(width, height),
            frame_format(pixel_format),
            fps,
        );
        let (opened_tx, opened_rx) = mpsc::sync_channel::<Result<String, SourceError>>(1);
        let (tx, frames) = mpsc::sync_channel(CHANNEL);
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name("camera".into())
            .spawn(move || {
                let requested =
                    RequestedFormat::new::<LumaFormat>(RequestedFormatType::Closest(wanted));
                let opened = Camera::with_backend(
                    CameraIndex::Index(index),
                    requested,
                    ApiBackend::Video4Linux,
                )
                .and_then(|mut camera| {
                    camera.open_stream()?;
                    Ok(camera)
                });
                let mut camera = match opened {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = opened_tx.send(Err(SourceError::Fatal(format!(
                            "{thread_name}: cannot open: {e}"
                        ))));
                        return;
                    }
                };
                let got = camera.camera_format();
                let _ = opened_tx.send(Ok(format!("{thread_name} at {got}")));
                loop {
                    let frame = camera
                        .frame()
                        .map_err(|e| SourceError::Fatal(format!("{thread_name}: capture: {e}")))
                        .and_then(|buffer| {
                            buffer
                                .decode_image::<LumaFormat>()
                                .map_err(|e| SourceError::BadFrame {
                                    origin: thread_name.clone(),
                                    reason: format!("bad frame: {e}"),
                                })
                        });
                    let fatal = matches!(frame, Err(SourceError::Fatal(_)));
                    let item = frame.map(|image| Frame {
                        seq: 0,
                        line: 0,
                        captured_ms: now_ms(),
                        image,
                        origin: thread_name.clone(),
                        truth: vec![],
                        position_mm: None,
                    });
                    if tx.send(item).is_err() || fatal {
                        break;
                    }
                }
                let _ = camera.stop_stream();
            })
            .map_err(|e| SourceError::Fatal(format!("{name}: capture thread: {e}")))?;
        let description = opened_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| SourceError::Fatal(format!("{name}: did not open within 10 s")))??;
        Ok(Self {
            frames,
            description,
            seq: 0,
        })
    }
}

impl FrameSource for CameraSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        match self.frames.recv() {
            Ok(Ok(mut frame)) => {
                frame.seq = self.seq;
                self.seq += 1;
                Ok(Some(frame))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SourceError::Fatal(format!(
                "{}: capture stopped",
                self.description
            ))),
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_named() {
        let e = CameraSource::open(97, 640, 480, 30, PixelFormat::Mjpeg)
            .err()
            .expect("no /dev/video97 here")
            .to_string();
        assert!(e.contains("camera /dev/video97: no such device"), "{e}");
    }
}
