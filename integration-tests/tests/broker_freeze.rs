//! A hung broker is not a dead one. With ad traffic flowing, the Kafka
//! broker is frozen for 10 seconds (SIGSTOP) and thawed (SIGCONT). While it
//! is frozen the gateway answers 503 rather than serve an unlogged ad; once it
//! is back the gateway must serve 200 again within seconds (before the fix
//! its idempotent producer ended in librdkafka's fatal state and every
//! request answered 503 for as long as the process lived), report ready, and
//! every impression it answered with must be on the topic exactly once.
//!
//! Its own test binary: cargo runs test binaries one at a time, so no other
//! test sees the frozen broker.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use adserve_events::IMPRESSIONS_TOPIC;
use adserve_integration_tests::{Stack, listener_pid};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
};
use serde_json::{Value, json};

/// Thaws the broker when dropped, so a failing test never leaves it frozen.
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> anyhow::Result<Self> {
        // SAFETY: plain signal syscalls.
        anyhow::ensure!(
            unsafe { libc::kill(pid, libc::SIGSTOP) } == 0,
            "SIGSTOP {pid}: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

#[derive(Debug, Clone)]
struct Answer {
    at: Instant,
    status: u16,
    impressions: Vec<String>,
}

fn watermarks(consumer: &StreamConsumer) -> anyhow::Result<HashMap<i32, i64>> {
    let md = consumer.fetch_metadata(Some(IMPRESSIONS_TOPIC), Duration::from_secs(10))?;
    let mut out = HashMap::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(IMPRESSIONS_TOPIC, p.id(), Duration::from_secs(10))?;
            out.insert(p.id(), high);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_again_after_the_broker_is_frozen_and_thawed() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let kafka_port: u16 = s.kafka.rsplit(':').next().unwrap_or("9092").parse()?;
    let broker = listener_pid(kafka_port)?;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.kafka)
        .set("group.id", format!("adserve-freeze-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let start_offsets = watermarks(&consumer)?;

    // Traffic: two clients back to back, every answer recorded.
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = adserve_integration_tests::http_builder().timeout(Duration::from_secs(5)).build()?;
    let mut clients = Vec::new();
    for c in 0..2 {
        let (http, answers, stop, url) = (http.clone(), answers.clone(), stop.clone(), format!("{}/v1/ads", s.http));
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body = json!({
                    "user_id": format!("demo-user-{}", (c * 1000 + i) % 50),
                    "context": {"placement": "feed_top", "device": "mobile"},
                    "slots": 1,
                });
                let (status, v) = match http.post(&url).json(&body).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (status, r.json::<Value>().await.unwrap_or(Value::Null))
                    }
                    Err(_) => (0, Value::Null),
                };
                let impressions = v["winners"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|w| w["impression_id"].as_str().map(String::from))
                    .collect();
                answers.lock().unwrap().push(Answer { at: Instant::now(), status, impressions });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let frozen = Frozen::freeze(broker)?;
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(frozen);
    let thawed_at = Instant::now();

    // Wait (bounded) for the gateway to answer 200 again, then keep the
    // traffic a little longer so recovery is seen to last.
    let deadline = thawed_at + Duration::from_secs(20);
    let recovered_at = loop {
        let first_ok = answers.lock().unwrap().iter().find(|a| a.at > thawed_at && a.status == 200).map(|a| a.at);
        if let Some(at) = first_ok {
            break at;
        }
        if Instant::now() > deadline {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let tail: Vec<u16> = answers.lock().unwrap().iter().rev().take(10).map(|a| a.status).collect();
            anyhow::bail!("no 200 within 20 s of thawing the broker (last statuses {tail:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    let answers = answers.lock().unwrap().clone();

    // While frozen: nothing served unlogged (no 200 can have been acked by a stopped broker).
    let during: Vec<&Answer> =
        answers.iter().filter(|a| a.at > frozen_at + Duration::from_secs(3) && a.at < thawed_at).collect();
    assert!(!during.is_empty(), "the clients kept sending while the broker was frozen");
    assert!(
        during.iter().all(|a| a.status == 503),
        "frozen broker: every answer is 503, got {:?}",
        during.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    // After: 200s again, and the last answers all succeed.
    let after: Vec<&Answer> = answers.iter().filter(|a| a.at >= recovered_at).collect();
    let ok_after = after.iter().filter(|a| a.status == 200).count();
    assert!(ok_after * 10 >= after.len() * 9, "after recovery {ok_after} of {} answers were 200", after.len());
    eprintln!("recovered {:.1} s after the thaw", recovered_at.duration_since(thawed_at).as_secs_f64());
    let health = adserve_integration_tests::http_client().get(format!("{}/healthz", s.http)).send().await?;
    assert_eq!(health.status(), 200, "gateway ready again: {}", health.text().await?);

    // Every impression answered with 200 is on the topic exactly once; none twice.
    let served: Vec<&String> = answers.iter().filter(|a| a.status == 200).flat_map(|a| &a.impressions).collect();
    assert!(!served.is_empty());
    let end_offsets = watermarks(&consumer)?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &start_offsets {
        tpl.add_partition_offset(IMPRESSIONS_TOPIC, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut next: HashMap<i32, i64> = start_offsets.clone();
    // Read to the high watermarks taken after the traffic stopped, then keep
    // reading (bounded) until every served impression is found: a broker may
    // report a watermark a moment before the last acknowledged write is
    // readable, and that is not a loss. What is still missing after 15 s is.
    let read_deadline = Instant::now() + Duration::from_secs(60);
    let settle_deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reached = end_offsets.iter().all(|(p, high)| next.get(p).copied().unwrap_or(0) >= *high);
        let all_found = served.iter().all(|id| seen.contains_key(id.as_str()));
        if reached && (all_found || Instant::now() > settle_deadline) {
            break;
        }
        anyhow::ensure!(Instant::now() < read_deadline, "could not read the impressions back within 60 s");
        match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Ok(m) => {
                let m = m?;
                next.insert(m.partition(), m.offset() + 1);
                if let Some(key) = m.key() {
                    *seen.entry(String::from_utf8_lossy(key).into_owned()).or_default() += 1;
                }
            }
            Err(_) => continue, // nothing new yet
        }
    }
    let missing: Vec<String> = answers
        .iter()
        .filter(|a| a.status == 200)
        .flat_map(|a| a.impressions.iter().map(move |id| (a, id)))
        .filter(|(_, id)| !seen.contains_key(id.as_str()))
        .map(|(a, id)| {
            let t = |x: Instant| {
                if a.at >= x { a.at.duration_since(x).as_secs_f64() } else { -x.duration_since(a.at).as_secs_f64() }
            };
            format!("{id} (answered {:+.1} s from the freeze, {:+.1} s from the thaw)", t(frozen_at), t(thawed_at))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} impressions answered with 200 are not in the log ({} read, offsets {start_offsets:?} -> {end_offsets:?}): {:?}",
        missing.len(),
        served.len(),
        seen.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    for id in &served {
        assert_eq!(seen.get(id.as_str()), Some(&1), "impression {id} answered with 200 must be logged exactly once");
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "impressions logged more than once: {twice:?}");
    Ok(())
}
