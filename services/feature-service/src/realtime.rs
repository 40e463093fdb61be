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
        let client = Builder::from_config(Config::from_url(&config.url)?)
            .with_connection_config(|c| {
                c.connection_timeout = std::time::Duration::from_millis(1000);
                c.max_command_attempts = 1;
                // An MGET of 1000 keys leaves in several writes: without
                // TCP_NODELAY the tail waits for Redis's delayed ACK.
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
        match tokio::time::timeout(std::time::Duration::from_secs(1), client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "redis not reachable yet; serving defaults until it is"),
            Err(_) => tracing::warn!("redis not reachable within 1 s; serving defaults until it is"),
        }
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
        let values: Vec<Option<f64>> = self.client.mget(keys).await?;
        let mut values = values.into_iter();
        let mut user = HashMap::new();
        for f in user_specs {
            if let Some(Some(v)) = values.next() {
                user.insert(f.attribute.clone(), v as f32);
            }
        }
        let mut ads = HashMap::new();
        for id in ad_ids {
            for f in &self.ad_specs {
                if let Some(Some(v)) = values.next() {
                    ads.entry(*id).or_insert_with(HashMap::new).insert(f.attribute.clone(), v as f32);
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
