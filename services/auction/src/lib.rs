//! The auction service: the gRPC face of the pure auction in
//! crates/adserve-auction, with its configuration.

pub mod config;
pub mod service;

pub use config::AuctionConfig;
pub use service::AuctionGrpc;
