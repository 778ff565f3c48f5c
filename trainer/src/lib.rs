//! The trainer: data (NEU-DET/VOC, synthetic), fine-tuning the edge detector, evaluation and
//! its reports.

pub mod commands;
pub mod compress;
pub mod data;
pub mod demo;
pub mod ema;
pub mod eval;
pub mod finetune;
pub mod from_edge;
pub mod noisy;
pub mod package;
pub mod precision;
pub mod progress;
pub mod report;
pub mod selftrain;
pub mod simclr;
