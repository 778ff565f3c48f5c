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

#[derive(Debug, thiserror::Error)]
#[error("device `{0}` is not compiled into this build: rebuild with `--features {0}`")]
pub struct DeviceUnavailable(&'static str);

impl DeviceChoice {
    pub fn device(self) -> Result<Device, DeviceUnavailable> {
        match self {
            DeviceChoice::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            DeviceChoice::Wgpu => Ok(Device::wgpu(DeviceKind::DefaultDevice)),
            #[cfg(not(feature = "wgpu"))]
            DeviceChoice::Wgpu => Err(DeviceUnavailable("wgpu")),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda => Ok(Device::cuda(0)),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda => Err(DeviceUnavailable("cuda")),
        }
    }
}
