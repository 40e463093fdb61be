//! Kafka: the one definition of topic names, event encoding, the producer
//! that acknowledges only once the broker has the event, and consumer setup.

use std::time::Duration;

use adserve_proto::v1::{ClickEvent, ImpressionEvent};
use prost::Message as _;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::StreamConsumer,
    error::RDKafkaErrorCode,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde::{Deserialize, Serialize};

/// Impressions, keyed by impression id, payload [`ImpressionEvent`].
pub const IMPRESSIONS_TOPIC: &str = "adserve.impressions.v1";
/// Clicks, keyed by impression id (co-partitioned with impressions), payload [`ClickEvent`].
pub const CLICKS_TOPIC: &str = "adserve.clicks.v1";
/// Messages no consumer could process, with the reason in headers.
pub const DEAD_LETTER_TOPIC: &str = "adserve.dead-letter.v1";
/// Every topic the system owns.
pub const TOPICS: [&str; 3] = [IMPRESSIONS_TOPIC, CLICKS_TOPIC, DEAD_LETTER_TOPIC];

/// Header naming why a message was dead-lettered.
pub const HEADER_DLQ_REASON: &str = "adserve-dlq-reason";
/// Header naming the topic/partition/offset a dead letter came from.
pub const HEADER_DLQ_SOURCE: &str = "adserve-dlq-source";

/// Kafka connection settings, shared by producers and consumers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    /// Longest a publish may wait for the broker's acknowledgement.
    pub publish_timeout_ms: u64,
    /// Partitions for topics this service creates.
    pub partitions: i32,
    /// Replication factor for topics this service creates.
    pub replication: i32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self { brokers: "127.0.0.1:9092".into(), publish_timeout_ms: 2000, partitions: 1, replication: 1 }
    }
}

impl KafkaConfig {
    /// Validation shared by every service that uses Kafka.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("kafka.brokers: required".into());
        }
        if self.publish_timeout_ms == 0 || self.publish_timeout_ms > 60_000 {
            return Err("kafka.publish_timeout_ms: must be in 1..=60000".into());
        }
        if self.partitions < 1 || self.replication < 1 {
            return Err("kafka.partitions / kafka.replication: must be >= 1".into());
        }
        Ok(())
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    /// A consumer in `group_id` that never auto-commits and starts from the
    /// earliest offset when the group has none.
    pub fn consumer(&self, group_id: &str) -> Result<StreamConsumer, EventError> {
        self.client()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .create()
            .map_err(|e| EventError::Kafka(e.to_string()))
    }
}

/// A Kafka failure.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The broker did not acknowledge in time, or refused.
    #[error("kafka: {0}")]
    Kafka(String),
    /// The broker did not acknowledge within the publish timeout.
    #[error("kafka: no acknowledgement within {0} ms")]
    Timeout(u64),
}

/// Where an acknowledged event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Publishes events with an idempotent producer (acks=all); each publish
/// returns only once the broker has acknowledged the event.
#[derive(Clone)]
pub struct EventPublisher {
    producer: FutureProducer,
    timeout: Duration,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl EventPublisher {
    /// A publisher for `config`. Connects lazily.
    pub fn new(config: &KafkaConfig) -> Result<Self, EventError> {
        let timeout_ms = config.publish_timeout_ms.to_string();
        let producer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", &timeout_ms)
            .set("socket.timeout.ms", &timeout_ms)
            .create()
            .map_err(|e| EventError::Kafka(e.to_string()))?;
        Ok(Self { producer, timeout: Duration::from_millis(config.publish_timeout_ms) })
    }

    /// Publishes an impression, keyed by its id.
    pub async fn impression(&self, event: &ImpressionEvent) -> Result<Ack, EventError> {
        self.send(IMPRESSIONS_TOPIC, &event.impression_id, &event.encode_to_vec(), None).await
    }

    /// Publishes a click, keyed by its impression id.
    pub async fn click(&self, event: &ClickEvent) -> Result<Ack, EventError> {
        self.send(CLICKS_TOPIC, &event.impression_id, &event.encode_to_vec(), None).await
    }

    /// Sends a message that could not be processed to the dead-letter topic.
    pub async fn dead_letter(&self, source: &str, key: &[u8], payload: &[u8], reason: &str) -> Result<Ack, EventError> {
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_DLQ_REASON, value: Some(reason) })
            .insert(Header { key: HEADER_DLQ_SOURCE, value: Some(source) });
        let key = String::from_utf8_lossy(key).into_owned();
        self.send(DEAD_LETTER_TOPIC, &key, payload, Some(headers)).await
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<Ack, EventError> {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let started = std::time::Instant::now();
        let result =
            tokio::time::timeout(self.timeout + Duration::from_millis(100), self.producer.send(record, self.timeout))
                .await;
        let outcome = match result {
            Ok(Ok(d)) => Ok(Ack { partition: d.partition, offset: d.offset }),
            Ok(Err((e, _))) => Err(EventError::Kafka(e.to_string())),
            Err(_) => Err(EventError::Timeout(self.timeout.as_millis() as u64)),
        };
        let status = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!("adserve_events_published_total", "topic" => topic.to_string(), "status" => status)
            .increment(1);
        metrics::histogram!("adserve_events_publish_seconds", "topic" => topic.to_string())
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

/// Creates the system's topics if they do not exist (idempotent).
pub async fn ensure_topics(config: &KafkaConfig) -> Result<(), EventError> {
    let admin: AdminClient<DefaultClientContext> =
        config.client().create().map_err(|e| EventError::Kafka(e.to_string()))?;
    let topics: Vec<NewTopic> = TOPICS
        .iter()
        .map(|t| NewTopic::new(t, config.partitions, TopicReplication::Fixed(config.replication)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(5)))
        .request_timeout(Some(Duration::from_secs(5)));
    let results = admin.create_topics(&topics, &options).await.map_err(|e| EventError::Kafka(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(EventError::Kafka(format!("create topic {topic}: {code}"))),
        }
    }
    Ok(())
}

/// Decodes an impression payload.
pub fn decode_impression(payload: &[u8]) -> Result<ImpressionEvent, String> {
    let e = ImpressionEvent::decode(payload).map_err(|e| format!("not an ImpressionEvent: {e}"))?;
    if e.impression_id.is_empty() {
        return Err("ImpressionEvent.impression_id is empty".into());
    }
    let features = e.features.as_ref().ok_or("ImpressionEvent.features is missing")?;
    if features.names.len() != features.values.len() {
        return Err(format!(
            "ImpressionEvent.features has {} names and {} values",
            features.names.len(),
            features.values.len()
        ));
    }
    if e.served_at.is_none() {
        return Err("ImpressionEvent.served_at is missing".into());
    }
    Ok(e)
}

/// Decodes a click payload.
pub fn decode_click(payload: &[u8]) -> Result<ClickEvent, String> {
    let e = ClickEvent::decode(payload).map_err(|e| format!("not a ClickEvent: {e}"))?;
    if e.impression_id.is_empty() {
        return Err("ClickEvent.impression_id is empty".into());
    }
    if e.clicked_at.is_none() {
        return Err("ClickEvent.clicked_at is missing".into());
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use adserve_proto::v1::FeatureRow;

    #[test]
    fn garbage_is_not_an_impression() {
        assert!(decode_impression(b"\xff\xff\xff").is_err());
        assert!(decode_impression(&[]).unwrap_err().contains("impression_id"));
    }

    #[test]
    fn ragged_feature_rows_are_refused() {
        let e = ImpressionEvent {
            impression_id: "i".into(),
            served_at: Some(prost_types::Timestamp::default()),
            features: Some(FeatureRow { names: vec!["a".into()], values: vec![] }),
            ..Default::default()
        };
        assert!(decode_impression(&e.encode_to_vec()).unwrap_err().contains("1 names and 0 values"));
    }

    #[test]
    fn impressions_round_trip() {
        let e = ImpressionEvent {
            impression_id: "i".into(),
            served_at: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
            features: Some(FeatureRow { names: vec!["a".into()], values: vec![0.5] }),
            pctr: 0.25,
            ..Default::default()
        };
        assert_eq!(decode_impression(&e.encode_to_vec()).unwrap(), e);
    }

    #[test]
    fn click_needs_impression_id_and_time() {
        let c = ClickEvent { click_id: "c".into(), impression_id: String::new(), clicked_at: None };
        assert!(decode_click(&c.encode_to_vec()).unwrap_err().contains("impression_id"));
    }
}
