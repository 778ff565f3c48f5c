//! The trainer: data (NEU-DET/VOC, synthetic), fine-tuning the edge detector, evaluation.

pub mod data;
pub mod eval;
