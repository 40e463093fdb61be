//! The gateway: the system's front door over HTTP/JSON (`POST /v1/ads`,
//! `POST /v1/clicks`) and gRPC (`adserve.v1.GatewayService`).
//!
//! One ad request runs [`pipeline::AdServer::serve`]: catalog eligibility ->
//! feature-service -> ranker -> auction -> one acknowledged ImpressionEvent
//! per winner -> response, within one end-to-end budget ([`budget`]). Each
//! dependency has a deadline carved from it; a slow or dead one
//! degrades the answer (defaults, prior pCTR, in-process auction) and says so,
//! except the catalog and the event log, without which no ad can be served
//! honestly.

pub mod auth;
pub mod budget;
pub mod click_filter;
pub mod click_token;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod openrtb;
pub mod pacing;
pub mod pipeline;
pub mod prediction_cache;
pub mod price_crypto;

pub use config::GatewayConfig;
pub use error::ServeError;
pub use pipeline::AdServer;
