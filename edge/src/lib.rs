//! Edge inspection: the Swin defect detector (`detector`) and the device selection it runs on.

pub mod detector;
pub mod device;
