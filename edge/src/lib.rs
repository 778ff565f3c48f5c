pub mod config;
pub mod daemon;
pub mod detector;
pub mod device;
pub mod models;
pub mod selftest;
pub mod source;
pub mod synth;
