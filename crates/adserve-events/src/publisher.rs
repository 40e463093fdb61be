//! The acknowledged event publisher, and its recovery from librdkafka's
//! fatal state.
//!
//! An idempotent producer can end in a *fatal* error (ProducerFenced after
//! the broker froze for longer than the transaction timeout, an
//! out-of-sequence ack, ...). librdkafka never leaves that state: every later
//! send fails at once, for as long as the process lives. The publisher
//! notices (on a failed send, and on every [`EventPublisher::health`] probe),
//! reports itself unhealthy, raises `adserve_events_producer_fatal_total`,
//! and replaces the producer with a fresh one (a new producer id) after a
//! bounded, jittered exponential backoff. Sends during the backoff fail fast
//! instead of waiting out the publish timeout.

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::OwnedHeaders,
    producer::{FutureProducer, FutureRecord, Producer as _},
};

use crate::{Ack, EventError, KafkaConfig};

/// Whether the publisher can publish right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The producer is usable.
    Ready,
    /// The producer hit a fatal error; a fresh one is built at `retry_in`.
    Recovering {
        /// The fatal error.
        reason: String,
        /// Until the next rebuild attempt.
        retry_in: Duration,
    },
}

/// Publishes events with an idempotent producer (acks=all); each publish
/// returns only once the broker has acknowledged the event. Cheap to clone:
/// clones share the producer and its recovery state.
#[derive(Clone)]
pub struct EventPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    timeout: Duration,
    /// Label of this publisher's metrics (e.g. "gateway", "dead-letter").
    client: &'static str,
    producer: RwLock<Arc<FutureProducer>>,
    recovery: Mutex<Recovery>,
    /// `recovery.fatal.is_some()`, readable without the lock: the healthy
    /// send path checks it on every event.
    fatal: AtomicBool,
    /// The backoff has advanced since it was last reset; the first
    /// successful send after a recovery resets it.
    escalated: AtomicBool,
    /// Where to report the producer's health, and as which dependency.
    readiness: Mutex<Option<(adserve_core::Readiness, &'static str)>>,
    /// Topics whose metadata a new producer fetches before it is used
    /// ([`EventPublisher::warm_up`]).
    warm_topics: Mutex<Vec<String>>,
}

/// Longest a replacement producer is warmed before it is used anyway.
const WARM_LIMIT: Duration = Duration::from_secs(5);

/// Fetches each topic's metadata with `producer`: broker connections, the
/// partition leaders, and (idempotent producers) the producer id, which the
/// first send would otherwise wait for.
fn warm(producer: &FutureProducer, topics: &[String], limit: Duration) -> Result<(), EventError> {
    for topic in topics {
        producer
            .client()
            .fetch_metadata(Some(topic), limit)
            .map_err(|e| EventError::Kafka(format!("metadata of {topic}: {e}")))?;
    }
    Ok(())
}

struct Recovery {
    /// Set while the current producer is known to be fatal.
    fatal: Option<String>,
    /// When the next rebuild may happen.
    next_rebuild: Instant,
    backoff: backon::ExponentialBackoff,
}

/// Errors after which this producer instance will never deliver again,
/// whether or not librdkafka raises its fatal flag. Seen here: after the
/// broker was frozen for 10 s, tansu answered every produce of the old
/// producer id with ProducerFenced, and librdkafka kept the producer, so every
/// later send failed the same way for as long as the process lived.
fn fences_the_producer(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::InvalidProducerIdMapping
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
    )
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("client", &self.inner.client)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

fn build_producer(config: &KafkaConfig) -> Result<FutureProducer, EventError> {
    let timeout_ms = config.publish_timeout.as_millis().to_string();
    config
        .client()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", &timeout_ms)
        .set("socket.timeout.ms", &timeout_ms)
        .create()
        .map_err(|e| EventError::Kafka(e.to_string()))
}

impl EventPublisher {
    /// A publisher for `config`, whose metrics carry `client` as their
    /// `client` label. Connects lazily.
    pub fn new(config: &KafkaConfig, client: &'static str) -> Result<Self, EventError> {
        let producer = build_producer(config)?;
        metrics::gauge!("adserve_events_producer_ready", "client" => client).set(1.0);
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                timeout: config.publish_timeout,
                client,
                producer: RwLock::new(Arc::new(producer)),
                recovery: Mutex::new(Recovery {
                    fatal: None,
                    next_rebuild: Instant::now(),
                    backoff: config.recovery_backoff(),
                }),
                fatal: AtomicBool::new(false),
                escalated: AtomicBool::new(false),
                readiness: Mutex::new(None),
                warm_topics: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Makes the producer ready to send to `topics` at once: a fresh
    /// librdkafka producer's first send waits for broker discovery and
    /// topic metadata (about 500 ms on the local broker, longer than the
    /// gateway's publish timeout), so a service calls this before it reports
    /// ready. Remembered: a producer replacing a fatal one is warmed the same
    /// way before it takes traffic.
    pub async fn warm_up(&self, topics: &[&str], limit: Duration) -> Result<(), EventError> {
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_string()).collect();
        *self.inner.warm_topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = topics.clone();
        let producer = self.current();
        tokio::task::spawn_blocking(move || warm(&producer, &topics, limit))
            .await
            .map_err(|e| EventError::Kafka(format!("warm-up: {e}")))?
    }

    /// Whether the publisher can publish; also notices a fatal producer and
    /// rebuilds it when its backoff has passed. Call it periodically (the
    /// gateway's readiness probe does) so recovery needs no traffic.
    pub fn health(&self) -> Health {
        let producer = self.current();
        if let Some((code, reason)) = producer.client().fatal_error() {
            self.mark_fatal(&producer, format!("{code:?}: {reason}"));
        }
        if !self.inner.fatal.load(Ordering::Acquire) {
            return Health::Ready;
        }
        self.maybe_rebuild();
        let recovery = self.inner.recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &recovery.fatal {
            None => Health::Ready,
            Some(reason) => Health::Recovering {
                reason: reason.clone(),
                retry_in: recovery.next_rebuild.saturating_duration_since(Instant::now()),
            },
        }
    }

    /// Reports this publisher's health to `readiness` as `dependency`, at
    /// the moment it changes (not at the next probe).
    pub fn report_to(&self, readiness: adserve_core::Readiness, dependency: &'static str) {
        if let Health::Recovering { reason, .. } = self.health() {
            readiness.set(dependency, Some(reason));
        }
        *self.inner.readiness.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((readiness, dependency));
    }

    fn report(&self, problem: Option<String>) {
        if let Some((readiness, dependency)) =
            self.inner.readiness.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
        {
            readiness.set(dependency, problem);
        }
    }

    fn current(&self) -> Arc<FutureProducer> {
        self.inner.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Records that `producer` is fatal (once per producer) and schedules its
    /// replacement.
    fn mark_fatal(&self, producer: &Arc<FutureProducer>, reason: String) {
        if !Arc::ptr_eq(producer, &self.current()) {
            return; // already replaced
        }
        let mut r = self.inner.recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.fatal.is_some() {
            return;
        }
        let delay = self.next_delay(&mut r);
        r.next_rebuild = Instant::now() + delay;
        tracing::error!(client = self.inner.client, %reason, retry_in_ms = delay.as_millis() as u64,
            "kafka producer is in a fatal state; replacing it");
        metrics::counter!("adserve_events_producer_fatal_total", "client" => self.inner.client).increment(1);
        metrics::gauge!("adserve_events_producer_ready", "client" => self.inner.client).set(0.0);
        r.fatal = Some(reason.clone());
        self.inner.fatal.store(true, Ordering::Release);
        drop(r);
        self.report(Some(reason));
    }

    /// The next rebuild delay; marks the backoff as advanced.
    fn next_delay(&self, r: &mut Recovery) -> Duration {
        self.inner.escalated.store(true, Ordering::Release);
        r.backoff.next().unwrap_or(self.inner.config.recovery_backoff_max)
    }

    /// Replaces a fatal producer once its backoff has passed.
    fn maybe_rebuild(&self) {
        let mut r = self.inner.recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.fatal.is_none() || Instant::now() < r.next_rebuild {
            return;
        }
        match build_producer(&self.inner.config) {
            Ok(fresh) => {
                let topics = self.inner.warm_topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                if topics.is_empty() {
                    self.install(&mut r, fresh);
                    return;
                }
                // Warmed off this thread (a health probe on the async runtime)
                // and installed once warm; no second rebuild starts meanwhile.
                r.next_rebuild = Instant::now() + WARM_LIMIT + Duration::from_secs(1);
                let this = self.clone();
                std::thread::spawn(move || {
                    if let Err(e) = warm(&fresh, &topics, WARM_LIMIT) {
                        tracing::warn!(client = this.inner.client, error = %e,
                            "replacement kafka producer could not be warmed; using it anyway");
                    }
                    let mut r = this.inner.recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    this.install(&mut r, fresh);
                });
            }
            Err(e) => {
                let delay = self.next_delay(&mut r);
                r.next_rebuild = Instant::now() + delay;
                tracing::error!(client = self.inner.client, error = %e, "cannot build a kafka producer; retrying");
            }
        }
    }

    /// Makes `fresh` the producer and reports the publisher healthy.
    fn install(&self, r: &mut Recovery, fresh: FutureProducer) {
        let old = std::mem::replace(
            &mut *self.inner.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            Arc::new(fresh),
        );
        r.fatal = None;
        self.inner.fatal.store(false, Ordering::Release);
        self.report(None);
        tracing::warn!(client = self.inner.client, "kafka producer replaced after a fatal error");
        metrics::counter!("adserve_events_producer_rebuilds_total", "client" => self.inner.client).increment(1);
        metrics::gauge!("adserve_events_producer_ready", "client" => self.inner.client).set(1.0);
        // Dropping a producer purges and flushes (blocking up to 500 ms): not on this thread.
        std::thread::spawn(move || drop(old));
    }

    /// Forces the current producer into librdkafka's fatal state, as a
    /// fenced producer would be. For tests of the recovery path.
    #[doc(hidden)]
    pub fn inject_fatal_error_for_tests(&self, reason: &str) {
        let producer = self.current();
        let reason = std::ffi::CString::new(reason).unwrap_or_default();
        // SAFETY: the client pointer is valid while `producer` is held; librdkafka
        // copies the reason string.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                reason.as_ptr(),
            );
        }
    }

    /// Publishes `payload` to `topic` under `key` and waits for the broker's
    /// acknowledgement (at most the publish timeout).
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<Ack, EventError> {
        let started = Instant::now();
        let outcome = self.send_inner(topic, key, payload, headers).await;
        let status = match &outcome {
            Ok(_) => "ok",
            Err(EventError::Recovering(_)) => "recovering",
            Err(_) => "error",
        };
        metrics::counter!("adserve_events_published_total", "topic" => topic.to_string(), "status" => status)
            .increment(1);
        metrics::histogram!("adserve_events_publish_seconds", "topic" => topic.to_string())
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn send_inner(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<Ack, EventError> {
        if let Health::Recovering { reason, retry_in } = self.health() {
            return Err(EventError::Recovering(format!(
                "{reason}; a new producer is built in {} ms",
                retry_in.as_millis()
            )));
        }
        let producer = self.current();
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let timeout = self.inner.timeout;
        let result = tokio::time::timeout(timeout + Duration::from_millis(100), producer.send(record, timeout)).await;
        match result {
            Ok(Ok(d)) => {
                if self.inner.escalated.load(Ordering::Acquire) {
                    let mut r = self.inner.recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if r.fatal.is_none() {
                        // Healthy again: the next failure starts from the shortest delay.
                        r.backoff = self.inner.config.recovery_backoff();
                        self.inner.escalated.store(false, Ordering::Release);
                    }
                }
                Ok(Ack { partition: d.partition, offset: d.offset })
            }
            Ok(Err((e, _))) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    self.mark_fatal(&producer, format!("{code:?}: {reason}"));
                } else if let KafkaError::MessageProduction(code) = &e
                    && fences_the_producer(*code)
                {
                    self.mark_fatal(&producer, e.to_string());
                }
                Err(EventError::Kafka(e.to_string()))
            }
            Err(_) => Err(EventError::Timeout(timeout.as_millis() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_broker() -> KafkaConfig {
        // Nothing listens on port 1: the producer is created (lazily) but
        // never connects; fatal state is local to librdkafka.
        KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            publish_timeout: Duration::from_millis(300),
            recovery_backoff_min: Duration::from_millis(200),
            ..KafkaConfig::default()
        }
    }

    #[tokio::test]
    async fn a_fatal_producer_is_reported_and_replaced() {
        let p = EventPublisher::new(&unreachable_broker(), "test").expect("producer");
        assert_eq!(p.health(), Health::Ready);
        let before = p.current();
        p.inject_fatal_error_for_tests("fenced by a test");
        match p.health() {
            Health::Recovering { reason, retry_in } => {
                assert!(reason.contains("fenced by a test"), "{reason}");
                assert!(retry_in <= Duration::from_millis(400), "first retry is short: {retry_in:?}");
            }
            Health::Ready => panic!("a fatal producer must not report ready"),
        }
        // Sends fail fast while recovering, naming why.
        let err = p.send("t", "k", b"v", None).await.unwrap_err();
        assert!(matches!(err, EventError::Recovering(ref m) if m.contains("fenced by a test")), "{err}");
        // After the backoff a fresh producer replaces the fatal one.
        let mut healthy = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if p.health() == Health::Ready {
                healthy = true;
                break;
            }
        }
        assert!(healthy, "the producer was not replaced");
        assert!(!Arc::ptr_eq(&before, &p.current()), "a new producer instance serves");
        assert!(p.current().client().fatal_error().is_none());
    }

    #[tokio::test]
    async fn readiness_follows_the_producer_as_it_changes() {
        let config = KafkaConfig { recovery_backoff_min: Duration::from_secs(60), ..unreachable_broker() };
        let p = EventPublisher::new(&config, "test").expect("producer");
        let readiness = adserve_core::Readiness::new();
        p.report_to(readiness.clone(), "kafka");
        assert!(readiness.is_ready());
        p.inject_fatal_error_for_tests("fenced");
        let _ = p.health();
        let state = readiness.state();
        assert!(!state.is_ready());
        assert!(state.reasons()[0].starts_with("kafka: ") && state.reasons()[0].contains("fenced"), "{state:?}");
    }

    #[test]
    fn fencing_errors_end_a_producer_and_transient_ones_do_not() {
        assert!(fences_the_producer(RDKafkaErrorCode::ProducerFenced));
        assert!(fences_the_producer(RDKafkaErrorCode::OutOfOrderSequenceNumber));
        assert!(!fences_the_producer(RDKafkaErrorCode::MessageTimedOut));
        assert!(!fences_the_producer(RDKafkaErrorCode::BrokerTransportFailure));
    }

    #[tokio::test]
    async fn clones_share_one_recovery() {
        let a = EventPublisher::new(&unreachable_broker(), "test").expect("producer");
        let b = a.clone();
        a.inject_fatal_error_for_tests("x");
        assert!(matches!(b.health(), Health::Recovering { .. }));
    }
}
