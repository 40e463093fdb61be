//! The real-time tier: counters in Redis, one key per entity and attribute.

use std::collections::HashMap;

use adserve_features::{Entity, FeatureRegistry, FeatureSpec, Source};
use fred::prelude::*;

use crate::config::RedisConfig;

/// Reads (and, for seeding, writes) real-time counters.
#[derive(Clone)]
pub struct RealtimeStore {
    client: Client,
    user_specs: Vec<FeatureSpec>,
    ad_specs: Vec<FeatureSpec>,
    registry: &'static FeatureRegistry,
}

impl std::fmt::Debug for RealtimeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeStore").finish_non_exhaustive()
    }
}

/// Values read for one request.
pub type Counters = (HashMap<String, f32>, HashMap<i64, HashMap<String, f32>>);

impl RealtimeStore {
    /// Connects to Redis, waiting at most one second for the first connection.
    /// A server that is down does not stop the service: the client keeps
    /// reconnecting in the background and lookups degrade to defaults meanwhile.
    pub async fn connect(config: &RedisConfig, registry: &'static FeatureRegistry) -> Result<Self, Error> {
        let client = adserve_counters::connect(config).await?;
        let specs = |entity| registry.select(entity, Source::Redis).map(|(_, f)| f.clone()).collect();
        Ok(Self { client, user_specs: specs(Entity::User), ad_specs: specs(Entity::Ad), registry })
    }

    /// Counters for the user (skipped when `user_id` is empty) and each ad, in one MGET.
    pub async fn counters(&self, user_id: &str, ad_ids: &[i64]) -> Result<Counters, Error> {
        let user_specs: &[FeatureSpec] = if user_id.is_empty() { &[] } else { &self.user_specs };
        let mut keys = Vec::with_capacity(user_specs.len() + ad_ids.len() * self.ad_specs.len());
        keys.extend(user_specs.iter().map(|f| self.registry.redis_key(f, user_id)));
        for id in ad_ids {
            let id = id.to_string();
            keys.extend(self.ad_specs.iter().map(|f| self.registry.redis_key(f, &id)));
        }
        if keys.is_empty() {
            return Ok(Default::default());
        }
        // Read as strings and parsed here: one value that is not a number
        // must cost that value (NaN: served as the default and counted
        // invalid), not fail the whole MGET.
        let values: Vec<Option<String>> = self.client.mget(keys).await?;
        let mut values = values.into_iter().map(|v| v.map(|s| s.trim().parse::<f64>().map_or(f32::NAN, |x| x as f32)));
        let mut user = HashMap::new();
        for f in user_specs {
            if let Some(Some(v)) = values.next() {
                user.insert(f.attribute.clone(), v);
            }
        }
        let mut ads = HashMap::new();
        for id in ad_ids {
            for f in &self.ad_specs {
                if let Some(Some(v)) = values.next() {
                    ads.entry(*id).or_insert_with(HashMap::new).insert(f.attribute.clone(), v);
                }
            }
        }
        Ok((user, ads))
    }

    /// Sets counters (`key -> value`), for seeding and tests.
    pub async fn set_counters(&self, values: &[(String, f64)]) -> Result<(), Error> {
        if values.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(String, f64)> = values.to_vec();
        self.client.mset(pairs).await
    }
}
