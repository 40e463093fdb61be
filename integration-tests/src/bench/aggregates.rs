//! Streaming aggregates (the feature-service's real-time tier writer), two
//! figures:
//!
//! - **Throughput**: events per second from a pre-filled log into Redis with
//!   committed offsets, by a feature-service in `mode = aggregate` (the
//!   bench's profile) on a fresh group and a flushed Redis database of its
//!   own, next to a reader that consumes the same topics with the same
//!   consumer settings and does nothing else (as the label-joiner part).
//! - **Freshness**: then, with that aggregator caught up, a steady offered
//!   rate on the topics: event time to visible in Redis as the aggregator
//!   reports it (its `adserve_feature_aggregates_freshness_seconds`
//!   histogram, scraped before and after), next to the broker's own delivery
//!   latency for the same events (event time to received by a bare
//!   consumer).
//!
//! The stack's own feature-service runs with `mode = serve` during benches
//! (scripts/bench.sh), so no other aggregator competes for the cores.

use std::{time::Duration, time::Instant};

use adserve_events::{EventPublisher, IMPRESSIONS_TOPIC, KafkaConfig};
use adserve_proto::v1::{FeatureRow, ImpressionEvent};
use anyhow::Context;
use fred::prelude::*;
use prost::Message as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
};

use super::{
    Settings, joiner,
    load::Summary,
    peers::Child,
    prom,
    report::{Comparison, Metric, Role, Subject},
};

/// Redis database the bench's aggregator writes (flushed before the run).
const BENCH_DB: u32 = 10;

/// Offered rates of the freshness cases, impressions per second: a busy
/// topic, and a quiet one (where a consumer's fetches find nothing new and
/// wait on the broker: the lag a frequency cap sees at low traffic).
const STEADY_RATES: [u64; 2] = [1000, 20];

/// The consumers' `kafka.fetch_wait_max` for this run (the aggregator and
/// its peers alike): `BENCH_FETCH_WAIT_MS`, or the default. Lets a run
/// compare settings with one build.
fn fetch_wait() -> anyhow::Result<Option<Duration>> {
    match std::env::var("BENCH_FETCH_WAIT_MS") {
        Ok(ms) => Ok(Some(Duration::from_millis(ms.parse().context("BENCH_FETCH_WAIT_MS: milliseconds")?))),
        Err(_) => Ok(None),
    }
}

/// Runs the aggregates part.
pub async fn run(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    super::load::ensure_loopback(&s.stack.kafka)?;
    super::load::ensure_loopback(&s.stack.redis)?;
    let mut kafka = KafkaConfig { brokers: s.stack.kafka.clone(), ..KafkaConfig::default() };
    if let Some(wait) = fetch_wait()? {
        kafka.fetch_wait_max = wait;
    }
    adserve_events::ensure_topics(&kafka).await?;
    throughput_then_freshness(s, &kafka).await
}

fn rate(events: i64, elapsed: Duration) -> Summary {
    Summary {
        rate_per_s: events as f64 / elapsed.as_secs_f64(),
        items_per_s: events as f64 / elapsed.as_secs_f64(),
        ok: events as u64,
        seconds: elapsed.as_secs_f64(),
        ..Summary::default()
    }
}

async fn throughput_then_freshness(s: &Settings, kafka: &KafkaConfig) -> anyhow::Result<Vec<Comparison>> {
    let n = joiner::prefill_size(s.quick);
    joiner::prefill(&s.stack.kafka, n).await?;
    let high = joiner::watermarks(kafka)?;
    let total: i64 = high.values().sum();
    let reader = joiner::read_only(kafka, &high).await?;

    let redis_url = s.stack.redis_db(BENCH_DB);
    let redis = Client::new(Config::from_url(&redis_url)?, None, None, None);
    redis.init().await?;
    let () = redis.custom(fred::cmd!("FLUSHDB"), Vec::<String>::new()).await?;

    let group = format!("adserve-bench-aggregates-{}", uuid::Uuid::new_v4());
    let metrics_addr = format!("127.0.0.1:{}", crate::free_port());
    let bin = s.bin_dir.join("adserve-feature-service");
    let started = Instant::now();
    let mut child = Child::spawn(
        "adserve-feature-service (mode = aggregate, bench instance)",
        &[bin.to_str().context("binary path")?],
        &[
            ("ADSERVE_MODE", "aggregate".into()),
            ("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{}", crate::free_port())),
            ("ADSERVE_SERVER__METRICS_ADDR", metrics_addr.clone()),
            ("ADSERVE_REDIS__URL", redis_url),
            ("ADSERVE_AGGREGATES__KAFKA__BROKERS", kafka.brokers.clone()),
            ("ADSERVE_AGGREGATES__GROUP_ID", group.clone()),
            ("ADSERVE_AGGREGATES__KAFKA__FETCH_WAIT_MAX", format!("{}ms", kafka.fetch_wait_max.as_millis())),
            ("ADSERVE_TELEMETRY__LOG_FILTER", "warn".into()),
        ],
        &crate::repo_root(),
        s.work_dir.join("logs/feature-aggregates-bench.log"),
    )?;
    if let Err(e) = joiner::wait_committed(kafka, &group, &high, started, Duration::from_secs(900)).await {
        anyhow::bail!("the bench's aggregator {e}; see {}", child.log.display());
    }
    let elapsed = started.elapsed();
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let text = prom::scrape(&metrics_url).await?;
    let outcomes = ["counted", "duplicate", "expired", "unattributed", "dead_lettered"]
        .map(|o| format!("{o} {}", outcome(&text, o)));
    let counted = outcome(&text, "counted");
    // Every pre-filled impression and click must have been counted.
    let clicks = (n / 20) as f64;
    anyhow::ensure!(
        counted >= n as f64 + clicks,
        "the bench's aggregator counted {counted} events of the {} pre-filled ({})",
        n as f64 + clicks,
        outcomes.join(", ")
    );
    let c = Comparison {
        path: "feature aggregates".into(),
        case: format!("{total} events in the log ({n} impressions + {} clicks pre-filled)", n / 20),
        metric: Metric::Rate,
        subjects: vec![Subject {
            who: "adserve-feature-service mode=aggregate (script per event + commit)".into(),
            role: Role::Ours,
            summary: rate(total, elapsed),
        }],
        note: format!(
            "aggregator: from process start until its committed offsets reach the high watermarks (every event in \
             Redis); reader: consume-only, same consumer settings, fresh group; events: {}",
            outcomes.join(", ")
        ),
    };
    let mut out = vec![c.with_summary("consume-only reader", Role::Floor, rate(reader.0, reader.1))];
    for rate in STEADY_RATES {
        let fresh = freshness(s, kafka, &metrics_url, rate).await;
        if fresh.is_err() {
            child.stop();
        }
        out.extend(fresh?);
    }
    child.stop();
    Ok(out)
}

/// Events of one outcome the aggregator counted.
fn outcome(text: &str, outcome: &str) -> f64 {
    prom::counter(text, "adserve_feature_aggregates_events_total", &[&format!("outcome=\"{outcome}\"")])
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn freshness(s: &Settings, kafka: &KafkaConfig, metrics: &str, rate: u64) -> anyhow::Result<Vec<Comparison>> {
    let histogram = "adserve_feature_aggregates_freshness_seconds";
    let before = prom::histogram(&prom::scrape(metrics).await?, histogram, "topic");

    // A bare consumer positioned at the end of the impressions topic: the
    // broker's own event-time-to-delivery latency for the same events.
    let high = joiner::watermarks(kafka)?;
    let consumer: StreamConsumer = kafka.consumer(&format!("adserve-bench-fresh-{}", uuid::Uuid::new_v4()))?;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), h) in &high {
        if topic == IMPRESSIONS_TOPIC {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*h))?;
        }
    }
    consumer.assign(&tpl)?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let window = s.step();
    let expected = rate * window.as_secs();
    let reader = {
        let run = run.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(expected as usize);
            let deadline = Instant::now() + window + Duration::from_secs(30);
            while (latencies.len() as u64) < expected && Instant::now() < deadline {
                let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await else { continue };
                let Some(payload) = m.payload() else { continue };
                let Ok(e) = ImpressionEvent::decode(payload) else { continue };
                if !e.impression_id.starts_with(&run) {
                    continue;
                }
                let t = e.served_at.unwrap_or_default();
                let sent = t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
                latencies.push((now - sent) as f64);
            }
            anyhow::Ok(latencies)
        })
    };

    // Open loop at `rate` through the gateway's own publisher.
    let publisher = EventPublisher::new(kafka, "bench")?;
    let names: Vec<String> = adserve_features::registry().names().iter().map(|n| n.to_string()).collect();
    let defaults = adserve_features::registry().defaults();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..expected {
        tick.tick().await;
        let event = ImpressionEvent {
            impression_id: format!("{run}-{i}"),
            request_id: format!("{run}-{i}"),
            user_id: format!("bench-fresh-user-{}", i % 500),
            ad_id: (i % 1000) as i64,
            campaign_id: 1,
            served_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            features: Some(FeatureRow { names: names.clone(), values: defaults.clone(), ..Default::default() }),
            ..Default::default()
        };
        let p = publisher.clone();
        sends.spawn(async move { p.impression(&event).await });
    }
    while let Some(r) = sends.join_next().await {
        r?.map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    }
    let mut latencies = reader.await??;
    // The aggregator's tail: let the last events land before the scrape.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = prom::histogram(&prom::scrape(metrics).await?, histogram, "topic");
    let d = prom::delta(&before, &after);
    let ours = d.get(IMPRESSIONS_TOPIC).context("no freshness observations for impressions")?;
    let observed = prom::count(ours);
    anyhow::ensure!(observed >= expected as f64 * 0.99, "the aggregator observed {observed} of {expected} impressions");
    latencies.sort_by(f64::total_cmp);
    let q = |b, x| prom::quantile(b, x).map_or(f64::NAN, |v| v * 1000.0);
    let ours_summary = Summary {
        p50_ms: q(ours, 0.5),
        p99_ms: q(ours, 0.99),
        ok: observed as u64,
        offered_rate_per_s: Some(rate as f64),
        seconds: window.as_secs_f64(),
        ..Summary::default()
    };
    let broker = Summary {
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        ok: latencies.len() as u64,
        offered_rate_per_s: Some(rate as f64),
        seconds: window.as_secs_f64(),
        ..Summary::default()
    };
    let case = format!(
        "{rate} impressions/s for {} s, after the backlog above (consumers' fetch_wait_max {} ms)",
        window.as_secs(),
        kafka.fetch_wait_max.as_millis()
    );
    let note = "ours: event time to the script's return, from the bench aggregator's freshness histogram \
                (interpolated inside its buckets); broker: event time to delivery to a bare consumer of the same \
                events (milliseconds, exact)";
    let make = |metric| {
        Comparison {
            path: "feature aggregates".into(),
            case: case.clone(),
            metric,
            subjects: vec![Subject {
                who: "aggregator freshness (event → Redis)".into(),
                role: Role::Ours,
                summary: ours_summary.clone(),
            }],
            note: note.into(),
        }
        .with_summary("broker delivery (event → consumer)", Role::Floor, broker.clone())
    };
    Ok(vec![make(Metric::P50), make(Metric::P99)])
}
