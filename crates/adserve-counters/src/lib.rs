//! Real-time counters in Redis that the serving path reads and writes:
//! campaign spend today (budget pacing), user x campaign impressions today
//! (frequency caps) and the pending charge of each CPC impression (so a
//! click is charged once, at the price the auction set).
//!
//! This crate is the one definition of their keys and of the Redis
//! connection settings; the feature-service's real-time tier connects the
//! same way. Days are UTC days since the Unix epoch.
//!
//! | key | type | written | read |
//! |---|---|---|---|
//! | `adserve:spend:{day}` | hash campaign -> micros | CPM impressions (gateway), CPC clicks (gateway) | pacer, every interval |
//! | `adserve:freq:{day}:{user}` | hash campaign -> impressions | every served impression | every request with a user |
//! | `adserve:charge:{impression}` | string `campaign:price` | every CPC impression | the first click on it |

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

    /// The pending charge of a CPC impression.
    pub fn charge(impression_id: &str) -> String {
        format!("adserve:charge:{impression_id}")
    }
}

/// One served impression, as the counters record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served<'a> {
    /// The impression.
    pub impression_id: &'a str,
    /// Its campaign.
    pub campaign_id: i64,
    /// CPC price per click (charged when clicked), or 0.
    pub price_cpc_micros: i64,
    /// CPM price per thousand impressions (charged now), or 0.
    pub price_cpm_micros: i64,
}

/// A click's charge, once found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The campaign charged.
    pub campaign_id: i64,
    /// Micros charged.
    pub micros: i64,
}

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

    /// Records served impressions in one pipeline: the user's frequency
    /// counts (when there is a user), CPM spend now, and for each CPC
    /// impression its pending charge, kept `charge_ttl` (the click window).
    pub async fn record_served(
        &self,
        day: u64,
        user: &str,
        served: &[Served<'_>],
        charge_ttl: Duration,
    ) -> Result<(), Error> {
        if served.is_empty() {
            return Ok(());
        }
        let pipe = self.client.pipeline();
        if !user.is_empty() {
            let key = keys::frequency(day, user);
            for s in served {
                let () = pipe.hincrby(&key, s.campaign_id.to_string(), 1).await?;
            }
            let () = pipe.expire(&key, DAY_KEY_TTL_SECONDS, None).await?;
        }
        let spend = keys::spend(day);
        let mut spent_now = false;
        for s in served {
            if s.price_cpm_micros > 0 {
                // Per impression: a thousandth of the CPM price, rounded.
                let micros = (s.price_cpm_micros + 500) / 1000;
                let () = pipe.hincrby(&spend, s.campaign_id.to_string(), micros).await?;
                spent_now = true;
            }
            if s.price_cpc_micros > 0 {
                let value = format!("{}:{}", s.campaign_id, s.price_cpc_micros);
                let ttl = Expiration::EX(charge_ttl.as_secs().max(1) as i64);
                let () = pipe.set(keys::charge(s.impression_id), value, Some(ttl), None, false).await?;
            }
        }
        if spent_now {
            let () = pipe.expire(&spend, DAY_KEY_TTL_SECONDS, None).await?;
        }
        let _: Vec<Value> = pipe.all().await?;
        Ok(())
    }

    /// Charges the click on `impression_id` to its campaign's spend on
    /// `day`, once: the pending charge is taken (GETDEL) before it is added,
    /// so a second click on the same impression finds nothing. `None` when
    /// there was nothing to charge (a CPM impression, a repeated click, or
    /// one after the click window).
    pub async fn charge_click(&self, day: u64, impression_id: &str) -> Result<Option<Charge>, Error> {
        let pending: Option<String> = self.client.getdel(keys::charge(impression_id)).await?;
        let Some(charge) = pending.as_deref().and_then(parse_charge) else { return Ok(None) };
        let spend = keys::spend(day);
        let pipe = self.client.pipeline();
        let () = pipe.hincrby(&spend, charge.campaign_id.to_string(), charge.micros).await?;
        let () = pipe.expire(&spend, DAY_KEY_TTL_SECONDS, None).await?;
        let _: Vec<Value> = pipe.all().await?;
        Ok(Some(charge))
    }

    /// Adds `micros` to a campaign's spend (back-office corrections and tests).
    pub async fn add_spend(&self, day: u64, campaign_id: i64, micros: i64) -> Result<i64, Error> {
        self.client.hincrby(keys::spend(day), campaign_id.to_string(), micros).await
    }

    /// The client, for callers with their own keys.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn parse_charge(v: &str) -> Option<Charge> {
    let (campaign, micros) = v.split_once(':')?;
    Some(Charge { campaign_id: campaign.parse().ok()?, micros: micros.parse().ok()? })
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
        assert_eq!(parse_charge("12:340000"), Some(Charge { campaign_id: 12, micros: 340_000 }));
        assert_eq!(parse_charge("garbage"), None);
        assert!(RedisConfig::default().validate("redis").is_ok());
        let bad = RedisConfig { url: "http://x".into(), ..RedisConfig::default() };
        assert!(bad.validate("counters").unwrap_err().to_string().starts_with("counters.url"));
    }

    /// Against the real Redis `make test` runs (keys in a unique namespace day).
    #[tokio::test]
    async fn served_impressions_count_and_clicks_charge_once() {
        let url = std::env::var("ADSTACK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let counters = Counters::connect(&RedisConfig { url, timeout: Duration::from_secs(2) }).await.unwrap();
        // A far-future day no real traffic uses, unique per run.
        let day = 1_000_000 + (uuid::Uuid::new_v4().as_u128() % 1_000_000) as u64;
        let (i1, i2, i3) = ("imp-a", uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
        let served = [
            Served { impression_id: i1, campaign_id: 7, price_cpc_micros: 0, price_cpm_micros: 2_000_400 },
            Served { impression_id: &i2, campaign_id: 8, price_cpc_micros: 150_000, price_cpm_micros: 0 },
            Served { impression_id: &i3, campaign_id: 8, price_cpc_micros: 90_000, price_cpm_micros: 0 },
        ];
        counters.record_served(day, "user-1", &served, Duration::from_secs(60)).await.unwrap();
        assert_eq!(counters.frequency(day, "user-1").await.unwrap(), HashMap::from([(7, 1), (8, 2)]));
        assert_eq!(counters.spend(day).await.unwrap(), HashMap::from([(7, 2_000)]), "CPM charged on impression");

        let charged = counters.charge_click(day, &i2).await.unwrap();
        assert_eq!(charged, Some(Charge { campaign_id: 8, micros: 150_000 }));
        assert_eq!(counters.charge_click(day, &i2).await.unwrap(), None, "a second click is not charged");
        assert_eq!(counters.charge_click(day, "never-served").await.unwrap(), None);
        assert_eq!(counters.spend(day).await.unwrap(), HashMap::from([(7, 2_000), (8, 150_000)]));
        // Anonymous requests are not counted per user, and still charge.
        counters.record_served(day, "", &served[..1], Duration::from_secs(60)).await.unwrap();
        assert_eq!(counters.spend(day).await.unwrap()[&7], 4_000);
        let _: i64 = counters
            .client()
            .del(vec![keys::spend(day), keys::frequency(day, "user-1"), keys::charge(&i3)])
            .await
            .unwrap();
    }
}
