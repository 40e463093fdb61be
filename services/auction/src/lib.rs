//! The auction: ranks candidates by eCPM = bid x pCTR and charges each winner
//! the generalized second price, subject to a reserve.
//!
//! [`auction`] is the pure algorithm; [`service`] is its gRPC face.

pub mod auction;
pub mod config;
pub mod service;

pub use auction::{AuctionError, Candidate, Winner, run_auction, sample_candidates};
pub use config::AuctionConfig;
pub use service::AuctionGrpc;
