//! The real-time tier: one packed string per entity in Redis (layout in
//! [`adserve_features::realtime`]), written by the stream aggregator
//! ([`crate::aggregates`]) and read here with one MGET per request.

use std::collections::HashMap;

use adserve_features::{Entity, FeatureRegistry, Source, realtime};
use fred::prelude::*;

use crate::config::RedisConfig;

/// Reads (and, for seeding, writes) real-time counters.
#[derive(Clone)]
pub struct RealtimeStore {
    client: Client,
    /// The attributes each entity's features read (empty: no MGET key).
    user_attributes: Vec<String>,
    ad_attributes: Vec<String>,
    registry: &'static FeatureRegistry,
}

impl std::fmt::Debug for RealtimeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeStore").finish_non_exhaustive()
    }
}

/// One entity's counters to seed: `(entity, id, [(attribute, value)])`.
pub type Seed = (Entity, String, Vec<(String, f64)>);

/// Values read for one request.
pub type Counters = (HashMap<String, f32>, HashMap<i64, HashMap<String, f32>>);

impl RealtimeStore {
    /// Connects to Redis, waiting at most one second for the first connection.
    /// A server that is down does not stop the service: the client keeps
    /// reconnecting in the background and lookups degrade to defaults meanwhile.
    pub async fn connect(config: &RedisConfig, registry: &'static FeatureRegistry) -> Result<Self, Error> {
        Ok(Self::new(adserve_counters::connect(config).await?, registry))
    }

    /// The store over an existing client.
    pub fn new(client: Client, registry: &'static FeatureRegistry) -> Self {
        let attributes = |entity| registry.select(entity, Source::Redis).map(|(_, f)| f.attribute.clone()).collect();
        Self { client, user_attributes: attributes(Entity::User), ad_attributes: attributes(Entity::Ad), registry }
    }

    /// Counters for the user (skipped when `user_id` is empty) and each ad,
    /// in one MGET of one key per entity.
    pub async fn counters(&self, user_id: &str, ad_ids: &[i64]) -> Result<Counters, Error> {
        let with_user = !user_id.is_empty() && !self.user_attributes.is_empty();
        let with_ads = !self.ad_attributes.is_empty();
        let mut keys = Vec::with_capacity(1 + ad_ids.len());
        if with_user {
            keys.push(self.registry.realtime_key(Entity::User, user_id));
        }
        if with_ads {
            keys.extend(ad_ids.iter().map(|id| self.registry.realtime_key(Entity::Ad, &id.to_string())));
        }
        if keys.is_empty() {
            return Ok(Default::default());
        }
        // Read as strings and parsed here: one value that is not a number
        // must cost that value (NaN: served as the default and counted
        // invalid), not fail the whole MGET.
        let values: Vec<Option<String>> = self.client.mget(keys).await?;
        let mut values = values.into_iter();
        let mut user = HashMap::new();
        if with_user && let Some(Some(packed)) = values.next() {
            user = unpack(&packed, &self.user_attributes);
        }
        let mut ads = HashMap::new();
        if with_ads {
            for (id, value) in ad_ids.iter().zip(values) {
                if let Some(packed) = value {
                    ads.insert(*id, unpack(&packed, &self.ad_attributes));
                }
            }
        }
        Ok((user, ads))
    }

    /// Overwrites entities' packed counters: `(entity, id, [(attribute,
    /// value)])`, for seeding and tests (the aggregator replaces a seeded
    /// value with the counts from events at the entity's next event).
    pub async fn set_counters(&self, values: &[Seed]) -> Result<(), Error> {
        if values.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(String, String)> = values
            .iter()
            .map(|(entity, id, counters)| (self.registry.realtime_key(*entity, id), realtime::pack(counters)))
            .collect();
        self.client.mset(pairs).await
    }
}

/// The `wanted` attributes of one packed value.
fn unpack(packed: &str, wanted: &[String]) -> HashMap<String, f32> {
    let mut out = HashMap::with_capacity(wanted.len());
    realtime::parse_packed(packed, |name, value| {
        if let Some(w) = wanted.iter().find(|w| *w == name) {
            out.insert(w.clone(), value);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_keeps_the_wanted_attributes_only() {
        let wanted = vec!["impressions_1h".to_string(), "clicks_5m".to_string()];
        let got = unpack("impressions_5m=1;impressions_1h=4;clicks_5m=x;as_of=17", &wanted);
        assert_eq!(got.len(), 2);
        assert_eq!(got["impressions_1h"], 4.0);
        assert!(got["clicks_5m"].is_nan(), "an unparsable value reaches assembly as NaN (served as default, counted)");
    }
}
