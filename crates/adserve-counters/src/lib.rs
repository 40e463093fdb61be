//! Real-time counters in Redis that the serving path reads: campaign spend
//! today (budget pacing) and user x campaign impressions today (frequency
//! caps).
//!
//! They are written by one writer, the feature-service's stream aggregator
//! (`services/feature-service/src/aggregates.rs`), from the impressions and
//! clicks topics: only what was durably logged counts or is charged, each
//! event once (under the aggregator's dedup markers), and an impression
//! whose counter write failed is not lost (the aggregator retries it before
//! committing its offset). The price of serving them from the stream is its
//! lag (`adserve_feature_aggregates_freshness_seconds`): a user's requests
//! within it of an impression do not see that impression yet.
//!
//! This crate is the one definition of their keys, of what an impression and
//! a charged click add to them ([`on_impression`], [`on_charged_click`]), and
//! of the Redis connection settings; the feature-service's real-time tier
//! connects the same way. Days are UTC days since the Unix epoch.
//!
//! | key | type | written | read |
//! |---|---|---|---|
//! | `adserve:spend:{day}` | hash campaign -> micros | CPM impressions, the first click on a CPC impression within the label window (aggregator) | pacer, every interval |
//! | `adserve:freq:{day}:{user}` | hash campaign -> impressions | every impression with a user (aggregator) | every request with a user |
//! | `adserve:clicked:{impression}` | string, lives the label window | the gateway, on the first click with a valid token (`SET NX`) | the gateway: a second click is a replay |

use std::{collections::HashMap, time::Duration};

use adserve_core::{Invalid, check_duration};
use fred::prelude::*;
use serde::{Deserialize, Serialize};

/// What a failed counter read or write returns.
pub use fred::error::Error as RedisError;

/// Seconds a day's counters outlive the day (late clicks, and yesterday's
/// spend for reports).
pub const DAY_KEY_TTL_SECONDS: i64 = 2 * 86_400;

/// Redis connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Deadline of one request's lookups (and of each command).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: "redis://127.0.0.1:6379/0".into(), timeout: Duration::from_millis(50) }
    }
}

impl RedisConfig {
    /// Validation; `prefix` names the config table ("redis", "counters").
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if !self.url.starts_with("redis://") && !self.url.starts_with("rediss://") {
            return Err(Invalid::new(
                format!("{prefix}.url"),
                format!("must start with redis:// or rediss://, got {:?}", self.url),
            ));
        }
        check_duration(&format!("{prefix}.timeout"), self.timeout, Duration::from_millis(1), Duration::from_secs(60))
    }
}

/// A client that reconnects in the background: a server that is down at
/// start does not stop the caller (commands fail fast meanwhile, and callers
/// degrade). Waits at most one second for the first connection.
pub async fn connect(config: &RedisConfig) -> Result<Client, Error> {
    let client = client(config)?;
    match tokio::time::timeout(Duration::from_secs(1), client.wait_for_connect()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, url = %config.url, "redis not reachable yet; degrading until it is"),
        Err(_) => tracing::warn!(url = %config.url, "redis not reachable within 1 s; degrading until it is"),
    }
    Ok(client)
}

/// [`connect`] without the wait: the client starts connecting in the
/// background (call from within a Tokio runtime); fails only on bad settings.
pub fn client(config: &RedisConfig) -> Result<Client, Error> {
    let mut redis = Config::from_url(&config.url)?;
    // Without this, a client whose first connection fails (Redis down or not
    // yet up when the service starts) never connects: fred returns the error
    // to the connect task and skips its reconnect policy, and every command
    // then times out for the life of the process.
    redis.fail_fast = false;
    let client = Builder::from_config(redis)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_millis(1000);
            c.max_command_attempts = 1;
            // A large MGET leaves in several writes: without TCP_NODELAY the
            // tail waits for Redis's delayed ACK.
            c.tcp = TcpConfig {
                nodelay: Some(true),
                keepalive: Some(fred::socket2::TcpKeepalive::new().with_time(adserve_core::net::TCP_KEEPALIVE)),
                ..TcpConfig::default()
            };
        })
        .with_performance_config(|c| {
            c.default_command_timeout = config.timeout;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()?;
    let _task = client.connect();
    Ok(client)
}

/// The UTC day of `unix_seconds`.
pub fn day_of(unix_seconds: u64) -> u64 {
    unix_seconds / 86_400
}

/// The keys, defined once.
pub mod keys {
    /// Spend of every campaign on `day`.
    pub fn spend(day: u64) -> String {
        format!("adserve:spend:{day}")
    }

    /// Impressions of `user` per campaign on `day`.
    pub fn frequency(day: u64, user: &str) -> String {
        format!("adserve:freq:{day}:{user}")
    }

    /// Set once `impression` was clicked (the gateway's replay guard).
    pub fn clicked(impression: &str) -> String {
        format!("adserve:clicked:{impression}")
    }

    /// Set once `impression`'s billing notice is being logged (`pending`)
    /// or was logged (`logged`): the gateway's guard against replayed
    /// notices.
    pub fn billed(impression: &str) -> String {
        format!("adserve:billed:{impression}")
    }
}

/// What the billing-notice guard knew of an impression when asked
/// ([`Counters::mark_billed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingMark {
    /// No notice was seen: this one is marked pending and is to be logged.
    First,
    /// Another notice for it is being logged right now.
    InFlight,
    /// A notice for it is logged: this one is a repeat.
    Logged,
}

/// One change an event makes to the counters: `HINCRBY key field amount`,
/// then the key lives [`DAY_KEY_TTL_SECONDS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    /// The counter's key (one of [`keys`]).
    pub key: String,
    /// The hash field (a campaign id).
    pub field: String,
    /// What is added.
    pub amount: i64,
}

/// Micros a CPM price charges one impression: a thousandth, rounded.
pub fn cpm_share(price_cpm_micros: i64) -> i64 {
    (price_cpm_micros.max(0) + 500) / 1000
}

/// What one impression served on `day` adds: 1 to the user's count of its
/// campaign (when there is a user: none for COPPA or anonymous requests),
/// and a CPM winner's price share to the campaign's spend.
pub fn on_impression(day: u64, user: &str, campaign_id: i64, price_cpm_micros: i64) -> Vec<Increment> {
    let mut out = Vec::with_capacity(2);
    if !user.is_empty() {
        out.push(Increment { key: keys::frequency(day, user), field: campaign_id.to_string(), amount: 1 });
    }
    let share = cpm_share(price_cpm_micros);
    if share > 0 {
        out.push(Increment { key: keys::spend(day), field: campaign_id.to_string(), amount: share });
    }
    out
}

/// What the charged click (on `day`) of a CPC impression adds: its price to
/// the campaign's spend.
pub fn on_charged_click(day: u64, campaign_id: i64, price_cpc_micros: i64) -> Vec<Increment> {
    if price_cpc_micros <= 0 {
        return Vec::new();
    }
    vec![Increment { key: keys::spend(day), field: campaign_id.to_string(), amount: price_cpc_micros }]
}

/// [`keys::billed`] while a notice is being logged.
const BILLING_PENDING: &str = "pending";
/// [`keys::billed`] once a notice is logged.
const BILLING_LOGGED: &str = "logged";

/// The counters over one Redis client.
#[derive(Clone)]
pub struct Counters {
    client: Client,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

fn parse_hash(raw: HashMap<String, String>) -> HashMap<i64, i64> {
    raw.into_iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?))).collect()
}

impl Counters {
    /// Counters over `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Connects (see [`connect`]).
    pub async fn connect(config: &RedisConfig) -> Result<Self, Error> {
        Ok(Self::new(connect(config).await?))
    }

    /// Waits up to `limit` for the first connection; false if not made yet
    /// (the client keeps connecting in the background either way).
    pub async fn wait_for_connect(&self, limit: Duration) -> bool {
        matches!(tokio::time::timeout(limit, self.client.wait_for_connect()).await, Ok(Ok(())))
    }

    /// Impressions of `user` per campaign on `day` (one HGETALL).
    pub async fn frequency(&self, day: u64, user: &str) -> Result<HashMap<i64, i64>, Error> {
        let raw: HashMap<String, String> = self.client.hgetall(keys::frequency(day, user)).await?;
        Ok(parse_hash(raw))
    }

    /// Spend of every campaign on `day`, micros (one HGETALL).
    pub async fn spend(&self, day: u64) -> Result<HashMap<i64, i64>, Error> {
        let raw: HashMap<String, String> = self.client.hgetall(keys::spend(day)).await?;
        Ok(parse_hash(raw))
    }

    /// Adds `micros` to a campaign's spend (back-office corrections and
    /// tests; serving traffic is counted by the stream aggregator).
    pub async fn add_spend(&self, day: u64, campaign_id: i64, micros: i64) -> Result<i64, Error> {
        self.client.hincrby(keys::spend(day), campaign_id.to_string(), micros).await
    }

    /// Marks `impression_id` clicked for `ttl`; false when it already was
    /// (the click is a replay). One `SET NX PX`.
    pub async fn mark_clicked(&self, impression_id: &str, ttl: Duration) -> Result<bool, Error> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> = self
            .client
            .set(keys::clicked(impression_id), "1", Some(Expiration::PX(ttl_ms)), Some(SetOptions::NX), false)
            .await?;
        Ok(set.is_some())
    }

    /// Undoes [`Self::mark_clicked`] (the click could not be logged, so a
    /// retry must not look like a replay).
    pub async fn unmark_clicked(&self, impression_id: &str) -> Result<(), Error> {
        let _: i64 = self.client.del(keys::clicked(impression_id)).await?;
        Ok(())
    }

    /// Marks `impression_id`'s billing notice pending for `ttl`, unless a
    /// notice for it was seen: then says whether that one is still being
    /// logged or is logged. One `SET NX PX`, and a `GET` when it was set.
    pub async fn mark_billed(&self, impression_id: &str, ttl: Duration) -> Result<BillingMark, Error> {
        let key = keys::billed(impression_id);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> =
            self.client.set(&key, BILLING_PENDING, Some(Expiration::PX(ttl_ms)), Some(SetOptions::NX), false).await?;
        if set.is_some() {
            return Ok(BillingMark::First);
        }
        let state: Option<String> = self.client.get(&key).await?;
        Ok(if state.as_deref() == Some(BILLING_LOGGED) { BillingMark::Logged } else { BillingMark::InFlight })
    }

    /// Records that `impression_id`'s notice is logged (its mark keeps its TTL).
    pub async fn billed_logged(&self, impression_id: &str) -> Result<(), Error> {
        let _: Option<String> = self
            .client
            .set(keys::billed(impression_id), BILLING_LOGGED, Some(Expiration::KEEPTTL), Some(SetOptions::XX), false)
            .await?;
        Ok(())
    }

    /// Undoes [`Self::mark_billed`] (the notice could not be logged, so the
    /// exchange's retry must be logged, not taken for a repeat).
    pub async fn unmark_billed(&self, impression_id: &str) -> Result<(), Error> {
        let _: i64 = self.client.del(keys::billed(impression_id)).await?;
        Ok(())
    }

    /// The client, for callers with their own keys.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_days() {
        assert_eq!(day_of(86_399), 0);
        assert_eq!(day_of(86_400), 1);
        assert_eq!(keys::spend(20_000), "adserve:spend:20000");
        assert_eq!(keys::frequency(3, "u1"), "adserve:freq:3:u1");
        assert_eq!(cpm_share(2_000_400), 2_000);
        assert_eq!(cpm_share(499), 0);
        assert_eq!(cpm_share(500), 1);
        assert_eq!(cpm_share(-7), 0);
        assert_eq!(
            on_impression(3, "u1", 7, 2_000_400),
            vec![
                Increment { key: "adserve:freq:3:u1".into(), field: "7".into(), amount: 1 },
                Increment { key: "adserve:spend:3".into(), field: "7".into(), amount: 2_000 },
            ]
        );
        assert_eq!(on_impression(3, "", 7, 0), vec![], "no user, CPC: nothing until a click");
        assert_eq!(
            on_charged_click(4, 8, 150_000),
            vec![Increment { key: "adserve:spend:4".into(), field: "8".into(), amount: 150_000 }]
        );
        assert!(on_charged_click(4, 8, 0).is_empty());
        assert!(RedisConfig::default().validate("redis").is_ok());
        let bad = RedisConfig { url: "http://x".into(), ..RedisConfig::default() };
        assert!(bad.validate("counters").unwrap_err().to_string().starts_with("counters.url"));
    }
}
