//! The ranker: scores feature matrices with the active CTR model in ONNX
//! Runtime and returns one pCTR per row.
//!
//! A model is a directory holding `model.onnx` and `manifest.json` (written by
//! `training/`). The manifest's `feature_order` names the dense columns the
//! model reads and its `typed_inputs` the categorical and embedding columns
//! each further input takes; rows are gathered from the request matrix *by
//! name*, so column order on the wire can never silently skew a prediction. Concurrent calls are
//! batched ([`batcher`]) onto a bounded pool of sessions.

pub mod batcher;
pub mod config;
pub mod follow;
pub mod model;
pub mod service;

pub use adserve_registry::Reference;
pub use batcher::{BatchStats, Batcher, QueueKind, ScoreError, Scores};
pub use config::{BatchingConfig, ExecutionProvider, ModelConfig, RankerConfig};
pub use follow::{Canary, Role, Serving, Source};
pub use model::{Block, CtrModel, Input, ModelError, ModelManifest, reference_matrix};
pub use service::RankerGrpc;

#[cfg(test)]
mod tests;
