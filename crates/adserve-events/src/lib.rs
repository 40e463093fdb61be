//! Kafka: the one definition of topic names, event encoding, the producer
//! that acknowledges only once the broker has the event, and consumer setup.

mod publisher;

use std::{borrow::Cow, time::Duration};

use adserve_core::{Invalid, check_duration, check_range};
use adserve_proto::{
    limits::MAX_SLOTS,
    v1::{ClickEvent, ImpressionBatch, ImpressionEvent},
};
use prost::Message as _;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::StreamConsumer,
    error::RDKafkaErrorCode,
    message::{Header, Headers, OwnedHeaders},
};
use serde::{Deserialize, Serialize};

pub use publisher::{EventPublisher, Health};

/// Impressions, keyed by [`join_key`], payload one [`ImpressionEvent`] or
/// (header [`HEADER_PAYLOAD`] = [`IMPRESSION_BATCH`]) one [`ImpressionBatch`].
pub const IMPRESSIONS_TOPIC: &str = "adserve.impressions.v1";
/// Clicks and billing notices, keyed by the [`join_key`] of their impression
/// (co-partitioned with impressions), payload [`ClickEvent`].
pub const CLICKS_TOPIC: &str = "adserve.clicks.v1";
/// Messages no consumer could process, with the reason in headers.
pub const DEAD_LETTER_TOPIC: &str = "adserve.dead-letter.v1";
/// A shadow model's scores next to production's, keyed by request id,
/// payload [`adserve_proto::v1::ShadowScoreEvent`] (best effort).
pub const SHADOW_SCORES_TOPIC: &str = "adserve.shadow-scores.v1";
/// Every topic the system owns.
pub const TOPICS: [&str; 4] = [IMPRESSIONS_TOPIC, CLICKS_TOPIC, DEAD_LETTER_TOPIC, SHADOW_SCORES_TOPIC];

/// Header naming a message's payload type where a topic carries more than
/// one (the impressions topic); absent means the topic's single-event type.
pub const HEADER_PAYLOAD: &str = "adserve-payload";
/// [`HEADER_PAYLOAD`] of an impressions message holding an [`ImpressionBatch`].
pub const IMPRESSION_BATCH: &str = "adserve.v1.ImpressionBatch";

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

/// Impression ids for an answer of `n` ads (`1..=MAX_SLOTS`), in slot
/// order, sharing one [`join_key`]. One ad: a version 7 UUID, its own join
/// key. More: version 8 UUIDs, a version 7 UUID's time and randomness with
/// the ad's index in its last 16 bits, so the ids stay unique and
/// time-ordered, and zeroing those bits gives the answer's join key (the
/// first id).
pub fn answer_impression_ids(n: usize) -> Vec<String> {
    let first = uuid::Uuid::now_v7();
    if n <= 1 {
        return (0..n).map(|_| first.to_string()).collect();
    }
    let base = first.into_bytes();
    (0..n)
        .map(|i| {
            let mut bytes = base;
            bytes[14..].copy_from_slice(&u16::try_from(i).unwrap_or(u16::MAX).to_be_bytes());
            uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
        })
        .collect()
}

/// The Kafka key of every event about the impression `impression_id`: its
/// answer's first impression id for the version 8 ids of a multi-slot answer
/// ([`answer_impression_ids`]), the id itself for any other. Keying the
/// impressions of one answer (one message) and each one's clicks and notices
/// alike keeps them on one partition of the co-partitioned topics.
pub fn join_key(impression_id: &str) -> Cow<'_, str> {
    match uuid::Uuid::try_parse(impression_id) {
        Ok(id) if id.get_version_num() == 8 => {
            let mut bytes = id.into_bytes();
            bytes[14..].fill(0);
            Cow::Owned(uuid::Uuid::from_bytes(bytes).to_string())
        }
        _ => Cow::Borrowed(impression_id),
    }
}

impl EventPublisher {
    /// Publishes an impression, keyed by its [`join_key`].
    pub async fn impression(&self, event: &ImpressionEvent) -> Result<Ack, EventError> {
        self.send(IMPRESSIONS_TOPIC, &join_key(&event.impression_id), &event.encode_to_vec(), None).await
    }

    /// Publishes every impression of one answer in one message, so the
    /// broker has all of them or none: one [`ImpressionEvent`] alone, more
    /// as an [`ImpressionBatch`]. Their ids must come from one
    /// [`answer_impression_ids`] (they share a join key, the message's key).
    pub async fn impressions(&self, events: &[ImpressionEvent]) -> Result<Ack, EventError> {
        match events {
            [] => Err(EventError::Kafka("no impressions to publish".into())),
            [one] => self.impression(one).await,
            many => {
                let key = join_key(&many[0].impression_id);
                if let Some(stray) = many.iter().find(|e| join_key(&e.impression_id) != key) {
                    return Err(EventError::Kafka(format!(
                        "impression {} is not of the answer keyed {key}",
                        stray.impression_id
                    )));
                }
                let batch = ImpressionBatch { impressions: many.to_vec() };
                let headers = OwnedHeaders::new().insert(Header { key: HEADER_PAYLOAD, value: Some(IMPRESSION_BATCH) });
                self.send(IMPRESSIONS_TOPIC, &key, &batch.encode_to_vec(), Some(headers)).await
            }
        }
    }

    /// Publishes a click (or billing notice), keyed by its impression's [`join_key`].
    pub async fn click(&self, event: &ClickEvent) -> Result<Ack, EventError> {
        self.send(CLICKS_TOPIC, &join_key(&event.impression_id), &event.encode_to_vec(), None).await
    }

    /// Sends a message that could not be processed to the dead-letter topic,
    /// with why and where from, and its payload type so it can be decoded
    /// and replayed.
    pub async fn dead_letter(&self, m: &Refused<'_>) -> Result<Ack, EventError> {
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_DLQ_REASON, value: Some(m.reason) })
            .insert(Header { key: HEADER_DLQ_SOURCE, value: Some(m.source) });
        if let Some(kind) = m.payload_type {
            headers = headers.insert(Header { key: HEADER_PAYLOAD, value: Some(kind) });
        }
        let key = String::from_utf8_lossy(m.key).into_owned();
        self.send(DEAD_LETTER_TOPIC, &key, m.payload, Some(headers)).await
    }

    /// [`EventPublisher::dead_letter`], retried with backoff (five tries
    /// over about four seconds): a consumer skips a message only once the
    /// dead-letter topic has it, so the error returned here should stop the
    /// caller from committing past it.
    pub async fn dead_letter_patiently(&self, m: &Refused<'_>) -> Result<Ack, EventError> {
        use backon::Retryable as _;
        (|| self.dead_letter(m))
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

/// A message a consumer refused, as it goes to the dead-letter topic.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    /// `topic/partition/offset` it was read at ([`HEADER_DLQ_SOURCE`]).
    pub source: &'a str,
    /// Its key.
    pub key: &'a [u8],
    /// Its bytes, as read.
    pub payload: &'a [u8],
    /// Its [`HEADER_PAYLOAD`], if it had one.
    pub payload_type: Option<&'a str>,
    /// Why it was refused ([`HEADER_DLQ_REASON`]).
    pub reason: &'a str,
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
    /// An impressions message that is not one answer's valid impressions.
    #[error("ImpressionBatch {0}")]
    Batch(String),
}

/// The [`HEADER_PAYLOAD`] of a message, if it has one that is UTF-8.
pub fn payload_type<H: Headers>(headers: Option<&H>) -> Option<&str> {
    let headers = headers?;
    (0..headers.count())
        .map(|i| headers.get(i))
        .find(|h| h.key == HEADER_PAYLOAD)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Decodes a message of the impressions topic, whose [`HEADER_PAYLOAD`] is
/// `payload_type`: one impression, or every impression of one multi-slot
/// answer (an [`ImpressionBatch`]: 2 to `MAX_SLOTS` valid impressions sharing
/// one [`join_key`]). A batch is refused whole if any of it is invalid: it is
/// one answer, logged whole or not at all.
pub fn decode_impressions(payload: &[u8], payload_type: Option<&str>) -> Result<Vec<ImpressionEvent>, DecodeError> {
    match payload_type {
        None => Ok(vec![decode_impression(payload)?]),
        Some(IMPRESSION_BATCH) => {
            let batch = ImpressionBatch::decode(payload)
                .map_err(|source| DecodeError::Malformed { message: "ImpressionBatch", source })?;
            let n = batch.impressions.len();
            if !(2..=MAX_SLOTS).contains(&n) {
                return Err(DecodeError::Batch(format!("holds {n} impressions, not 2..={MAX_SLOTS}")));
            }
            let key = join_key(&batch.impressions[0].impression_id).into_owned();
            for (i, e) in batch.impressions.iter().enumerate() {
                check_impression(e).map_err(|e| DecodeError::Batch(format!("impressions[{i}]: {e}")))?;
                if join_key(&e.impression_id) != key.as_str() {
                    return Err(DecodeError::Batch(format!(
                        "impressions[{i}]: {} is not of the answer keyed {key}",
                        e.impression_id
                    )));
                }
            }
            Ok(batch.impressions)
        }
        Some(other) => Err(DecodeError::Batch(format!("unknown {HEADER_PAYLOAD} {other:?}"))),
    }
}

/// Decodes an impression payload.
pub fn decode_impression(payload: &[u8]) -> Result<ImpressionEvent, DecodeError> {
    let e = ImpressionEvent::decode(payload)
        .map_err(|source| DecodeError::Malformed { message: "ImpressionEvent", source })?;
    check_impression(&e)?;
    Ok(e)
}

/// The checks every decoded impression passes.
fn check_impression(e: &ImpressionEvent) -> Result<(), DecodeError> {
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
    Ok(())
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

    fn valid(id: &str) -> ImpressionEvent {
        ImpressionEvent {
            impression_id: id.into(),
            served_at: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
            features: Some(FeatureRow { names: vec!["a".into()], values: vec![0.5], ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn one_answer_shares_one_join_key_and_others_are_their_own() {
        let one = answer_impression_ids(1);
        assert_eq!(one.len(), 1);
        assert_eq!(uuid::Uuid::parse_str(&one[0]).unwrap().get_version_num(), 7);
        assert_eq!(join_key(&one[0]), one[0].as_str(), "a one-ad answer is keyed as before");

        let ids = answer_impression_ids(MAX_SLOTS);
        assert_eq!(ids.len(), MAX_SLOTS);
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), MAX_SLOTS, "{ids:?}");
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 8, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(join_key(id), ids[0].as_str(), "every ad of the answer is keyed by the first id");
        }
        let other = answer_impression_ids(2);
        assert_ne!(join_key(&other[1]), join_key(&ids[1]), "two answers are two keys");
        // A v4 id, or anything that is not a UUID, is its own key.
        let v4 = uuid::Uuid::new_v4().to_string();
        assert_eq!(join_key(&v4), v4.as_str());
        assert_eq!(join_key("not-a-uuid"), "not-a-uuid");
        assert!(answer_impression_ids(0).is_empty());
    }

    #[test]
    fn a_batch_is_one_answer_decoded_whole_or_refused_whole() {
        let ids = answer_impression_ids(3);
        let events: Vec<_> = ids.iter().map(|id| valid(id)).collect();
        let payload = ImpressionBatch { impressions: events.clone() }.encode_to_vec();
        assert_eq!(decode_impressions(&payload, Some(IMPRESSION_BATCH)).unwrap(), events);
        // Without the header the message is one impression, as before.
        let single = valid(&answer_impression_ids(1)[0]);
        assert_eq!(decode_impressions(&single.encode_to_vec(), None).unwrap(), vec![single.clone()]);

        let refused = |impressions: Vec<ImpressionEvent>| {
            decode_impressions(&ImpressionBatch { impressions }.encode_to_vec(), Some(IMPRESSION_BATCH))
                .unwrap_err()
                .to_string()
        };
        let mut ragged = events.clone();
        ragged[2].features.as_mut().unwrap().values.clear();
        assert!(refused(ragged).contains("impressions[2]: ImpressionEvent.features has 1 names and 0 values"));
        let mut stray = events.clone();
        stray[1] = valid(&answer_impression_ids(2)[1]);
        let e = refused(stray);
        assert!(e.contains("impressions[1]") && e.contains(&format!("not of the answer keyed {}", ids[0])), "{e}");
        assert!(refused(vec![events[0].clone()]).contains("holds 1 impressions, not 2..=10"));
        assert!(refused(vec![]).contains("holds 0 impressions"));
        let e = decode_impressions(b"\xff\xff", Some(IMPRESSION_BATCH)).unwrap_err();
        assert!(matches!(e, DecodeError::Malformed { message: "ImpressionBatch", .. }), "{e}");
        let e = decode_impressions(&payload, Some("adserve.v9.Other")).unwrap_err();
        assert!(e.to_string().contains("unknown adserve-payload \"adserve.v9.Other\""), "{e}");
    }

    #[test]
    fn the_payload_type_is_read_from_the_headers() {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "other", value: Some("x") })
            .insert(Header { key: HEADER_PAYLOAD, value: Some(IMPRESSION_BATCH) });
        assert_eq!(payload_type(Some(&headers)), Some(IMPRESSION_BATCH));
        assert_eq!(payload_type(Some(&OwnedHeaders::new())), None);
        assert_eq!(payload_type::<OwnedHeaders>(None), None);
    }

    #[test]
    fn click_needs_impression_id_and_time() {
        let c =
            ClickEvent { click_id: "c".into(), impression_id: String::new(), clicked_at: None, ..Default::default() };
        assert_eq!(decode_click(&c.encode_to_vec()).unwrap_err(), DecodeError::Missing("ClickEvent.impression_id"));
    }
}
