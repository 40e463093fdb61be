//! Test harness for the running stack: where each service listens, starting
//! the stack when it is not up, seeding the catalog and feature stores, and
//! reading what the pipeline produced (Kafka events, Parquet rows).
//!
//! Endpoints default to the local stack of `scripts/start.sh`; override with
//! `ADSTACK_TEST_*` variables to point the tests at another deployment.

pub mod bench;
pub mod pki;
pub mod sim;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use adserve_catalog::{Catalog, PostgresConfig};
use adserve_feature_service::{BatchRow, BatchStore, RealtimeStore, config::DynamoConfig, config::RedisConfig};
use adserve_features::Entity;
use adserve_proto::v1::{
    FlushRequest, GetStatusRequest, ImpressionEvent, label_joiner_service_client::LabelJoinerServiceClient,
};
use anyhow::{Context, bail};
use arrow::array::{Array, AsArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The impression log timeout and request budget of the tests' own gateways:
/// the local stack's (scripts/start.sh), not production's 150 ms / 500 ms,
/// because the local broker shares two cores with the whole stack and the
/// test run, and stalls past 150 ms under load.
pub const LOCAL_PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// See [`LOCAL_PUBLISH_TIMEOUT`].
pub const LOCAL_REQUEST_BUDGET: Duration = Duration::from_millis(1500);

/// The topics a gateway publishes to, warmed before it serves.
pub const WARM_TOPICS: [&str; 2] = [adserve_events::IMPRESSIONS_TOPIC, adserve_events::CLICKS_TOPIC];

/// Where the stack listens.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Gateway HTTP base URL.
    pub http: String,
    /// Gateway gRPC URL.
    pub gateway: String,
    /// feature-service gRPC URL.
    pub features: String,
    /// ranker gRPC URL.
    pub ranker: String,
    /// auction gRPC URL.
    pub auction: String,
    /// label-joiner gRPC URL.
    pub joiner: String,
    /// PostgreSQL URL of the catalog.
    pub postgres: String,
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// Redis URL.
    pub redis: String,
    /// DynamoDB endpoint.
    pub dynamodb: String,
    /// Each service's Prometheus endpoint (`host:port`), by service name.
    pub metrics: Vec<(String, String)>,
    /// The stack's label-joiner consumer group.
    pub joiner_group: String,
}

impl Stack {
    /// Endpoints from `ADSTACK_TEST_*`, else the services' own config
    /// defaults (the one definition of ports, URLs and the consumer group).
    pub fn from_env() -> Self {
        use adserve_core::ports;
        let url = ports::local_url;
        let addr = |port: u16| format!("127.0.0.1:{port}");
        let gateway = adserve_gateway::GatewayConfig::default();
        let features = adserve_feature_service::FeatureServiceConfig::default();
        let joiner = adserve_label_joiner::LabelJoinerConfig::default();
        Self {
            http: env_or("ADSTACK_TEST_HTTP", &format!("http://{}", gateway.http_addr)),
            gateway: env_or("ADSTACK_TEST_GATEWAY", &url(gateway.server.grpc_addr.port())),
            features: env_or("ADSTACK_TEST_FEATURES", &gateway.upstreams.feature_service),
            ranker: env_or("ADSTACK_TEST_RANKER", &gateway.upstreams.ranker),
            auction: env_or("ADSTACK_TEST_AUCTION", &gateway.upstreams.auction),
            joiner: env_or("ADSTACK_TEST_JOINER", &url(joiner.server.grpc_addr.port())),
            postgres: env_or("ADSTACK_TEST_POSTGRES_URL", &gateway.postgres.url),
            kafka: env_or("ADSTACK_TEST_KAFKA", &gateway.kafka.brokers),
            redis: env_or("ADSTACK_TEST_REDIS", &features.redis.url),
            dynamodb: env_or("ADSTACK_TEST_DYNAMODB", &features.dynamodb.endpoint),
            metrics: [
                ("gateway", "ADSTACK_TEST_GATEWAY_METRICS", ports::GATEWAY_METRICS),
                ("feature-service", "ADSTACK_TEST_FEATURES_METRICS", ports::FEATURE_SERVICE_METRICS),
                ("ranker", "ADSTACK_TEST_RANKER_METRICS", ports::RANKER_METRICS),
                ("auction", "ADSTACK_TEST_AUCTION_METRICS", ports::AUCTION_METRICS),
                ("label-joiner", "ADSTACK_TEST_JOINER_METRICS", ports::LABEL_JOINER_METRICS),
            ]
            .into_iter()
            .map(|(name, var, port)| (name.to_string(), env_or(var, &addr(port))))
            .collect(),
            joiner_group: env_or("ADSTACK_TEST_JOINER_GROUP", &joiner.group_id),
        }
    }

    /// The stack, started with `scripts/start.sh` if the gateway does not
    /// answer, and seeded with the demo catalog and features.
    pub async fn ready() -> anyhow::Result<Self> {
        static READY: tokio::sync::OnceCell<Stack> = tokio::sync::OnceCell::const_new();
        READY
            .get_or_try_init(|| async {
                let stack = Self::from_env();
                if !stack.gateway_healthy().await {
                    let status = tokio::process::Command::new("bash")
                        .arg(repo_root().join("scripts/start.sh"))
                        .arg("all")
                        .status()
                        .await
                        .context("running scripts/start.sh")?;
                    if !status.success() || !stack.gateway_healthy().await {
                        bail!("the stack did not start (scripts/start.sh exited {status})");
                    }
                }
                stack.seed().await?;
                Ok(stack)
            })
            .await
            .cloned()
    }

    async fn gateway_healthy(&self) -> bool {
        let url = format!("{}/healthz", self.http);
        matches!(http_client().get(&url).send().await, Ok(r) if r.status().is_success())
    }

    /// A gateway in this process on a random port, wired to this stack (its
    /// catalog in `public`, its counters in the stack's Redis) and then as
    /// `tweak` says; a non-public `postgres.schema` is migrated first.
    /// Returns its base URL (`http://127.0.0.1:port`).
    pub async fn in_process_gateway(
        &self,
        tweak: impl FnOnce(&mut adserve_gateway::GatewayConfig),
    ) -> anyhow::Result<String> {
        let server = self.in_process_server(tweak).await?;
        let config = server.config().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = adserve_gateway::http::router(
            server,
            adserve_gateway::http::BodyLimits::of(&config),
            adserve_core::Readiness::new(),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(format!("http://{addr}"))
    }

    /// A test's own gateway on this stack, called as a library (no HTTP):
    /// [`gateway_config`](Self::gateway_config) changed by `tweak`, with its
    /// catalog schema migrated, counters connected and catalog index loaded.
    pub async fn in_process_server(
        &self,
        tweak: impl FnOnce(&mut adserve_gateway::GatewayConfig),
    ) -> anyhow::Result<adserve_gateway::AdServer> {
        let mut config = self.gateway_config();
        tweak(&mut config);
        let catalog = Catalog::connect_lazy(&config.postgres)?;
        if config.postgres.schema != "public" {
            catalog.migrate(&config.postgres.schema).await?;
        }
        let events = adserve_events::EventPublisher::new(&config.kafka, "test")?;
        // As the gateway does at start (a dead broker fails this; the tests of
        // that expect the 503 that follows).
        let _ = events.warm_up(&WARM_TOPICS, Duration::from_secs(2)).await;
        let server = adserve_gateway::AdServer::new(config, catalog, events)?;
        server.wait_for_counters(Duration::from_secs(1)).await;
        server.wait_for_catalog(Duration::from_secs(10)).await;
        Ok(server)
    }

    /// The config of a test's own gateway on this stack: its stores, broker
    /// and upstreams, with the local stack's impression-log timeout and
    /// request budget ([`LOCAL_PUBLISH_TIMEOUT`]).
    pub fn gateway_config(&self) -> adserve_gateway::GatewayConfig {
        let mut config = adserve_gateway::GatewayConfig {
            postgres: self.postgres_config("public"),
            kafka: adserve_events::KafkaConfig {
                brokers: self.kafka.clone(),
                publish_timeout: LOCAL_PUBLISH_TIMEOUT,
                ..adserve_gateway::GatewayConfig::default().kafka
            },
            counters: adserve_counters::RedisConfig { url: self.redis.clone(), ..Default::default() },
            ..Default::default()
        };
        config.upstreams.feature_service = self.features.clone();
        config.upstreams.ranker = self.ranker.clone();
        config.upstreams.auction = self.auction.clone();
        config.deadlines.request = LOCAL_REQUEST_BUDGET;
        config
    }

    /// A fresh catalog schema (migrated) whose campaign and ad ids start at a
    /// random point far above the shared catalog's, so the real-time counters
    /// (keyed by campaign id) and the feature stores (keyed by ad id) of a
    /// test never touch another's.
    pub async fn fresh_catalog(&self) -> anyhow::Result<(String, Catalog)> {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let catalog = Catalog::connect_lazy(&self.postgres_config(&schema))?;
        catalog.migrate(&schema).await?;
        let start = 1_000_000_000 + (uuid::Uuid::new_v4().as_u128() % 1_000_000_000) as i64 * 1000;
        // Ads too: the feature stores are keyed by ad id, and a test's ads must
        // get registry defaults, not the demo catalog's features.
        for seq in ["campaigns_id_seq", "ads_id_seq"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("ALTER SEQUENCE {seq} RESTART WITH {start}")))
                .execute(catalog.pool())
                .await?;
        }
        Ok((schema, catalog))
    }

    /// The gateway's real-time counters in the stack's Redis.
    pub async fn counters(&self) -> anyhow::Result<adserve_counters::Counters> {
        let config = adserve_counters::RedisConfig { url: self.redis.clone(), timeout: Duration::from_secs(2) };
        Ok(adserve_counters::Counters::connect(&config).await?)
    }

    /// The catalog in the shared database.
    pub fn catalog(&self) -> anyhow::Result<Catalog> {
        Ok(Catalog::connect_lazy(&self.postgres_config("public"))?)
    }

    /// Catalog settings for `schema`.
    pub fn postgres_config(&self, schema: &str) -> PostgresConfig {
        PostgresConfig { url: self.postgres.clone(), schema: schema.into(), ..PostgresConfig::default() }
    }

    /// The batch feature store.
    pub fn batch_store(&self) -> BatchStore {
        let config = DynamoConfig {
            endpoint: self.dynamodb.clone(),
            timeout: Duration::from_secs(5),
            ..DynamoConfig::default()
        };
        BatchStore::new(&config, adserve_features::registry())
    }

    /// The real-time feature store.
    pub async fn realtime_store(&self) -> anyhow::Result<RealtimeStore> {
        let config = RedisConfig { url: self.redis.clone(), timeout: Duration::from_secs(2) };
        Ok(RealtimeStore::connect(&config, adserve_features::registry()).await?)
    }

    /// Seeds the demo catalog (once) and batch and real-time features for its
    /// ads and for users `demo-user-0..50` (idempotent).
    pub async fn seed(&self) -> anyhow::Result<()> {
        let catalog = self.catalog()?;
        catalog.migrate("public").await?;
        let mut ad_ids = all_ad_ids(&catalog).await?;
        if ad_ids.is_empty() {
            for campaign in adserve_catalog::demo_campaigns(20, 5) {
                catalog.insert_campaign(&campaign).await?;
            }
            ad_ids = all_ad_ids(&catalog).await?;
            self.wait_gateway_catalog(std::time::SystemTime::now()).await?;
        }
        let users: Vec<String> = (0..50).map(|u| format!("demo-user-{u}")).collect();
        self.seed_features(&ad_ids, &users).await
    }

    /// Waits (up to 30 s) until the stack's gateway serves a catalog index
    /// read after `since` (its `adserve_catalog_index_as_of_timestamp_seconds`),
    /// so catalog changes committed before `since` are what it serves. A
    /// gateway without the index (the gauge absent) queries PostgreSQL per
    /// request: nothing to wait for.
    pub async fn wait_gateway_catalog(&self, since: std::time::SystemTime) -> anyhow::Result<()> {
        let since = since.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        let addr = self.metrics.iter().find(|(n, _)| n == "gateway").map(|(_, a)| a.clone()).unwrap_or_default();
        let url = format!("http://{addr}/metrics");
        let mut last = 0.0;
        for _ in 0..300 {
            let text = bench::prom::scrape(&url).await?;
            if !text.contains("adserve_catalog_index_") {
                return Ok(());
            }
            last = bench::prom::counter(&text, "adserve_catalog_index_as_of_timestamp_seconds", &[]);
            if last > since {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the gateway's catalog index is not newer than {since} within 30 s (last as of {last})")
    }

    /// Writes batch (DynamoDB) and real-time (Redis) features for `ad_ids`
    /// and `users`, deterministic per id (idempotent).
    pub async fn seed_features(&self, ad_ids: &[i64], users: &[String]) -> anyhow::Result<()> {
        let batch = self.batch_store();
        batch.ensure_tables().await?;
        // Numbers for the dense features, a topic string for the typed ones.
        let topic = |k: u64| crate::sim::TOPICS[k as usize % crate::sim::TOPICS.len()].to_string();
        let ads: Vec<BatchRow> = ad_ids
            .iter()
            .map(|id| {
                let h = (*id as u64).wrapping_mul(2654435761) % 1000;
                BatchRow {
                    id: id.to_string(),
                    values: HashMap::from([
                        ("ctr_7d".to_string(), 0.005 + h as f32 / 1000.0 * 0.06),
                        ("quality_score".to_string(), (h % 100) as f32 / 100.0),
                    ]),
                    text: HashMap::from([("topic".to_string(), topic(h))]),
                    ..Default::default()
                }
            })
            .collect();
        batch.put_ad_rows(&ads).await?;
        // The catalog's retrieval estimate is the same CTR the batch tier serves.
        let ctrs: Vec<(i64, f32)> = ad_ids.iter().zip(&ads).map(|(id, r)| (*id, r.values["ctr_7d"])).collect();
        self.catalog()?.set_estimated_ctr(&ctrs).await?;
        let rows: Vec<BatchRow> = users
            .iter()
            .enumerate()
            .map(|(u, id)| BatchRow {
                id: id.clone(),
                values: HashMap::from([
                    ("ctr_30d".to_string(), 0.01 + (u % 10) as f32 * 0.006),
                    ("sessions_7d".to_string(), (u % 15) as f32),
                ]),
                text: HashMap::from([("top_interest".to_string(), topic(u as u64))]),
                ..Default::default()
            })
            .collect();
        batch.put_rows(Entity::User, &rows).await?;
        let realtime = self.realtime_store().await?;
        // Every counter the aggregator keeps, so values are as long as real
        // ones (the MGET moves the same bytes); `impressions_1h` carries the
        // seeded signal.
        let full = |impressions_1h: f64| -> Vec<(String, f64)> {
            adserve_features::realtime::attributes()
                .into_iter()
                .map(|a| {
                    let x = match a.as_str() {
                        "impressions_5m" => (impressions_1h / 12.0).floor(),
                        "impressions_1h" => impressions_1h,
                        "impressions_24h" => impressions_1h * 20.0,
                        "clicks_24h" => (impressions_1h * 20.0 * 0.02).floor(),
                        a if a.starts_with("clicks_") => 0.0,
                        _ => 0.019_802,
                    };
                    (a, x)
                })
                .collect()
        };
        let mut counters: Vec<adserve_feature_service::realtime::Seed> =
            ad_ids.iter().map(|id| (Entity::Ad, id.to_string(), full((*id % 40) as f64))).collect();
        counters.extend(users.iter().enumerate().map(|(u, id)| (Entity::User, id.clone(), full((u % 7) as f64))));
        realtime.set_counters(&counters).await?;
        Ok(())
    }

    /// The stack's Redis URL with logical database `db` (tests and benches
    /// that must not mix their keys with the stack's).
    pub fn redis_db(&self, db: u32) -> String {
        let base = self.redis.rsplit_once('/').map_or(self.redis.as_str(), |(b, _)| b);
        format!("{base}/{db}")
    }

    /// A label-joiner client.
    pub async fn joiner_client(&self) -> anyhow::Result<LabelJoinerServiceClient<tonic::transport::Channel>> {
        Ok(LabelJoinerServiceClient::connect(self.joiner.clone()).await?)
    }

    /// Flushes the joiner until a row for `impression_id` is in its output,
    /// and returns every row with that id. Gives up after `patience`.
    pub async fn wait_for_rows(&self, impression_id: &str, patience: Duration) -> anyhow::Result<Vec<ParquetRow>> {
        let mut client = self.joiner_client().await?;
        let dir = PathBuf::from(client.get_status(GetStatusRequest {}).await?.into_inner().output_dir);
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            client.flush(FlushRequest { close_open_windows: false }).await?;
            let rows: Vec<ParquetRow> =
                read_rows(&dir)?.into_iter().filter(|r| r.impression_id == impression_id).collect();
            if !rows.is_empty() {
                return Ok(rows);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no Parquet row for impression {impression_id} in {} after {patience:?}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Reads the impression with `impression_id` from the impressions topic.
    pub async fn impression_event(&self, impression_id: &str) -> anyhow::Result<ImpressionEvent> {
        Ok(self.logged_impression(impression_id).await?.event)
    }

    /// The impression with `impression_id` and where it is in the log.
    pub async fn logged_impression(&self, impression_id: &str) -> anyhow::Result<LoggedImpression> {
        let mut found = self.logged_impressions(&[impression_id]).await?;
        found.remove(impression_id).with_context(|| format!("impression {impression_id} not logged"))
    }

    /// The impressions with these ids and where each is in the log, in one
    /// pass over the impressions topic from its beginning (a fresh consumer
    /// group; waits up to 30 s for all). The impressions of a multi-slot
    /// answer share one message (an `ImpressionBatch`, keyed by their join
    /// key), so they share its partition and offset.
    pub async fn logged_impressions(&self, ids: &[&str]) -> anyhow::Result<HashMap<String, LoggedImpression>> {
        let topic = adserve_events::IMPRESSIONS_TOPIC;
        let consumer = self.consumer_from_start(topic)?;
        let keys: std::collections::HashSet<String> =
            ids.iter().map(|id| adserve_events::join_key(id).into_owned()).collect();
        let wanted: std::collections::HashSet<&str> = ids.iter().copied().collect();
        let mut found = HashMap::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            while found.len() < wanted.len() {
                let msg = consumer.recv().await?;
                if !msg.key().and_then(|k| std::str::from_utf8(k).ok()).is_some_and(|k| keys.contains(k)) {
                    continue;
                }
                let payload_type = adserve_events::payload_type(msg.headers());
                let events = adserve_events::decode_impressions(msg.payload().unwrap_or_default(), payload_type)
                    .map_err(anyhow::Error::msg)?;
                for event in events {
                    if wanted.contains(event.impression_id.as_str()) && !found.contains_key(&event.impression_id) {
                        let (partition, offset) = (msg.partition(), msg.offset());
                        found.insert(event.impression_id.clone(), LoggedImpression { event, partition, offset });
                    }
                }
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("{} of {} impressions found on {topic} within 30 s", found.len(), wanted.len()))??;
        consumer.unsubscribe();
        Ok(found)
    }

    /// The first message keyed `key` on `topic`, read from the beginning with
    /// a fresh consumer group: (payload, partition, offset). Waits up to 30 s.
    pub async fn keyed_message(&self, topic: &str, key: &str) -> anyhow::Result<(Vec<u8>, i32, i64)> {
        let mut found = self.keyed_messages(topic, &[key]).await?;
        found.remove(key).with_context(|| format!("no message keyed {key} on {topic}"))
    }

    /// A consumer of `topic` from its earliest offset, in a fresh group that
    /// commits nothing.
    fn consumer_from_start(&self, topic: &str) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .set("group.id", format!("adserve-test-{}", uuid::Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        consumer.subscribe(&[topic])?;
        Ok(consumer)
    }

    /// The first message keyed by each of `keys` on `topic`, in one pass of
    /// one fresh consumer group from the beginning. Waits up to 30 s for all.
    pub async fn keyed_messages(
        &self,
        topic: &str,
        keys: &[&str],
    ) -> anyhow::Result<HashMap<String, (Vec<u8>, i32, i64)>> {
        let consumer = self.consumer_from_start(topic)?;
        let mut found = HashMap::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            while found.len() < keys.len() {
                let msg = consumer.recv().await?;
                let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
                if keys.contains(&key) && !found.contains_key(key) {
                    found.insert(
                        key.to_string(),
                        (msg.payload().unwrap_or_default().to_vec(), msg.partition(), msg.offset()),
                    );
                }
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("{} of {} keys found on {topic} within 30 s", found.len(), keys.len()))??;
        consumer.unsubscribe();
        Ok(found)
    }

    /// Every key on `topic`, from the beginning, up to and including the
    /// first message keyed `last` (a fresh consumer group; waits up to 30 s).
    /// On a one-partition topic (the local stack's) these are all the
    /// messages logged before `last`.
    pub async fn keys_until(&self, topic: &str, last: &str) -> anyhow::Result<Vec<String>> {
        let consumer = self.consumer_from_start(topic)?;
        let mut keys = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let msg = consumer.recv().await?;
                let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                let done = key == last;
                keys.push(key);
                if done {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .with_context(|| format!("no message keyed {last} on {topic} within 30 s"))??;
        consumer.unsubscribe();
        Ok(keys)
    }

    /// The impressions with these ids, in one pass over the topic.
    pub async fn impression_events(&self, ids: &[&str]) -> anyhow::Result<HashMap<String, ImpressionEvent>> {
        Ok(self.logged_impressions(ids).await?.into_iter().map(|(id, logged)| (id, logged.event)).collect())
    }

    /// Waits until the stack's label-joiner has committed its impressions
    /// offsets past `logged`: from then on no restart or re-read can write
    /// that impression again, so a row count taken afterwards is final.
    pub async fn wait_joiner_committed_past(
        &self,
        logged: &LoggedImpression,
        patience: Duration,
    ) -> anyhow::Result<()> {
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .set("group.id", &self.joiner_group)
            .create()?;
        let consumer = std::sync::Arc::new(consumer);
        let deadline = tokio::time::Instant::now() + patience;
        let mut client = self.joiner_client().await?;
        loop {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition(adserve_events::IMPRESSIONS_TOPIC, logged.partition);
            let c = consumer.clone();
            let committed =
                tokio::task::spawn_blocking(move || c.committed_offsets(tpl, Duration::from_secs(5))).await??;
            let past = committed
                .find_partition(adserve_events::IMPRESSIONS_TOPIC, logged.partition)
                .is_some_and(|e| matches!(e.offset(), rdkafka::Offset::Offset(o) if o > logged.offset));
            if past {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "label-joiner group {} did not commit past offset {} within {patience:?}",
                    self.joiner_group,
                    logged.offset
                );
            }
            client.flush(FlushRequest { close_open_windows: false }).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every Parquet row the stack's label-joiner wrote for `impression_id`.
    pub async fn rows_for(&self, impression_id: &str) -> anyhow::Result<Vec<ParquetRow>> {
        let mut client = self.joiner_client().await?;
        let dir = PathBuf::from(client.get_status(GetStatusRequest {}).await?.into_inner().output_dir);
        Ok(read_rows(&dir)?.into_iter().filter(|r| r.impression_id == impression_id).collect())
    }
}

/// An impression as logged, with its place in the impressions topic.
#[derive(Debug, Clone)]
pub struct LoggedImpression {
    /// The event.
    pub event: ImpressionEvent,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

async fn all_ad_ids(catalog: &Catalog) -> anyhow::Result<Vec<i64>> {
    let mut ids = Vec::new();
    for placement in ["feed_top", "sidebar"] {
        for coppa in [false, true] {
            let t = adserve_catalog::Targeting { placement, device: "mobile", coppa, ..Default::default() };
            ids.extend(
                catalog.eligible_ads(&t, &adserve_catalog::Retrieval::all(5000)).await?.into_iter().map(|a| a.ad_id),
            );
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A file whose file system hangs: `path` becomes a FIFO nobody writes, so
/// a reader blocks in open() (as on a frozen network mount) until
/// [`HungFile::release`].
pub struct HungFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl HungFile {
    /// Replaces `path` (a file) with a FIFO; its bytes are kept for the release.
    pub fn new(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)?;
        std::fs::remove_file(path)?;
        let made = std::process::Command::new("mkfifo").arg(path).status()?;
        anyhow::ensure!(made.success(), "mkfifo {}: {made}", path.display());
        Ok(Self { path: path.to_path_buf(), bytes })
    }

    /// The file system answers: the reader blocked in open() reads the real
    /// bytes, and the path is a plain file again for any later read. Fails,
    /// never hangs, when nothing reads it within `patience`.
    pub async fn release(self, patience: std::time::Duration) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let deadline = std::time::Instant::now() + patience;
        // Non-blocking, opening for writing fails (ENXIO) while no reader
        // has the FIFO open, instead of waiting for one.
        let probe = loop {
            match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&self.path) {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Err(e) => bail!("nothing read {} within {patience:?}: {e}", self.path.display()),
            }
        };
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // A reader holds the FIFO open, so this open does not wait; a
            // reader that goes away fails the write (EPIPE), never hangs it.
            std::fs::write(&self.path, &self.bytes)?;
            // The plain file takes the path before the reader sees the end
            // (the probe still holds a write end open): whatever opens the
            // path after this reader is done gets the file, never the FIFO.
            let plain = self.path.with_extension("released");
            std::fs::write(&plain, &self.bytes)?;
            std::fs::rename(&plain, &self.path)?;
            drop(probe);
            Ok(())
        })
        .await??;
        Ok(())
    }
}

/// One training row as read back from Parquet.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetRow {
    /// Impression id.
    pub impression_id: String,
    /// Ad id.
    pub ad_id: i64,
    /// 1 when clicked within the window.
    pub label: i8,
    /// Model version that scored it.
    pub model_version: String,
    /// pCTR served.
    pub pctr: f32,
    /// The fallback chain's level that scored it (`model`, `fallback_model`,
    /// `prior`; `unspecified` before schema 5).
    pub score_level: String,
    /// Feature names.
    pub feature_names: Vec<String>,
    /// Feature values.
    pub feature_values: Vec<f32>,
    /// Categorical feature names (the footer's; empty before schema 4).
    pub categorical_names: Vec<String>,
    /// Categorical bucket ids, aligned with them.
    pub categorical_ids: Vec<i64>,
    /// Clicked at (ms), if clicked.
    pub clicked_at_ms: Option<i64>,
    /// `final`, `provisional` or `correction`.
    pub kind: String,
}

/// Every `*.parquet` file below `dir` (the dataset's `date=…/hour=…/`
/// directories included), sorted by path; none when `dir` does not exist.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "parquet") {
                paths.push(p);
            }
        }
    }
    paths.sort();
    paths
}

/// Where scripts/install.sh put the stack's tools: `$ADSTACK_HOME`, by
/// default `~/.cache/adserve`.
pub fn adstack_home() -> PathBuf {
    std::env::var("ADSTACK_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/adserve"))
}

/// Every row of every Parquet file below `dir` (the dataset's
/// `date=…/hour=…/` directories included), files in path order. Feature
/// names come from each file's footer (schema 3) or its `feature_names`
/// column (older files).
pub fn read_rows(dir: &Path) -> anyhow::Result<Vec<ParquetRow>> {
    let mut rows = Vec::new();
    let paths = parquet_files(dir);
    for path in paths {
        let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path)?)?;
        let footer = |key: &str| -> anyhow::Result<Option<Vec<String>>> {
            Ok(builder
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|k| k.key == key))
                .and_then(|k| k.value.as_deref())
                .map(serde_json::from_str)
                .transpose()?)
        };
        let footer_names = footer("adserve.feature_names")?;
        let categorical_names = footer("adserve.categorical_names")?.unwrap_or_default();
        let reader = builder.build()?;
        for batch in reader {
            let b = batch?;
            let col =
                |n: &str| b.column_by_name(n).cloned().with_context(|| format!("{}: no column {n}", path.display()));
            let ids = col("impression_id")?;
            let ad = col("ad_id")?;
            let label = col("label")?;
            let mv = col("model_version")?;
            let pctr = col("pctr")?;
            let values = col("feature_values")?;
            let clicked = col("clicked_at")?;
            let kind = b.column_by_name("row_kind").cloned();
            let level = b.column_by_name("score_level").cloned();
            let names = b.column_by_name("feature_names").cloned();
            let typed_ids = b.column_by_name("categorical_ids").cloned();
            let (ids, ad, label, mv, pctr) = (
                ids.as_string::<i32>(),
                ad.as_primitive::<arrow::datatypes::Int64Type>(),
                label.as_primitive::<arrow::datatypes::Int8Type>(),
                mv.as_string::<i32>(),
                pctr.as_primitive::<arrow::datatypes::Float32Type>(),
            );
            let values = values.as_list::<i32>();
            let clicked = clicked.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            for i in 0..b.num_rows() {
                let v = values.value(i);
                let feature_names = match (&footer_names, &names) {
                    (Some(n), _) => n.clone(),
                    (None, Some(col)) => {
                        let n = col.as_list::<i32>().value(i);
                        (0..n.len()).map(|j| n.as_string::<i32>().value(j).to_string()).collect()
                    }
                    (None, None) => bail!("{}: no feature names in footer or columns", path.display()),
                };
                rows.push(ParquetRow {
                    impression_id: ids.value(i).to_string(),
                    ad_id: ad.value(i),
                    label: label.value(i),
                    model_version: mv.value(i).to_string(),
                    pctr: pctr.value(i),
                    score_level: level.as_ref().map_or("unspecified", |l| l.as_string::<i32>().value(i)).to_string(),
                    feature_names,
                    feature_values: v.as_primitive::<arrow::datatypes::Float32Type>().values().to_vec(),
                    categorical_names: categorical_names.clone(),
                    categorical_ids: typed_ids.as_ref().map_or_else(Vec::new, |c| {
                        c.as_list::<i32>().value(i).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec()
                    }),
                    clicked_at_ms: (!clicked.is_null(i)).then(|| clicked.value(i)),
                    kind: kind.as_ref().map_or("final", |k| k.as_string::<i32>().value(i)).to_string(),
                });
            }
        }
    }
    Ok(rows)
}

/// A one-slot ad request of `user` on the stack's `feed_top` placement, from
/// a phone on the home surface.
pub fn ad_request(user: &str) -> adserve_proto::v1::GetAdsRequest {
    adserve_proto::v1::GetAdsRequest {
        user_id: user.into(),
        context: Some(adserve_proto::v1::RequestContext {
            placement: "feed_top".into(),
            device: "mobile".into(),
            surface: "home".into(),
            coppa: false,
        }),
        slots: 1,
        ..Default::default()
    }
}

/// A ranker process of a test's own on free ports, serving `model_dir`, not
/// following the registry unless `env` says so (`env` is applied last).
/// Returns the command (kill-on-drop), its gRPC and metrics ports.
pub fn ranker_command(model_dir: &Path, env: &[(&str, &str)]) -> (tokio::process::Command, u16, u16) {
    let dylib = std::env::var("ORT_DYLIB_PATH")
        .expect("ORT_DYLIB_PATH is unset: run the tests through `make test` (scripts/env.sh)");
    let (grpc, metrics) = (free_port(), free_port());
    let mut command = tokio::process::Command::new(binary("adserve-ranker"));
    command
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("ADSERVE_ONNXRUNTIME_DYLIB", dylib)
        .env("ADSERVE_MODEL__DIR", model_dir)
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn")
        .env("ADSERVE_REGISTRY__ENABLED", "false")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    (command, grpc, metrics)
}

/// Path of a workspace binary built by `cargo build` (same profile as the
/// tests). Panics when it is not what this checkout's sources build
/// ([`not_built_from`]), unless `ADSTACK_BIN_DIR` names the binaries to
/// use (whoever sets it chose them).
pub fn binary(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("ADSTACK_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // The test executable lives in <target>/<profile>/deps/.
    let path = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(|d| d.join(name)))
        .unwrap_or_else(|| repo_root().join("target/debug").join(name));
    // The workspace root as cargo names it in dep-info (not repo_root()'s "..").
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("/"));
    if let Some(why) = not_built_from(&path, root) {
        panic!(
            "{}: {why}. `cargo test -p adserve-integration-tests` does not rebuild the services its tests \
             start, so this run would test other code than this checkout's: run `cargo build --workspace` \
             first (make test does)",
            path.display()
        );
    }
    path
}

/// Why the binary at `path` is not what the sources under `root` build,
/// from the dep-info cargo writes beside it (`<name>.d`: every file the
/// build read): a file it was built from changed after it was, or it was
/// built from another checkout (one sharing `CARGO_TARGET_DIR`). `None`
/// when it is, or when the binary or its dep-info is missing (the spawn
/// says so).
pub fn not_built_from(path: &Path, root: &Path) -> Option<String> {
    let built = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    let info = std::fs::read_to_string(path.with_extension("d")).ok()?;
    // `target: dep dep ...` on the first line; spaces in a path are escaped.
    // Git's HEAD and refs are there for the commit the binary reports
    // (adserve-build-info), not for its code: a commit alone is not a change.
    let (_, deps) = info.lines().next()?.split_once(": ")?;
    let deps: Vec<PathBuf> = deps
        .replace("\\ ", "\0")
        .split_whitespace()
        .map(|dep| PathBuf::from(dep.replace('\0', " ")))
        .filter(|dep| !dep.components().any(|c| c.as_os_str() == ".git"))
        .collect();
    if !deps.is_empty() && !deps.iter().any(|dep| dep.starts_with(root)) {
        return Some(format!("built from another checkout, not {}", root.display()));
    }
    let changed = |dep: &PathBuf| std::fs::metadata(dep).and_then(|m| m.modified()).is_ok_and(|at| at > built);
    let dep = deps.iter().find(|dep| changed(dep))?;
    Some(format!("older than {}, one of the files it is built from", dep.display()))
}

/// A free loopback port.
/// Installs rustls's ring crypto provider for this process (once). reqwest
/// is built with rustls but no provider of its own (the label-joiner's
/// object storage picks ring, the workspace's one TLS provider), so every
/// client is built after this.
pub fn install_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A reqwest client builder, TLS provider installed.
pub fn http_builder() -> reqwest::ClientBuilder {
    install_tls();
    reqwest::Client::builder()
}

/// A default reqwest client, TLS provider installed.
pub fn http_client() -> reqwest::Client {
    http_builder().build().expect("a default reqwest client builds once a TLS provider is installed")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// The inode of the socket listening on TCP `port` (any local address).
fn listening_inode(port: u16) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let local_port = cols[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                return cols[9].parse().ok();
            }
        }
    }
    None
}

/// The process holding the listening socket of TCP `port`, found through
/// /proc (so it works for processes the test did not start).
pub fn listener_pid(port: u16) -> anyhow::Result<i32> {
    let inode = listening_inode(port).with_context(|| format!("nothing listens on port {port}"))?;
    let target = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target)) {
            return Ok(pid);
        }
    }
    bail!("no visible process owns the listening socket of port {port}")
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    #[test]
    fn a_binary_older_than_a_source_it_was_built_from_or_built_elsewhere_is_refused_and_a_commit_alone_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |secs: u64| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let touch = |name: &str, secs: u64| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::File::create(&path).expect("file").set_modified(at(secs)).expect("mtime");
            path
        };
        let bin = touch("target/adserve-x", 2_000);
        let src = touch("repo/src/main.rs", 1_000);
        let spaced = touch("repo/my src/lib.rs", 1_000);
        let head = touch("repo/.git/HEAD", 3_000);
        let line = format!(
            "{}: {} {} {}\n",
            bin.display(),
            src.display(),
            spaced.display().to_string().replace(' ', "\\ "),
            head.display()
        );
        std::fs::write(dir.path().join("target/adserve-x.d"), line).expect("dep-info");
        let repo = dir.path().join("repo");
        assert_eq!(
            not_built_from(&bin, &repo),
            None,
            "built after its sources; HEAD moved since: a commit, not an edit"
        );
        let elsewhere = not_built_from(&bin, &dir.path().join("other")).expect("another checkout");
        assert!(elsewhere.starts_with("built from another checkout"), "{elsewhere}");
        touch("repo/my src/lib.rs", 3_000);
        let stale = not_built_from(&bin, &repo).expect("stale");
        assert!(stale.contains(&spaced.display().to_string()), "{stale}");
        assert_eq!(not_built_from(&dir.path().join("missing"), &repo), None, "no binary: the spawn says so");
    }
}
