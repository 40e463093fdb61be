//! Which build this is. Services report it as the Prometheus gauge
//! `adserve_build_info{service,version,git_sha,profile} 1` and as JSON on
//! `GET /buildinfo` of their metrics listener (see adserve-core).

/// The workspace version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the build was made from (12 hex digits; local changes are
/// not marked), `unknown` outside a checkout.
pub const GIT_SHA: &str = env!("ADSERVE_GIT_SHA");
/// The cargo profile (`debug`, `release`).
pub const PROFILE: &str = env!("ADSERVE_BUILD_PROFILE");
