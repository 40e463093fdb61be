//! The label-joiner as a process against a real broker: rows appear while
//! steady traffic continues; SIGKILL at random points (including between a
//! file becoming durable and its offsets being committed) loses and
//! duplicates nothing; two instances in one group split the partitions and
//! survive rebalances with every impression written exactly once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use adserve_events::{EventPublisher, IMPRESSIONS_TOPIC, KafkaConfig};
use adserve_integration_tests::{ParquetRow, Stack, binary, free_port, parquet_files, read_rows};
use adserve_proto::v1::{
    ClickEvent, FeatureRow, FlushRequest, GetStatusRequest, ImpressionEvent,
    label_joiner_service_client::LabelJoinerServiceClient,
};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use tokio::task::JoinHandle;

const WINDOW: &str = "1s";

struct JoinerProcess {
    child: tokio::process::Child,
    url: String,
}

impl JoinerProcess {
    async fn start(brokers: &str, group: &str, dir: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = free_port();
        let mut command = tokio::process::Command::new(binary("adserve-label-joiner"));
        command
            .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{port}"))
            .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("ADSERVE_KAFKA__BROKERS", brokers)
            .env("ADSERVE_GROUP_ID", group)
            .env("ADSERVE_OUTPUT_DIR", dir)
            .env("ADSERVE_LABEL_WINDOW", WINDOW)
            .env("ADSERVE_ALLOWED_LATENESS", "200ms")
            .env("ADSERVE_FLUSH_INTERVAL", "300ms")
            .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if LabelJoinerServiceClient::connect(url.clone()).await.is_ok() {
                return Ok(Self { child, url });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("label-joiner did not start on port {port}")
    }

    async fn client(&self) -> anyhow::Result<LabelJoinerServiceClient<tonic::transport::Channel>> {
        Ok(LabelJoinerServiceClient::connect(self.url.clone()).await?)
    }

    async fn sigkill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    async fn sigterm(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}

fn impression(id: &str, test: &str) -> ImpressionEvent {
    ImpressionEvent {
        impression_id: id.into(),
        request_id: id.into(),
        user_id: test.into(),
        ad_id: 1,
        campaign_id: 1,
        served_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        model_version: test.into(),
        pctr: 0.5,
        features: Some(FeatureRow {
            names: vec!["a".into(), "b".into()],
            values: vec![id.len() as f32, 1.0],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a traffic generator published: impression ids, and which were clicked.
#[derive(Default)]
struct Published {
    ids: Vec<String>,
    clicked: HashMap<String, bool>,
}

/// Publishes impressions at about `per_second`, clicking every third one 50
/// ms (event time) after it was served, until `stop` is set or `limit`
/// impressions were sent.
fn traffic(
    publisher: EventPublisher,
    test: &'static str,
    per_second: u64,
    limit: usize,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<Published>> {
    tokio::spawn(async move {
        let mut out = Published::default();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
        while !stop.load(Ordering::Relaxed) && out.ids.len() < limit {
            tick.tick().await;
            let id = uuid::Uuid::new_v4().to_string();
            let event = impression(&id, test);
            publisher.impression(&event).await?;
            let clicked = out.ids.len() % 3 == 0;
            if clicked {
                let served = event.served_at.map(std::time::SystemTime::try_from).transpose()?;
                let at = served.unwrap_or_else(std::time::SystemTime::now) + Duration::from_millis(50);
                let click = ClickEvent {
                    click_id: format!("c-{id}"),
                    impression_id: id.clone(),
                    clicked_at: Some(prost_types::Timestamp::from(at)),
                    ..Default::default()
                };
                publisher.click(&click).await?;
            }
            out.clicked.insert(id.clone(), clicked);
            out.ids.push(id);
        }
        Ok(out)
    })
}

/// Rows of these ids, by id.
fn rows_by_id<'a>(rows: &'a [ParquetRow], ids: &[String]) -> HashMap<&'a str, Vec<&'a ParquetRow>> {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut by: HashMap<&str, Vec<&ParquetRow>> = HashMap::new();
    for r in rows.iter().filter(|r| wanted.contains(r.impression_id.as_str())) {
        by.entry(r.impression_id.as_str()).or_default().push(r);
    }
    by
}

/// Waits (flushing without closing open windows: only the watermark closes
/// them) until every id has a row.
async fn wait_for_all(dir: &Path, joiner: &JoinerProcess, ids: &[String]) -> anyhow::Result<()> {
    let mut client = joiner.client().await?;
    for _ in 0..240 {
        client.flush(FlushRequest { close_open_windows: false }).await?;
        let rows = read_rows(dir)?;
        let by = rows_by_id(&rows, ids);
        if by.len() == ids.len() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = read_rows(dir)?;
    anyhow::bail!("{} of {} impressions have rows in {}", rows_by_id(&rows, ids).len(), ids.len(), dir.display())
}

/// Every id has exactly one row, labelled as it was clicked.
fn assert_exactly_once(dir: &Path, published: &Published) -> anyhow::Result<()> {
    let rows = read_rows(dir)?;
    let by = rows_by_id(&rows, &published.ids);
    for id in &published.ids {
        let rows = by.get(id.as_str()).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(rows.len(), 1, "{id} must be written exactly once, found {}", rows.len());
        assert_eq!(rows[0].label == 1, published.clicked[id], "{id} label");
        assert_eq!(rows[0].kind, "final");
    }
    Ok(())
}

fn newest_file(dir: &Path) -> Option<PathBuf> {
    parquet_files(dir).into_iter().max_by_key(|p| p.file_name().map(|n| n.to_os_string()))
}

async fn committed_impressions(brokers: &str, group: &str, partition: i32) -> anyhow::Result<i64> {
    let consumer: StreamConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(IMPRESSIONS_TOPIC, partition);
    let committed =
        tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, Duration::from_secs(5))).await??;
    Ok(match committed.find_partition(IMPRESSIONS_TOPIC, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => 0,
    })
}

/// Largest impressions offset in a file (its footer range).
fn max_offset_in(file: &Path) -> anyhow::Result<i64> {
    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(file)?)?;
    let kv = parquet::file::reader::FileReader::metadata(&reader).file_metadata().key_value_metadata().cloned();
    let offsets = kv
        .unwrap_or_default()
        .into_iter()
        .find(|k| k.key == "adserve.offsets")
        .and_then(|k| k.value)
        .ok_or_else(|| anyhow::anyhow!("{} has no offsets footer", file.display()))?;
    let ranges: HashMap<String, [i64; 2]> = serde_json::from_str(&offsets)?;
    Ok(ranges.values().map(|r| r[1]).max().unwrap_or(-1))
}

#[tokio::test]
async fn rows_reach_parquet_while_steady_traffic_continues() -> anyhow::Result<()> {
    // The defect: windows closed only when every clicks partition sat
    // exactly at its high watermark on a tick, which steady click traffic
    // almost never allows, so nothing was written until traffic stopped.
    let s = Stack::ready().await?;
    let kafka = KafkaConfig { brokers: s.kafka.clone(), ..KafkaConfig::default() };
    adserve_events::ensure_topics(&kafka).await?;
    let tmp = tempfile::tempdir()?;
    let group = format!("adserve-steady-{}", uuid::Uuid::new_v4());
    let joiner = JoinerProcess::start(&s.kafka, &group, tmp.path(), &[]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    // Runs until told to stop (capped at 60 s of traffic).
    let producer_task = traffic(EventPublisher::new(&kafka, "test")?, "steady-traffic", 50, 3000, stop.clone());

    let mut rows_while_running = 0;
    let mut mid_commit = false;
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if producer_task.is_finished() {
            break;
        }
        let n = read_rows(tmp.path())?.iter().filter(|r| r.model_version == "steady-traffic").count();
        let status = joiner.client().await?.get_status(GetStatusRequest {}).await?.into_inner();
        mid_commit |= status.last_commit.is_some() && status.rows_written > 0;
        if n >= 50 && mid_commit {
            rows_while_running = n;
            break;
        }
    }
    let still_running = !producer_task.is_finished();
    stop.store(true, Ordering::Relaxed);
    let published = producer_task.await??;
    assert!(
        still_running && rows_while_running >= 50,
        "rows must reach Parquet (and offsets be committed) while traffic continues: {rows_while_running} rows \
         after {} impressions",
        published.ids.len()
    );
    wait_for_all(tmp.path(), &joiner, &published.ids).await?;
    assert_exactly_once(tmp.path(), &published)?;
    Ok(())
}

#[tokio::test]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let kafka = KafkaConfig { brokers: s.kafka.clone(), ..KafkaConfig::default() };
    adserve_events::ensure_topics(&kafka).await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let group = format!("adserve-sigkill-{}", uuid::Uuid::new_v4());
    let stop = Arc::new(AtomicBool::new(false));
    let producer_task = traffic(EventPublisher::new(&kafka, "test")?, "sigkill", 40, 5000, stop.clone());
    // A poison message in the stream: dead-lettered once, never blocking.
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &s.kafka).create()?;
    producer
        .send(
            FutureRecord::to(IMPRESSIONS_TOPIC).key("poison").payload(&b"\xff\x00 not protobuf"[..]),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?;

    // Round 1 kills in the pause between a file becoming durable and its
    // offsets being committed (the joiner's fault-injection knob holds it
    // there for 3 s), after round 0 has committed something; the other
    // rounds kill at random moments.
    let seed = uuid::Uuid::new_v4().as_u128();
    let mut proved_written_uncommitted = false;
    for round in 0..4 {
        let delay_ms = 300 + ((seed >> (round * 16)) as u64 % 2500);
        if round == 1 {
            let before = newest_file(dir);
            let joiner =
                JoinerProcess::start(&s.kafka, &group, dir, &[("ADSERVE_TEST_PAUSE_BEFORE_COMMIT", "3s")]).await?;
            let mut file = None;
            // A member killed a moment ago holds the partitions until its
            // session times out (10 s), so allow for that.
            for _ in 0..1200 {
                let newest = newest_file(dir);
                if newest.is_some() && newest != before {
                    file = newest;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let file = file.ok_or_else(|| anyhow::anyhow!("no file written in round 1"))?;
            joiner.sigkill().await?;
            // The file is durable and its impressions are past the committed
            // offset: exactly the written-but-not-committed state.
            let committed = committed_impressions(&s.kafka, &group, 0).await?;
            eprintln!("round 1: file {} past committed offset {committed}", file.display());
            proved_written_uncommitted = committed > 0 && max_offset_in(&file)? >= committed;
        } else {
            let joiner = JoinerProcess::start(&s.kafka, &group, dir, &[]).await?;
            // Kill only once the joiner owns the partition (a member killed
            // a moment ago holds it until its session times out); in round 0
            // also once something is committed, so round 1 can prove the
            // written-but-uncommitted path.
            let mut client = joiner.client().await?;
            for _ in 0..600 {
                let st = client.get_status(GetStatusRequest {}).await?.into_inner();
                if !st.partitions.is_empty() && (round > 0 || (st.last_commit.is_some() && st.rows_written > 0)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("round {round}: SIGKILL after {delay_ms} ms (seed {seed:#x})");
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            joiner.sigkill().await?;
        }
    }
    assert!(proved_written_uncommitted, "round 1 must kill between a durable file and its commit");
    stop.store(true, Ordering::Relaxed);
    let published = producer_task.await??;

    let joiner = JoinerProcess::start(&s.kafka, &group, dir, &[]).await?;
    wait_for_all(dir, &joiner, &published.ids).await?;
    assert_exactly_once(dir, &published)?;
    let status = joiner.client().await?.get_status(GetStatusRequest {}).await?.into_inner();
    assert!(status.rows_written > 0);
    Ok(())
}

/// A private in-memory broker (tansu, as the stack runs it), so this test
/// can have topics with several partitions.
struct PrivateBroker {
    _child: tokio::process::Child,
    brokers: String,
}

async fn private_broker() -> anyhow::Result<PrivateBroker> {
    let home = adserve_integration_tests::adstack_home();
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = tokio::process::Command::new(home.join("tansu/bin/tansu"))
        .args(["broker", "--cluster-id", "adserve-rebalance-test", "--listener-url", &url])
        .args(["--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(PrivateBroker { _child: child, brokers: format!("127.0.0.1:{port}") });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("private tansu broker did not start on {port}")
}

#[tokio::test]
async fn two_instances_split_the_partitions_and_rebalance_without_loss_or_duplicates() -> anyhow::Result<()> {
    let broker = private_broker().await?;
    let kafka = KafkaConfig { brokers: broker.brokers.clone(), partitions: 4, ..KafkaConfig::default() };
    adserve_events::ensure_topics(&kafka).await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let group = "adserve-rebalance-test";
    let env = [("ADSERVE_KAFKA__PARTITIONS", "4")];
    let stop = Arc::new(AtomicBool::new(false));
    let producer_task = traffic(EventPublisher::new(&kafka, "test")?, "rebalance", 60, 20_000, stop.clone());

    let a = JoinerProcess::start(&broker.brokers, group, dir, &env).await?;
    let owned = |j: &JoinerProcess| {
        let url = j.url.clone();
        async move {
            let mut c = LabelJoinerServiceClient::connect(url).await?;
            anyhow::Ok(c.get_status(GetStatusRequest {}).await?.into_inner())
        }
    };
    // A owns every partition and writes.
    let mut a_status = owned(&a).await?;
    for _ in 0..120 {
        if a_status.partitions.len() == 4 && a_status.rows_written > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        a_status = owned(&a).await?;
    }
    assert_eq!(a_status.partitions, [0, 1, 2, 3], "a alone owns every partition");

    // B joins: the group rebalances and they split the four partitions.
    let b = JoinerProcess::start(&broker.brokers, group, dir, &env).await?;
    let mut split = false;
    for _ in 0..160 {
        let (sa, sb) = (owned(&a).await?, owned(&b).await?);
        if sa.partitions.len() == 2 && sb.partitions.len() == 2 && sb.rows_written > 0 {
            let mut all: Vec<i32> = sa.partitions.iter().chain(&sb.partitions).copied().collect();
            all.sort_unstable();
            assert_eq!(all, [0, 1, 2, 3], "each partition has one owner");
            split = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(split, "two instances split the partitions and both write");

    // A leaves (SIGTERM): B takes everything over while traffic continues.
    a.sigterm().await?;
    let mut b_all = false;
    for _ in 0..160 {
        if owned(&b).await?.partitions.len() == 4 {
            b_all = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(b_all, "b owns every partition after a left");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let published = producer_task.await??;

    wait_for_all(dir, &b, &published.ids).await?;
    assert_exactly_once(dir, &published)?;
    // Both instances wrote files (their names carry the writer's pid).
    let rows = read_rows(dir)?;
    assert!(rows.len() >= published.ids.len());
    let mut writers = std::collections::HashSet::new();
    for f in parquet_files(dir) {
        if let Some(pid) = f.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('-').nth(2)) {
            writers.insert(pid.to_string());
        }
    }
    assert!(writers.len() >= 2, "files from both instances: {writers:?}");
    Ok(())
}

/// A local S3-compatible server (moto, installed by scripts/install.sh).
struct Moto {
    _child: tokio::process::Child,
    endpoint: String,
}

async fn moto() -> anyhow::Result<Moto> {
    let home = adserve_integration_tests::adstack_home();
    let port = free_port();
    let child = tokio::process::Command::new(home.join("s3-venv/bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("moto_server (run scripts/install.sh): {e}"))?;
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..150 {
        if adserve_integration_tests::http_client().get(&endpoint).send().await.is_ok() {
            return Ok(Moto { _child: child, endpoint });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("moto did not start on {port}")
}

/// Downloads every object under `prefix` of `bucket` into `into`, keeping
/// the key's path; returns how many. Reads with the same test credentials
/// the joiner writes with (the objects are private).
async fn download(endpoint: &str, bucket: &str, prefix: &str, into: &Path) -> anyhow::Result<usize> {
    use futures::TryStreamExt as _;
    use object_store::{ObjectStore as _, ObjectStoreExt as _};
    adserve_integration_tests::install_tls();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(bucket)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()?;
    let prefix = object_store::path::Path::from(prefix.trim_end_matches('/'));
    let objects: Vec<object_store::ObjectMeta> = store.list(Some(&prefix)).try_collect().await?;
    for meta in &objects {
        let bytes = store.get(&meta.location).await?.bytes().await?;
        let path = into.join(meta.location.as_ref());
        std::fs::create_dir_all(path.parent().expect("a key has a parent"))?;
        std::fs::write(path, bytes)?;
    }
    Ok(objects.len())
}

#[tokio::test]
async fn rows_go_to_object_storage_exactly_once_across_a_sigkill() -> anyhow::Result<()> {
    let broker = private_broker().await?;
    let kafka = KafkaConfig { brokers: broker.brokers.clone(), ..KafkaConfig::default() };
    adserve_events::ensure_topics(&kafka).await?;
    let s3 = moto().await?;
    let bucket = "adserve-training";
    adserve_integration_tests::http_client()
        .put(format!("{}/{bucket}", s3.endpoint))
        .send()
        .await?
        .error_for_status()?;
    let url = format!("s3://{bucket}/rows");
    let plain = [
        ("ADSERVE_OUTPUT_URL", url.as_str()),
        ("ADSERVE_S3__ENDPOINT", s3.endpoint.as_str()),
        ("ADSERVE_S3__ALLOW_HTTP", "true"),
        ("ADSERVE_S3__REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let mut pausing = plain.to_vec();
    pausing.push(("ADSERVE_TEST_PAUSE_BEFORE_COMMIT", "5s"));
    let unused = tempfile::tempdir()?; // output_dir is ignored when output_url is set
    let stop = Arc::new(AtomicBool::new(false));
    let producer_task = traffic(EventPublisher::new(&kafka, "test")?, "s3", 40, 5000, stop.clone());

    // SIGKILL while the first object is durable and its offsets are not yet
    // committed (held there by the fault-injection pause).
    let first = JoinerProcess::start(&broker.brokers, "s3-test", unused.path(), &pausing).await?;
    let seen = tempfile::tempdir()?;
    let mut objects = 0;
    for _ in 0..600 {
        objects = download(&s3.endpoint, bucket, "rows/", seen.path()).await?;
        if objects > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(objects > 0, "the joiner wrote an object to S3");
    first.sigkill().await?;
    assert_eq!(committed_impressions(&broker.brokers, "s3-test", 0).await?, 0, "killed before its first commit");

    stop.store(true, Ordering::Relaxed);
    let published = producer_task.await??;
    let second = JoinerProcess::start(&broker.brokers, "s3-test", unused.path(), &plain).await?;
    let status = second.client().await?.get_status(GetStatusRequest {}).await?.into_inner();
    assert_eq!(status.output_dir, url);
    let mut client = second.client().await?;
    let local = tempfile::tempdir()?;
    for _ in 0..240 {
        client.flush(FlushRequest { close_open_windows: false }).await?;
        let _ = std::fs::remove_dir_all(local.path().join("rows"));
        download(&s3.endpoint, bucket, "rows/", local.path()).await?;
        if rows_by_id(&read_rows(local.path())?, &published.ids).len() == published.ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        std::fs::read_dir(local.path().join("rows"))?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("date="))
    );
    assert_exactly_once(local.path(), &published)?;
    Ok(())
}

/// One OpenRTB bid from the stack's gateway (its `burl` set, so billed on
/// notice): the bid.
async fn openrtb_bid(s: &Stack) -> anyhow::Result<adserve_gateway::openrtb::Bid> {
    let path = adserve_integration_tests::repo_root().join("services/gateway/tests/data/openrtb/simple-banner.json");
    let mut request: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    request["id"] = serde_json::json!(format!("billing-{}", uuid::Uuid::new_v4()));
    request["user"]["id"] = serde_json::json!(format!("rtb-{}", uuid::Uuid::new_v4()));
    request.as_object_mut().expect("an object").remove("tmax");
    let resp = adserve_integration_tests::http_client()
        .post(format!("{}/openrtb2/auction", s.http))
        .json(&request)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "no bid: {}", resp.status());
    let answer: adserve_gateway::openrtb::BidResponse = resp.json().await?;
    Ok(answer.seatbid[0].bid[0].clone())
}

#[tokio::test]
async fn a_bid_becomes_a_row_only_once_billed_or_clicked_and_a_lost_bid_writes_nothing() -> anyhow::Result<()> {
    // Across the processes: the gateway bids and logs each bid billed on
    // notice; the exchange fires one bid's burl (twice, as exchanges retry),
    // a user clicks another that was never billed, the third lost its
    // auction. A joiner of its own reads the stack's topics.
    let s = Stack::ready().await?;
    let http = adserve_integration_tests::http_client();
    let (billed, clicked, lost) = (openrtb_bid(&s).await?, openrtb_bid(&s).await?, openrtb_bid(&s).await?);
    let burl = billed.burl.clone().expect("the stack's gateway sets openrtb.billing_url");
    let price = format!("{:.6}", billed.price / 2.0);
    for _ in 0..2 {
        let notice = http.get(burl.replace("${AUCTION_PRICE}", &price)).send().await?;
        assert_eq!(notice.status(), 204, "{}", notice.text().await?);
    }
    let click = serde_json::json!({
        "impression_id": clicked.ext.adserve.impression_id,
        "click_token": clicked.ext.adserve.click_token,
    });
    assert_eq!(http.post(format!("{}/v1/clicks", s.http)).json(&click).send().await?.status(), 202);

    let tmp = tempfile::tempdir()?;
    let group = format!("adserve-billing-{}", uuid::Uuid::new_v4());
    let joiner = JoinerProcess::start(&s.kafka, &group, tmp.path(), &[("ADSERVE_LABEL_WINDOW", "3s")]).await?;
    let ids = [billed.id.clone(), clicked.id.clone()];
    wait_for_all(tmp.path(), &joiner, &ids).await?;
    // Until the watermark has passed the lost bid's window too.
    let lost_event = s.impression_event(&lost.id).await?;
    assert!(lost_event.billed_on_notice, "an OpenRTB bid is logged billed on notice");
    let closes_at = lost_event.served_at.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000) + 3_000;
    let mut client = joiner.client().await?;
    let mut status = client.get_status(GetStatusRequest {}).await?.into_inner();
    for _ in 0..120 {
        let watermark = status.watermark.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
        if watermark > closes_at {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.flush(FlushRequest { close_open_windows: false }).await?;
        status = client.get_status(GetStatusRequest {}).await?.into_inner();
    }
    client.flush(FlushRequest { close_open_windows: false }).await?;
    assert!(status.unbilled >= 1 && status.billings_joined >= 1, "{status:?}");
    let rows = read_rows(tmp.path())?;
    let by = rows_by_id(&rows, &[billed.id.clone(), clicked.id.clone(), lost.id.clone()]);
    assert_eq!(by[billed.id.as_str()].len(), 1, "billed twice, one row");
    assert_eq!(by[billed.id.as_str()][0].label, 0);
    assert_eq!(by[clicked.id.as_str()].len(), 1);
    assert_eq!(by[clicked.id.as_str()][0].label, 1, "a click proves the ad was shown");
    assert!(!by.contains_key(lost.id.as_str()), "a lost bid is not a label-0 row");
    joiner.sigterm().await
}
