//! Users' batch-tier items, cached in process for a short TTL.
//!
//! A user's batch features change when the batch pipeline runs (daily; the
//! registry's `freshness_sla` for them is 36 h), but without a cache every
//! GetFeatures read them from DynamoDB: a `GetItem` per request, the largest
//! part of a one-ad lookup's latency (docs/benchmarks.md). Returning users
//! are the common case. So each item read, an unknown user's empty one
//! included, is kept for `user_cache.ttl` (60 s by default): a backfill
//! reaches requests within that TTL. A failed read is never cached. While
//! DynamoDB is down, the users read in the last TTL keep their values and
//! only the others degrade.
//!
//! Sharded `Mutex<HashMap>`s, bounded per shard: a full shard first drops
//! what has expired, then an arbitrary eighth of itself.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::batch::BatchItem;

const SHARDS: usize = 16;

/// One shard: user id -> (when it was read, its item).
type Shard = HashMap<String, (Instant, BatchItem)>;

/// Cache settings (`user_cache` in the feature-service config).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UserCacheConfig {
    /// How long a read item serves (0: no cache, every request reads DynamoDB).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most users held.
    pub capacity: usize,
}

impl Default for UserCacheConfig {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(60), capacity: 100_000 }
    }
}

impl UserCacheConfig {
    /// Bounds: a TTL of at most an hour (batch values must reach requests),
    /// and room for at least one user per shard.
    pub fn validate(&self) -> Result<(), adserve_core::Invalid> {
        adserve_core::check_duration("user_cache.ttl", self.ttl, Duration::ZERO, Duration::from_secs(3600))?;
        adserve_core::check_range("user_cache.capacity", self.capacity, SHARDS..=100_000_000)
    }
}

/// The cache.
#[derive(Debug)]
pub struct UserCache {
    ttl: Duration,
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
}

impl UserCache {
    /// A cache for `config`; None when its TTL is 0.
    pub fn new(config: &UserCacheConfig) -> Option<Self> {
        if config.ttl.is_zero() {
            return None;
        }
        Some(Self {
            ttl: config.ttl,
            per_shard: (config.capacity / SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
        })
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, Shard> {
        let mut h = self.hasher.build_hasher();
        h.write(user.as_bytes());
        self.shards[h.finish() as usize % SHARDS].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The user's item as read within the TTL, if any.
    pub fn get(&self, user: &str, now: Instant) -> Option<BatchItem> {
        let found =
            self.shard(user).get(user).filter(|(at, _)| now.duration_since(*at) < self.ttl).map(|(_, i)| i.clone());
        let result = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("adserve_feature_user_cache_total", "result" => result).increment(1);
        found
    }

    /// Keeps `item`, as read from DynamoDB at `now`.
    pub fn put(&self, user: &str, item: &BatchItem, now: Instant) {
        let mut shard = self.shard(user);
        if shard.len() >= self.per_shard && !shard.contains_key(user) {
            shard.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
            if shard.len() >= self.per_shard {
                let drop: Vec<String> = shard.keys().take(self.per_shard.div_ceil(8)).cloned().collect();
                for k in drop {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(user.to_string(), (now, item.clone()));
    }

    /// Users held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()).sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: f32) -> BatchItem {
        BatchItem { values: HashMap::from([("ctr_30d".to_string(), v)]), ..Default::default() }
    }

    #[test]
    fn an_item_serves_for_its_ttl_then_is_read_again() {
        let c = UserCache::new(&UserCacheConfig { ttl: Duration::from_secs(60), capacity: 1000 }).expect("on");
        let t0 = Instant::now();
        assert_eq!(c.get("u", t0), None);
        c.put("u", &item(0.1), t0);
        assert_eq!(c.get("u", t0 + Duration::from_secs(59)), Some(item(0.1)));
        assert_eq!(c.get("u", t0 + Duration::from_secs(60)), None, "expired: DynamoDB is asked again");
        // An unknown user's empty item is cached like any other.
        c.put("nobody", &BatchItem::default(), t0);
        assert_eq!(c.get("nobody", t0), Some(BatchItem::default()));
        assert!(UserCache::new(&UserCacheConfig { ttl: Duration::ZERO, capacity: 1000 }).is_none(), "ttl 0: off");
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let c = UserCache::new(&UserCacheConfig { ttl: Duration::from_secs(60), capacity: 160 }).expect("on");
        let t0 = Instant::now();
        for i in 0..10_000 {
            c.put(&format!("u{i}"), &item(0.1), t0);
        }
        assert!(c.len() <= 160, "{}", c.len());
        // A full shard of expired entries makes room by dropping them.
        let later = t0 + Duration::from_secs(61);
        c.put("fresh", &item(0.2), later);
        assert_eq!(c.get("fresh", later), Some(item(0.2)));
    }

    #[test]
    fn bounds() {
        UserCacheConfig::default().validate().expect("defaults");
        let long = UserCacheConfig { ttl: Duration::from_secs(7200), ..Default::default() };
        assert_eq!(long.validate().unwrap_err().key, "user_cache.ttl");
        let tiny = UserCacheConfig { capacity: 1, ..Default::default() };
        assert_eq!(tiny.validate().unwrap_err().key, "user_cache.capacity");
    }
}
