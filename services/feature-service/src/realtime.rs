//! The real-time tier: one packed string per entity in Redis (layout in
//! [`adserve_features::realtime`]), written by the stream aggregator
//! ([`crate::aggregates`]) and read here with one MGET per request.

use std::collections::HashMap;

use adserve_features::{Entity, FeatureRegistry, RealtimeValues, Source, realtime};
use fred::prelude::*;

use crate::config::RedisConfig;

/// Reads (and, for seeding, writes) real-time counters.
#[derive(Clone)]
pub struct RealtimeStore {
    client: Client,
    /// The attributes the user's features read, with their position in
    /// the packed layout, resolved once (empty: no MGET key).
    user_attributes: Vec<(String, usize)>,
    /// Whether any ad feature is real-time (else no ad keys are read).
    ad_features: bool,
    registry: &'static FeatureRegistry,
}

impl std::fmt::Debug for RealtimeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealtimeStore").finish_non_exhaustive()
    }
}

/// One entity's counters to seed: `(entity, id, [(attribute, value)])`.
pub type Seed = (Entity, String, Vec<(String, f64)>);

/// Values read for one request: the user's (`attribute -> value`), and per
/// requested ad, in request order, its packed values if it has any (empty
/// when no ad feature is real-time).
pub type Counters = (HashMap<String, f32>, Vec<Option<RealtimeValues>>);

impl RealtimeStore {
    /// Connects to Redis, waiting at most one second for the first connection.
    /// A server that is down does not stop the service: the client keeps
    /// reconnecting in the background and lookups degrade to defaults meanwhile.
    pub async fn connect(config: &RedisConfig, registry: &'static FeatureRegistry) -> Result<Self, Error> {
        Ok(Self::new(adserve_counters::connect(config).await?, registry))
    }

    /// The store over an existing client.
    pub fn new(client: Client, registry: &'static FeatureRegistry) -> Self {
        // The registry refuses a real-time attribute the layout lacks, so
        // every one has a position.
        let user_attributes = registry
            .select(Entity::User, Source::Redis)
            .filter_map(|(_, f)| Some((f.attribute.clone(), realtime::attribute_index(&f.attribute)?)))
            .collect();
        let ad_features = registry.select(Entity::Ad, Source::Redis).next().is_some();
        Self { client, user_attributes, ad_features, registry }
    }

    /// Counters for the user (skipped when `user_id` is empty) and each ad,
    /// in one MGET of one key per entity.
    pub async fn counters(&self, user_id: &str, ad_ids: &[i64]) -> Result<Counters, Error> {
        let with_user = !user_id.is_empty() && !self.user_attributes.is_empty();
        let with_ads = self.ad_features;
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
        // Read as bytes and decoded here: a value that is not the layout
        // costs that entity's values (NaN: served as the defaults and
        // counted invalid), not the whole MGET.
        let values: Vec<Option<Vec<u8>>> = self.client.mget(keys).await?;
        let mut values = values.into_iter();
        let mut user = HashMap::new();
        if with_user && let Some(Some(packed)) = values.next() {
            user = unpack(&packed, &self.user_attributes);
        }
        let ads = if with_ads { values.map(|v| v.map(|packed| decode(&packed))).collect() } else { Vec::new() };
        Ok((user, ads))
    }

    /// The oldest applied-through time (unix ms) the aggregators report in
    /// [`realtime::progress_key`] (None: none has reported).
    pub async fn progress(&self) -> Result<Option<i64>, Error> {
        let key = realtime::progress_key(&self.registry.redis.key_prefix);
        let entries: HashMap<String, String> = self.client.hgetall(key).await?;
        Ok(entries.values().filter_map(|v| v.parse::<i64>().ok()).min())
    }

    /// Overwrites entities' packed counters: `(entity, id, [(attribute,
    /// value)])`, the attributes not named 0, for seeding and tests (the
    /// aggregator replaces a seeded value at the entity's next event).
    pub async fn set_counters(&self, values: &[Seed]) -> Result<(), Error> {
        if values.is_empty() {
            return Ok(());
        }
        let mut pairs: Vec<(String, Vec<u8>)> = Vec::with_capacity(values.len());
        for (entity, id, counters) in values {
            let packed = realtime::Packed::of(counters, 0)
                .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "an attribute the layout does not have"))?;
            pairs.push((self.registry.realtime_key(*entity, id), packed.encode()));
        }
        self.client.mset(pairs).await
    }
}

/// One packed value's values (all NaN when it is not the layout: served as
/// defaults, counted invalid).
fn decode(packed: &[u8]) -> RealtimeValues {
    realtime::Packed::decode(packed).map_or([f32::NAN; realtime::ATTRIBUTES], |p| p.values)
}

/// The `wanted` attributes of one packed value (all NaN when it is not the
/// layout).
fn unpack(packed: &[u8], wanted: &[(String, usize)]) -> HashMap<String, f32> {
    let decoded = decode(packed);
    wanted.iter().map(|(name, at)| (name.clone(), decoded[*at])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_copies_the_wanted_attributes_and_refuses_other_layouts() {
        let at = |n: &str| realtime::attribute_index(n).expect(n);
        let wanted = vec![("impressions_1h".to_string(), at("impressions_1h")), ("clicks_5m".into(), at("clicks_5m"))];
        let packed = realtime::Packed::of(&[("impressions_5m", 1.0), ("impressions_1h", 4.0)], 17).expect("names");
        let got = unpack(&packed.encode(), &wanted);
        assert_eq!((got.len(), got["impressions_1h"], got["clicks_5m"]), (2, 4.0, 0.0));
        let got = unpack(b"impressions_1h=4", &wanted);
        assert!(got.values().all(|v| v.is_nan()), "another layout: every wanted value invalid");
    }
}
