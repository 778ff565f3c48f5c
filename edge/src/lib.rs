//! The edge daemon, in the order frames travel: [`capture`] (sources, cameras, line-scan
//! assembly) -> [`pipeline`] (tiles, batches, the detector, rules) -> [`verdicts`] (store,
//! outbox) -> [`plc`] (the reject gate's Modbus/TCP link) and [`serve`] (HTTP, metrics, review
//! queue, labeling page), with [`models`] (active model, package store, transfers, signed
//! commands) beside them. [`config`] assembles each
//! part's own configuration; [`daemon`] wires the parts together. The detector itself is the
//! `edge-detector` crate; [`faults`] holds the fault points of the fault-injection tests.

pub mod capture;
pub mod config;
pub mod daemon;
pub mod faults;
pub mod identity;
pub mod models;
pub mod pipeline;
pub mod plc;
pub mod serve;
pub mod sim;
pub mod verdicts;
