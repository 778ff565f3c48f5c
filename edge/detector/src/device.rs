//! Choosing the compute device at run time from a config value or flag.

use burn::prelude::*;

/// The backends this build can run on. `wgpu` and `cuda` exist only when compiled in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// Pure-Rust CPU backend (always available).
    Flex,
    /// Vulkan / Metal / DX12 through wgpu (cargo feature `wgpu`).
    Wgpu,
    /// NVIDIA GPU 0 through CUDA (cargo feature `cuda`).
    Cuda,
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceUnavailable {
    #[error("device `{0}` is not compiled into this build: rebuild with `--features {0}`")]
    NotCompiled(&'static str),
    /// The backend is compiled in but could not start (no driver, no GPU).
    #[error("device `{device}` could not start: {reason}{hint}")]
    NoStart {
        device: &'static str,
        reason: String,
        hint: &'static str,
    },
}

impl DeviceChoice {
    /// The device, started and checked with one small computation: a GPU backend without a
    /// driver or a GPU is an error naming what is missing, not a panic later.
    pub fn device(self) -> Result<Device, DeviceUnavailable> {
        match self {
            DeviceChoice::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            DeviceChoice::Wgpu => probe("wgpu", "", || Device::wgpu(DeviceKind::DefaultDevice)),
            #[cfg(not(feature = "wgpu"))]
            DeviceChoice::Wgpu => Err(DeviceUnavailable::NotCompiled("wgpu")),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda => probe(
                "cuda",
                " (needs the NVIDIA driver's libcuda.so.1 and an NVIDIA GPU; on JetPack 6 set CUDARC_CUDA_VERSION=12060)",
                || Device::cuda(0),
            ),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda => Err(DeviceUnavailable::NotCompiled("cuda")),
        }
    }
}

/// Starts a GPU device and runs one tiny computation on it. The backends panic when the driver
/// or the device is missing; the panic is caught (its message kept, its backtrace not printed)
/// and becomes [`DeviceUnavailable::NoStart`].
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe(
    device: &'static str,
    hint: &'static str,
    start: impl FnOnce() -> Device + std::panic::UnwindSafe,
) -> Result<Device, DeviceUnavailable> {
    // The backend may panic on its own device thread (the first message, e.g. "Unable to
    // dynamically load the cuda shared library", is the reason) and then on this one.
    let first = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let quiet = std::panic::take_hook();
    {
        let first = first.clone();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut first) = first.lock() {
                first.get_or_insert_with(|| info.payload_as_str().unwrap_or("").to_string());
            }
        }));
    }
    let started = std::panic::catch_unwind(|| {
        let d = start();
        let sum: f32 = Tensor::<1>::ones([4], &d).sum().into_scalar();
        (d, sum)
    });
    std::panic::set_hook(quiet);
    match started {
        Ok((d, sum)) => {
            if (sum - 4.0).abs() < 1e-3 {
                Ok(d)
            } else {
                Err(DeviceUnavailable::NoStart {
                    device,
                    reason: format!("a test sum of four ones gave {sum}"),
                    hint,
                })
            }
        }
        Err(_) => {
            let first = first.lock().ok().and_then(|mut f| f.take());
            let reason = first
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "the backend panicked".into());
            // One line: the backends append long lists (every library name they tried).
            let reason = reason.lines().next().unwrap_or_default();
            let reason = reason.split(" - searched").next().unwrap_or(reason);
            Err(DeviceUnavailable::NoStart {
                device,
                reason: reason.to_string(),
                hint,
            })
        }
    }
}
