//! `adserve-bench`: every path of the system measured next to its peer or
//! floor in the same run. See docs/benchmarks.md for what each part measures.
//!
//! The parts: [`e2e`] (open-loop load on the gateway, HTTP and gRPC),
//! [`features`] (GetFeatures next to Feast and a raw Redis MGET), [`ranker`]
//! (Score next to a bare `session.run` and a FastAPI + onnxruntime server),
//! [`auction`] (criterion in-process figures next to the same over gRPC) and
//! [`joiner`] (label-joiner throughput next to a consume-only reader) and
//! [`aggregates`] (the streaming aggregates' throughput next to the same
//! reader, and their freshness next to the broker's delivery latency).

pub mod aggregates;
pub mod auction;
pub mod criterion;
pub mod e2e;
pub mod features;
pub mod joiner;
pub mod load;
pub mod peers;
pub mod prom;
pub mod ranker;
pub mod report;

use std::{path::PathBuf, time::Duration};

use crate::Stack;

/// Run-wide settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Short windows (the whole run well under 5 minutes).
    pub quick: bool,
    /// The stack under test.
    pub stack: Stack,
    /// Where peers keep state and logs, and where results go.
    pub work_dir: PathBuf,
    /// Python of the peers' venv.
    pub peer_python: PathBuf,
    /// Directory of the service binaries under test (the bench's own profile).
    pub bin_dir: PathBuf,
    /// Cargo target dir (criterion writes its estimates there).
    pub target_dir: PathBuf,
    /// `libonnxruntime.so`, for the bare session baseline.
    pub ort_dylib: PathBuf,
    /// The model the stack's ranker serves.
    pub model_dir: PathBuf,
    /// `host:port` of the gateway's Prometheus endpoint.
    pub gateway_metrics: String,
}

impl Settings {
    /// Measured window of one closed-loop case.
    pub fn window(&self) -> Duration {
        if self.quick { Duration::from_secs(2) } else { Duration::from_secs(8) }
    }

    /// Unrecorded warm-up before each case.
    pub fn warmup(&self) -> Duration {
        if self.quick { Duration::from_millis(300) } else { Duration::from_secs(1) }
    }

    /// Measured window of one open-loop rate step.
    pub fn step(&self) -> Duration {
        if self.quick { Duration::from_secs(4) } else { Duration::from_secs(15) }
    }
}

/// A parsed `host:port` of a URL, for children that need a bare address.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or_default().to_string()
}
