//! Label-joiner: events per second from a pre-filled topic into durable
//! Parquet with committed offsets, next to a reader that consumes the same
//! topics with the same consumer settings and does nothing else.
//!
//! Both start from the earliest offset with a fresh consumer group, so both
//! read the whole log (whatever earlier runs left there plus the pre-fill):
//! the same events, the same broker, one after the other. The joiner is the
//! real binary (the bench's profile), with its own group, ports and output
//! directory; it is done when its committed offsets reach the high
//! watermarks, which it only commits once the rows are in a closed file.

use std::{collections::HashMap, time::Duration, time::Instant};

use adserve_events::{CLICKS_TOPIC, IMPRESSIONS_TOPIC, KafkaConfig};
use adserve_proto::v1::{
    ClickEvent, FeatureRow, GetStatusRequest, GetStatusResponse, ImpressionEvent,
    label_joiner_service_client::LabelJoinerServiceClient,
};
use anyhow::Context;
use prost::Message as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};

use super::{
    Settings,
    load::Summary,
    peers::Child,
    report::{Comparison, Metric, Role},
};

/// Label window of the bench's joiner: short, so the figure is throughput,
/// not the window.
const WINDOW_MS: u64 = 1000;

/// Allowed lateness of the bench's joiner (its default).
const LATENESS_MS: u64 = 3000;

/// How far behind the wall clock the pre-fill is stamped. The log stays in
/// event-time order, as a gateway writes it: the pre-fill comes after
/// whatever earlier runs left in the topics (the e2e part's impressions a
/// moment ago), and is back-dated by less than the allowed lateness, so
/// nothing in it is behind the watermark those events set. Being back-dated
/// by most of it, the last windows are closable about `WINDOW_MS +
/// LATENESS_MS - BACKDATE_MS` after the pre-fill ends, which the reader's
/// turn has already taken. (An earlier version stamped the pre-fill an hour
/// ago, behind the newer events already in the log: the joiner then rightly
/// treated a third of its clicks as behind the watermark.)
const BACKDATE_MS: u64 = 2500;

/// Impressions pre-filled (a click for every 20th).
pub(super) fn prefill_size(quick: bool) -> usize {
    if quick { 50_000 } else { 200_000 }
}

/// Runs the label-joiner part.
pub async fn run(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    super::load::ensure_loopback(&s.stack.kafka)?;
    let kafka = KafkaConfig { brokers: s.stack.kafka.clone(), ..KafkaConfig::default() };
    adserve_events::ensure_topics(&kafka).await?;
    let n = prefill_size(s.quick);
    let started = Instant::now();
    prefill(&s.stack.kafka, n).await?;
    tracing::info!(impressions = n, secs = started.elapsed().as_secs_f64(), "topics pre-filled");
    let high = watermarks(&kafka)?;
    let total: i64 = high.values().sum();

    let reader = read_only(&kafka, &high).await?;
    let (joiner, status) = run_joiner(s, &kafka, &high).await?;
    // A fast joiner that lost clicks is no result: every pre-filled click
    // must have joined (earlier runs' clicks in the log may add to it).
    let clicks = (n / 20) as u64;
    anyhow::ensure!(
        status.clicks_joined >= clicks && status.clicks_after_close == 0,
        "the label-joiner joined {} clicks of the {clicks} pre-filled ({} unmatched, {} read after their window \
         closed, {} late; {} impressions and {} clicks out of event-time order): the figure would not be a \
         correct join",
        status.clicks_joined,
        status.unmatched_clicks,
        status.clicks_after_close,
        status.late_clicks,
        status.out_of_order_impressions,
        status.out_of_order_clicks
    );
    let summary = |events: i64, elapsed: Duration| Summary {
        rate_per_s: events as f64 / elapsed.as_secs_f64(),
        items_per_s: events as f64 / elapsed.as_secs_f64(),
        ok: events as u64,
        seconds: elapsed.as_secs_f64(),
        ..Summary::default()
    };
    let mut c = Comparison {
        path: "label-joiner".into(),
        case: format!("{total} events in the log ({n} impressions + {} clicks pre-filled)", n / 20),
        metric: Metric::Rate,
        subjects: vec![],
        note: format!(
            "joiner: from process start until its committed offsets reach the high watermarks (rows durable); \
             reader: consume-only, same consumer settings, fresh group; label window {WINDOW_MS} ms, \
             allowed lateness {LATENESS_MS} ms; joiner status at the end: {} rows written, {} clicks joined, \
             {} unmatched, {} late",
            status.rows_written, status.clicks_joined, status.unmatched_clicks, status.late_clicks
        ),
    };
    c.subjects.push(super::report::Subject {
        who: "adserve-label-joiner (join + Parquet + commit)".into(),
        role: Role::Ours,
        summary: summary(total, joiner),
    });
    Ok(vec![c.with_summary("consume-only reader", Role::Floor, summary(reader.0, reader.1))])
}

/// Produces `n` impressions, stamped as they are produced (less
/// `BACKDATE_MS`), and a click 200 ms after every 20th.
pub(super) async fn prefill(brokers: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let registry = adserve_features::registry();
    let names: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
    let run = uuid::Uuid::new_v4().simple().to_string();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let served = std::time::SystemTime::now() - Duration::from_millis(BACKDATE_MS);
        let mut payloads = Vec::with_capacity(chunk.len() * 2);
        for &i in chunk {
            let id = format!("bench-{run}-{i}");
            let event = ImpressionEvent {
                impression_id: id.clone(),
                request_id: id.clone(),
                user_id: format!("bench-user-{}", i % 1000),
                ad_id: (i % 1000) as i64,
                campaign_id: (i % 100) as i64,
                served_at: Some(prost_types::Timestamp::from(served)),
                model_version: "adserve-bench".into(),
                pctr: 0.02,
                features: Some(FeatureRow {
                    names: names.clone(),
                    values: registry.defaults().iter().map(|d| d + (i % 7) as f32 * 0.01).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            payloads.push((IMPRESSIONS_TOPIC, id.clone(), event.encode_to_vec()));
            if i % 20 == 0 {
                let click = ClickEvent {
                    click_id: format!("click-{id}"),
                    impression_id: id.clone(),
                    clicked_at: Some(prost_types::Timestamp::from(served + Duration::from_millis(200))),
                    ..Default::default()
                };
                payloads.push((CLICKS_TOPIC, id, click.encode_to_vec()));
            }
        }
        let mut sends = Vec::with_capacity(payloads.len());
        for (topic, key, payload) in &payloads {
            sends.push(producer.send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(30)));
        }
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| anyhow::anyhow!("pre-fill: {e}"))?;
        }
    }
    Ok(())
}

/// High watermark of every partition of both topics.
pub(super) fn watermarks(kafka: &KafkaConfig) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let consumer = kafka.consumer(&format!("adserve-bench-meta-{}", uuid::Uuid::new_v4()))?;
    let mut out = HashMap::new();
    for topic in [IMPRESSIONS_TOPIC, CLICKS_TOPIC] {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
                out.insert((topic.to_string(), p.id()), high);
            }
        }
    }
    Ok(out)
}

/// Consumes both topics to `high` and counts; returns (events, elapsed).
pub(super) async fn read_only(
    kafka: &KafkaConfig,
    high: &HashMap<(String, i32), i64>,
) -> anyhow::Result<(i64, Duration)> {
    let consumer: StreamConsumer = kafka.consumer(&format!("adserve-bench-reader-{}", uuid::Uuid::new_v4()))?;
    consumer.subscribe(&[IMPRESSIONS_TOPIC, CLICKS_TOPIC])?;
    let started = Instant::now();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut events = 0i64;
    let done =
        |next: &HashMap<(String, i32), i64>| high.iter().all(|(k, h)| *h == 0 || next.get(k).is_some_and(|n| n >= h));
    let deadline = Duration::from_secs(300);
    while !done(&next) {
        let m = tokio::time::timeout(deadline.saturating_sub(started.elapsed()), consumer.recv())
            .await
            .context("consume-only reader did not reach the high watermarks within 300 s")??;
        std::hint::black_box(m.payload());
        next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
        events += 1;
    }
    let elapsed = started.elapsed();
    consumer.unsubscribe();
    Ok((events, elapsed))
}

/// Starts the label-joiner binary on a fresh group and waits until its
/// committed offsets reach `high`; returns the elapsed time from spawn and
/// the joiner's own status then.
async fn run_joiner(
    s: &Settings,
    kafka: &KafkaConfig,
    high: &HashMap<(String, i32), i64>,
) -> anyhow::Result<(Duration, GetStatusResponse)> {
    let group = format!("adserve-bench-joiner-{}", uuid::Uuid::new_v4());
    let grpc_addr = format!("127.0.0.1:{}", crate::free_port());
    let out_dir = s.work_dir.join("joiner-parquet").join(&group);
    std::fs::create_dir_all(&out_dir)?;
    let bin = s.bin_dir.join("adserve-label-joiner");
    let started = Instant::now();
    let mut child = Child::spawn(
        "adserve-label-joiner (bench instance)",
        &[bin.to_str().context("binary path")?],
        &[
            ("ADSERVE_SERVER__GRPC_ADDR", grpc_addr.clone()),
            ("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", crate::free_port())),
            ("ADSERVE_KAFKA__BROKERS", kafka.brokers.clone()),
            ("ADSERVE_GROUP_ID", group.clone()),
            ("ADSERVE_OUTPUT_DIR", out_dir.display().to_string()),
            ("ADSERVE_LABEL_WINDOW", format!("{WINDOW_MS}ms")),
            ("ADSERVE_ALLOWED_LATENESS", format!("{LATENESS_MS}ms")),
            ("ADSERVE_FLUSH_INTERVAL", "1s".into()),
            ("ADSERVE_TELEMETRY__LOG_FILTER", "warn".into()),
        ],
        &crate::repo_root(),
        s.work_dir.join("logs/label-joiner-bench.log"),
    )?;
    if let Err(e) = wait_committed(kafka, &group, high, started, Duration::from_secs(600)).await {
        anyhow::bail!("the label-joiner {e}; see {}", child.log.display());
    }
    let elapsed = started.elapsed();
    let status = LabelJoinerServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .context("connecting to the bench's label-joiner")?
        .get_status(GetStatusRequest {})
        .await
        .context("label-joiner GetStatus")?
        .into_inner();
    child.stop();
    std::fs::remove_dir_all(&out_dir).ok();
    Ok((elapsed, status))
}

/// Waits until consumer group `group` has committed offsets up to `high` on
/// every partition, polling without joining the group; fails once `limit`
/// has passed since `started`.
pub(super) async fn wait_committed(
    kafka: &KafkaConfig,
    group: &str,
    high: &HashMap<(String, i32), i64>,
    started: Instant,
    limit: Duration,
) -> anyhow::Result<()> {
    let watcher = std::sync::Arc::new(kafka.consumer(group)?);
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in high.keys() {
        tpl.add_partition(topic, *partition);
    }
    loop {
        if started.elapsed() > limit {
            anyhow::bail!("did not commit up to the high watermarks within {} s", limit.as_secs());
        }
        let (tpl, watcher) = (tpl.clone(), watcher.clone());
        let committed =
            tokio::task::spawn_blocking(move || watcher.committed_offsets(tpl, Duration::from_secs(5))).await?;
        if let Ok(c) = committed {
            let all = high.iter().all(|((topic, partition), h)| {
                *h == 0
                    || c.find_partition(topic, *partition)
                        .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= *h))
            });
            if all {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
