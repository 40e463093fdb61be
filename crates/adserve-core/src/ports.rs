//! Default ports of every service: the one definition. Config defaults and
//! upstream URLs derive from it; `scripts/env.sh` (the local stack) mirrors
//! it, and `integration-tests/tests/one_definition.rs` fails when they drift.

/// Gateway HTTP/JSON.
pub const GATEWAY_HTTP: u16 = 8080;
/// Gateway gRPC.
pub const GATEWAY_GRPC: u16 = 50051;
/// Gateway metrics.
pub const GATEWAY_METRICS: u16 = 9101;
/// Feature-service gRPC.
pub const FEATURE_SERVICE_GRPC: u16 = 50052;
/// Feature-service metrics.
pub const FEATURE_SERVICE_METRICS: u16 = 9102;
/// Ranker gRPC.
pub const RANKER_GRPC: u16 = 50053;
/// Ranker metrics.
pub const RANKER_METRICS: u16 = 9103;
/// Auction gRPC.
pub const AUCTION_GRPC: u16 = 50054;
/// Auction metrics.
pub const AUCTION_METRICS: u16 = 9104;
/// Label-joiner gRPC.
pub const LABEL_JOINER_GRPC: u16 = 50055;
/// Label-joiner metrics.
pub const LABEL_JOINER_METRICS: u16 = 9105;

/// Every port by its `scripts/env.sh` variable name.
pub const ALL: [(&str, u16); 11] = [
    ("GATEWAY_HTTP_PORT", GATEWAY_HTTP),
    ("GATEWAY_GRPC_PORT", GATEWAY_GRPC),
    ("GATEWAY_METRICS_PORT", GATEWAY_METRICS),
    ("FEATURE_SERVICE_GRPC_PORT", FEATURE_SERVICE_GRPC),
    ("FEATURE_SERVICE_METRICS_PORT", FEATURE_SERVICE_METRICS),
    ("RANKER_GRPC_PORT", RANKER_GRPC),
    ("RANKER_METRICS_PORT", RANKER_METRICS),
    ("AUCTION_GRPC_PORT", AUCTION_GRPC),
    ("AUCTION_METRICS_PORT", AUCTION_METRICS),
    ("LABEL_JOINER_GRPC_PORT", LABEL_JOINER_GRPC),
    ("LABEL_JOINER_METRICS_PORT", LABEL_JOINER_METRICS),
];

/// `http://127.0.0.1:{port}`, the default URL of a local upstream.
pub fn local_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}
