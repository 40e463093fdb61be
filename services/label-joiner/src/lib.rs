//! The label-joiner: consumes impressions and clicks, labels each impression
//! 1 when a click for it arrives within the label window (0 otherwise), and
//! writes the rows, with the exact feature row that was served, to Parquet.
//!
//! Exactly-once into files: Kafka offsets are committed only after the
//! Parquet file holding their rows is durable (fsync + atomic rename), and
//! each file records the offsets it covers, so a restart skips rows that were
//! written but whose offsets were not yet committed.

pub mod calibration;
pub mod config;
pub mod join;
pub mod runner;
pub mod service;
pub mod sink;
pub mod store;

pub use config::LabelJoinerConfig;
pub use join::{JoinRules, Joiner, LabelledRow, Mode, RowKind, WrittenRow};
pub use sink::ParquetSink;
