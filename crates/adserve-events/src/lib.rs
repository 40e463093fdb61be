//! Kafka: the one definition of topic names, event encoding, the producer
//! that acknowledges only once the broker has the event, and consumer setup.

mod publisher;

use std::time::Duration;

use adserve_core::{Invalid, check_duration, check_range};
use adserve_proto::v1::{ClickEvent, ImpressionEvent};
use prost::Message as _;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::StreamConsumer,
    error::RDKafkaErrorCode,
    message::{Header, OwnedHeaders},
};
use serde::{Deserialize, Serialize};

pub use publisher::{EventPublisher, Health};

/// Impressions, keyed by impression id, payload [`ImpressionEvent`].
pub const IMPRESSIONS_TOPIC: &str = "adserve.impressions.v1";
/// Clicks, keyed by impression id (co-partitioned with impressions), payload [`ClickEvent`].
pub const CLICKS_TOPIC: &str = "adserve.clicks.v1";
/// Messages no consumer could process, with the reason in headers.
pub const DEAD_LETTER_TOPIC: &str = "adserve.dead-letter.v1";
/// A shadow model's scores next to production's, keyed by request id,
/// payload [`adserve_proto::v1::ShadowScoreEvent`] (best effort).
pub const SHADOW_SCORES_TOPIC: &str = "adserve.shadow-scores.v1";
/// Every topic the system owns.
pub const TOPICS: [&str; 4] = [IMPRESSIONS_TOPIC, CLICKS_TOPIC, DEAD_LETTER_TOPIC, SHADOW_SCORES_TOPIC];

/// Header naming why a message was dead-lettered.
pub const HEADER_DLQ_REASON: &str = "adserve-dlq-reason";
/// Header naming the topic/partition/offset a dead letter came from.
pub const HEADER_DLQ_SOURCE: &str = "adserve-dlq-source";

/// Kafka connection settings, shared by producers and consumers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    /// Longest a publish may wait for the broker's acknowledgement.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Partitions for topics this service creates.
    pub partitions: i32,
    /// Replication factor for topics this service creates.
    pub replication: i32,
    /// After a producer's fatal error (or a failed label-joiner consumer
    /// loop), the wait before the first replacement; later ones double (with
    /// jitter) up to `recovery_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub recovery_backoff_min: Duration,
    /// Longest wait between replacements of a producer that keeps failing.
    #[serde(with = "humantime_serde")]
    pub recovery_backoff_max: Duration,
    /// Consumers: longest a fetch waits on the broker for new data
    /// (`fetch.wait.max.ms`). It bounds how late an event is read when the
    /// broker does not answer a fetch as soon as data arrives (librdkafka's
    /// default, 500 ms, was the aggregator's lag, and so the lag of the
    /// frequency caps it keeps); lower costs more empty fetches when idle.
    #[serde(with = "humantime_serde")]
    pub fetch_wait_max: Duration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            publish_timeout: Duration::from_secs(2),
            partitions: 1,
            replication: 1,
            recovery_backoff_min: Duration::from_millis(200),
            recovery_backoff_max: Duration::from_secs(30),
            fetch_wait_max: Duration::from_millis(100),
        }
    }
}

impl KafkaConfig {
    /// Validation shared by every service that uses Kafka.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.brokers.trim().is_empty() {
            return Err(Invalid::new("kafka.brokers", "required"));
        }
        check_duration(
            "kafka.publish_timeout",
            self.publish_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        check_duration(
            "kafka.recovery_backoff_min",
            self.recovery_backoff_min,
            Duration::from_millis(1),
            self.recovery_backoff_max,
        )?;
        check_duration("kafka.fetch_wait_max", self.fetch_wait_max, Duration::from_millis(1), Duration::from_secs(10))?;
        check_range("kafka.partitions", self.partitions, 1..=10_000)?;
        check_range("kafka.replication", self.replication, 1..=100)?;
        Ok(())
    }

    /// The backoff between replacements of a Kafka client that keeps
    /// failing (a fatal producer, the label-joiner's consumer loop):
    /// `recovery_backoff_min` doubling, with jitter, up to
    /// `recovery_backoff_max`, without limit on attempts.
    pub fn recovery_backoff(&self) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder as _;
        backon::ExponentialBuilder::default()
            .with_min_delay(self.recovery_backoff_min)
            .with_max_delay(self.recovery_backoff_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    pub(crate) fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    /// A consumer in `group_id` that never auto-commits and starts from the
    /// earliest offset when the group has none.
    pub fn consumer(&self, group_id: &str) -> Result<StreamConsumer, EventError> {
        self.consumer_with_context(group_id, rdkafka::consumer::DefaultConsumerContext)
    }

    /// [`KafkaConfig::consumer`] with a context of the caller's (e.g. one
    /// that flushes and commits before partitions are revoked). Partitions
    /// are assigned with the `range` strategy, so members of a group get the
    /// same partition numbers of co-partitioned topics (impressions and
    /// clicks).
    pub fn consumer_with_context<C: rdkafka::consumer::ConsumerContext + 'static>(
        &self,
        group_id: &str,
        context: C,
    ) -> Result<StreamConsumer<C>, EventError> {
        self.client()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("partition.assignment.strategy", "range")
            .set("fetch.wait.max.ms", self.fetch_wait_max.as_millis().max(1).to_string())
            .create_with_context(context)
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
    /// The producer hit a fatal error and is being replaced; nothing was sent.
    #[error("kafka producer recovering from a fatal error: {0}")]
    Recovering(String),
}

/// Where an acknowledged event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl EventPublisher {
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

    /// [`EventPublisher::dead_letter`], retried with backoff (five tries
    /// over about four seconds): a consumer skips a message only once the
    /// dead-letter topic has it, so the error returned here should stop the
    /// caller from committing past it.
    pub async fn dead_letter_patiently(
        &self,
        source: &str,
        key: &[u8],
        payload: &[u8],
        reason: &str,
    ) -> Result<Ack, EventError> {
        use backon::Retryable as _;
        (|| self.dead_letter(source, key, payload, reason))
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(5)
                    .with_jitter(),
            )
            .notify(|e, after| tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "dead-letter publish failed"))
            .await
    }
}

/// How often [`report_health`] probes its publisher.
pub const HEALTH_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Keeps `readiness` in step with `publisher`: `dependency` is reported down
/// while the producer is recovering from a fatal error. The probe also
/// drives the recovery, so it happens without traffic. Runs until the
/// process exits.
pub fn report_health(publisher: EventPublisher, readiness: adserve_core::Readiness, dependency: &'static str) {
    publisher.report_to(readiness, dependency);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Notices a fatal producer without traffic and rebuilds it when due;
            // readiness is updated by the publisher as its state changes.
            let _ = publisher.health();
        }
    });
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

/// Why a payload is not a valid event (the reason a dead letter carries).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not a protobuf message of the expected type.
    #[error("not a valid {message}: {source}")]
    Malformed {
        /// The expected message.
        message: &'static str,
        /// prost's error.
        source: prost::DecodeError,
    },
    /// A required field is empty or absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// The served feature row has as many names as values.
    #[error("ImpressionEvent.features has {names} names and {values} values")]
    RaggedFeatures {
        /// Names sent.
        names: usize,
        /// Values sent.
        values: usize,
    },
    /// The served row's typed blocks do not match their names.
    #[error("ImpressionEvent.features: {0}")]
    RaggedTypedFeatures(String),
}

/// Decodes an impression payload.
pub fn decode_impression(payload: &[u8]) -> Result<ImpressionEvent, DecodeError> {
    let e = ImpressionEvent::decode(payload)
        .map_err(|source| DecodeError::Malformed { message: "ImpressionEvent", source })?;
    if e.impression_id.is_empty() {
        return Err(DecodeError::Missing("ImpressionEvent.impression_id"));
    }
    let features = e.features.as_ref().ok_or(DecodeError::Missing("ImpressionEvent.features"))?;
    if features.names.len() != features.values.len() {
        return Err(DecodeError::RaggedFeatures { names: features.names.len(), values: features.values.len() });
    }
    if features.categorical_names.len() != features.categorical_ids.len() {
        return Err(DecodeError::RaggedTypedFeatures(format!(
            "{} categorical_names and {} categorical_ids",
            features.categorical_names.len(),
            features.categorical_ids.len()
        )));
    }
    let width: usize = features.embedding_dims.iter().map(|d| *d as usize).sum();
    if features.embedding_dims.len() != features.embedding_names.len() || width != features.embedding_values.len() {
        return Err(DecodeError::RaggedTypedFeatures(format!(
            "{} embedding_names with {} embedding_dims summing to {width}, and {} embedding_values",
            features.embedding_names.len(),
            features.embedding_dims.len(),
            features.embedding_values.len()
        )));
    }
    if e.served_at.is_none() {
        return Err(DecodeError::Missing("ImpressionEvent.served_at"));
    }
    Ok(e)
}

/// Decodes a click payload.
pub fn decode_click(payload: &[u8]) -> Result<ClickEvent, DecodeError> {
    let e = ClickEvent::decode(payload).map_err(|source| DecodeError::Malformed { message: "ClickEvent", source })?;
    if e.impression_id.is_empty() {
        return Err(DecodeError::Missing("ClickEvent.impression_id"));
    }
    if e.clicked_at.is_none() {
        return Err(DecodeError::Missing("ClickEvent.clicked_at"));
    }
    Ok(e)
}

/// The low and high watermarks of `topic`/`partition` as of the consumer's
/// last fetch response, without asking the broker (librdkafka keeps them
/// from every fetch, empty ones included). None until a fetch for the
/// partition has answered. A consumer loop can check on every tick whether
/// it has read a partition to its end this way; `fetch_watermarks` costs a
/// broker round trip each time, and at a few per tick it starved the loop.
pub fn cached_watermarks<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `client` is borrowed; the
    // topic string outlives the call, which only reads it; low and high
    // are written by the call and owned here.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;
    use adserve_proto::v1::FeatureRow;

    #[test]
    fn garbage_is_not_an_impression() {
        let e = decode_impression(b"\xff\xff\xff").unwrap_err();
        assert!(matches!(e, DecodeError::Malformed { message: "ImpressionEvent", .. }), "{e}");
        assert!(e.to_string().starts_with("not a valid ImpressionEvent"), "{e}");
        assert_eq!(decode_impression(&[]).unwrap_err(), DecodeError::Missing("ImpressionEvent.impression_id"));
    }

    #[test]
    fn ragged_feature_rows_are_refused() {
        let e = ImpressionEvent {
            impression_id: "i".into(),
            served_at: Some(prost_types::Timestamp::default()),
            features: Some(FeatureRow { names: vec!["a".into()], values: vec![], ..Default::default() }),
            ..Default::default()
        };
        let err = decode_impression(&e.encode_to_vec()).unwrap_err();
        assert_eq!(err, DecodeError::RaggedFeatures { names: 1, values: 0 });
        assert!(err.to_string().contains("1 names and 0 values"));
        let typed = |row: FeatureRow| {
            let e = ImpressionEvent { features: Some(row), ..e.clone() };
            decode_impression(&e.encode_to_vec())
        };
        let row = FeatureRow { names: vec!["a".into()], values: vec![0.5], ..Default::default() };
        let ids = FeatureRow { categorical_names: vec!["c".into()], categorical_ids: vec![], ..row.clone() };
        assert!(typed(ids).unwrap_err().to_string().contains("1 categorical_names and 0 categorical_ids"));
        let vecs = FeatureRow {
            embedding_names: vec!["v".into()],
            embedding_dims: vec![2],
            embedding_values: vec![0.1],
            ..row.clone()
        };
        assert!(typed(vecs).unwrap_err().to_string().contains("summing to 2, and 1 embedding_values"));
        let ok = FeatureRow {
            categorical_names: vec!["c".into()],
            categorical_ids: vec![7],
            embedding_names: vec!["v".into()],
            embedding_dims: vec![2],
            embedding_values: vec![0.1, 0.2],
            ..row
        };
        assert!(typed(ok).is_ok());
    }

    #[test]
    fn impressions_round_trip() {
        let e = ImpressionEvent {
            impression_id: "i".into(),
            served_at: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
            features: Some(FeatureRow { names: vec!["a".into()], values: vec![0.5], ..Default::default() }),
            pctr: 0.25,
            ..Default::default()
        };
        assert_eq!(decode_impression(&e.encode_to_vec()).unwrap(), e);
    }

    #[test]
    fn click_needs_impression_id_and_time() {
        let c =
            ClickEvent { click_id: "c".into(), impression_id: String::new(), clicked_at: None, ..Default::default() };
        assert_eq!(decode_click(&c.encode_to_vec()).unwrap_err(), DecodeError::Missing("ClickEvent.impression_id"));
    }
}
