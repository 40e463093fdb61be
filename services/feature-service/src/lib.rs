//! The feature-service: assembles one feature matrix per ad request from the
//! batch tier (DynamoDB), the real-time tier (Redis) and the request context,
//! exactly as the feature registry defines it.
//!
//! Each source has its own deadline. A source that fails or is late costs at
//! most that deadline: its features take registry defaults and the response
//! names the degradation. COPPA requests never read personal features.
//!
//! The same binary runs the streaming aggregates ([`aggregates`]) that keep
//! the real-time tier's counters from the impressions and clicks topics
//! (`mode`: serve, aggregate or both).

pub mod ad_table;
pub mod aggregates;
pub mod backfill;
pub mod batch;
pub mod breaker;
pub mod config;
pub mod freshness;
pub mod realtime;
pub mod service;
pub mod user_cache;

pub use ad_table::AdTable;
pub use adserve_features::{SourceValues, assemble};
pub use aggregates::Aggregator;
pub use batch::{AdLookup, BatchRow, BatchStore};
pub use config::FeatureServiceConfig;
pub use realtime::RealtimeStore;
pub use service::FeatureGrpc;
pub use user_cache::{UserCache, UserCacheConfig};
