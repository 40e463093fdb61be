//! Bad input gets a 4xx naming the problem; dead dependencies cost at most
//! their deadline and the answer says what degraded. Gateways with broken
//! dependencies run in-process against the real stack.

use std::time::Duration;

use adserve_catalog::Catalog;
use adserve_events::EventPublisher;
use adserve_gateway::{AdServer, GatewayConfig, http};
use adserve_integration_tests::Stack;
use serde_json::{Value, json};

const DEAD: &str = "http://127.0.0.1:1";

async fn post(url: &str, body: &str) -> anyhow::Result<(u16, Value)> {
    let resp = adserve_integration_tests::http_client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or_default().to_string()
}

fn good() -> Value {
    json!({"user_id": "demo-user-2", "context": {"placement": "feed_top", "device": "mobile"}, "slots": 1})
}

#[tokio::test]
async fn malformed_requests_get_400_naming_the_field() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let url = format!("{}/v1/ads", s.http);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "key must be a string"),
        ("".into(), "body"),
        (json!({"context": {"placement": "p", "device": "mobile"}, "slots": 1}).to_string(), "missing field `user_id`"),
        (
            json!({"user_id": "u", "context": {"placement": "p", "device": "mobile"}, "slots": 1, "colour": 1})
                .to_string(),
            "unknown field `colour`",
        ),
        (
            json!({"user_id": "u", "context": {"placement": "p", "device": "mobile", "x": 1}, "slots": 1}).to_string(),
            "context",
        ),
        (json!({"user_id": "u", "context": {"placement": "p", "device": "mobile"}, "slots": 0}).to_string(), "slots"),
        (json!({"user_id": "u", "context": {"placement": "p", "device": "mobile"}, "slots": -3}).to_string(), "slots"),
        (
            json!({"user_id": "u", "context": {"placement": "p", "device": "mobile"}, "slots": "two"}).to_string(),
            "slots",
        ),
        (json!({"user_id": "u", "slots": 1}).to_string(), "context"),
        (
            json!({"user_id": "u", "context": {"placement": "p", "device": "fridge"}, "slots": 1}).to_string(),
            "context.device",
        ),
        (json!({"user_id": "", "context": {"placement": "p", "device": "mobile"}, "slots": 1}).to_string(), "user_id"),
        (
            format!(
                "{}trailing",
                json!({"user_id": "u", "context": {"placement": "p", "device": "mobile"}, "slots": 1})
            ),
            "body: after the JSON value",
        ),
    ];
    for (body, needle) in cases {
        let (status, v) = post(&url, &body).await?;
        assert_eq!(status, 400, "{body} -> {v}");
        assert!(message(&v).contains(needle), "{body}: expected {needle:?} in {v}");
        assert_eq!(v["error"]["code"], "invalid_argument");
    }
    let (status, v) = post(&format!("{}/v1/clicks", s.http), &json!({"impression_id": "nope"}).to_string()).await?;
    assert_eq!(status, 400);
    assert!(message(&v).starts_with("impression_id"), "{v}");
    Ok(())
}

/// Click tokens across the process boundary: a click without a token, with
/// a malformed one, with another impression's token or with an altered one
/// is refused (400 / 403, counted) and never reaches the click log, so it
/// can never become a label or a charge; the genuine click is logged once
/// and its replay refused (409).
#[tokio::test]
async fn forged_and_replayed_clicks_are_refused_and_never_logged() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let ads = format!("{}/v1/ads", s.http);
    let clicks = format!("{}/v1/clicks", s.http);
    let body = json!({"user_id": "click-forger", "context": {"placement": "feed_top", "device": "mobile"}, "slots": 1});
    let (_, a) = post(&ads, &body.to_string()).await?;
    let (_, b) = post(&ads, &body.to_string()).await?;
    let (a, b) = (&a["winners"][0], &b["winners"][0]);
    let a_id = a["impression_id"].as_str().expect("impression").to_string();
    let token = b["click_token"].as_str().expect("token").to_string();
    // One signature character changed: the first, whose 6 bits all count (the
    // last one of unpadded base64 carries padding bits a strict decoder checks).
    let at = token.rfind('.').expect("signed token") + 1;
    let first = &token[at..=at];
    let altered = format!("{}{}{}", &token[..at], if first == "A" { "B" } else { "A" }, &token[at + 1..]);
    let cases = [
        (json!({"impression_id": a_id}), 400, "click_token: required"),
        (json!({"impression_id": a_id, "click_token": "v1.1.2.AAAA.x"}), 400, "click_token: malformed"),
        (json!({"impression_id": a_id, "click_token": token}), 403, "click_token: does not match"),
        (json!({"impression_id": b["impression_id"], "click_token": altered}), 403, "click_token: does not match"),
    ];
    for (click, status, needle) in cases {
        let (got, v) = post(&clicks, &click.to_string()).await?;
        assert_eq!(got, status, "{click} -> {v}");
        assert!(message(&v).starts_with(needle), "{click}: expected {needle:?} in {v}");
    }
    // The genuine click on B is logged; its replay is refused.
    let genuine = json!({"impression_id": b["impression_id"], "click_token": token});
    let (status, v) = post(&clicks, &genuine.to_string()).await?;
    assert_eq!(status, 202, "{v}");
    let (status, v) = post(&clicks, &genuine.to_string()).await?;
    assert_eq!((status, v["error"]["code"].as_str()), (409, Some("already_recorded")), "{v}");
    // Nothing for A reached the click log before B's click (one partition:
    // everything the refused requests could have logged comes before it).
    let b_id = b["impression_id"].as_str().unwrap();
    let keys = s.keys_until(adserve_events::CLICKS_TOPIC, b_id).await?;
    assert!(!keys.iter().any(|k| k == &a_id), "a refused click was logged");
    Ok(())
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_not_a_413() -> anyhow::Result<()> {
    // Before, every body-read error answered 413 "larger than the limit".
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = Stack::ready().await?;
    let addr = s.http.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    conn.write_all(
        b"POST /v1/ads HTTP/1.1\r\nHost: adserve\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"use\r\nnot-a-size\r\n\r\n",
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), conn.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("body: could not be read"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_gets_408_after_the_body_timeout() -> anyhow::Result<()> {
    // Content-Length promises 100 bytes, 10 arrive, then nothing: the
    // gateway answers 408 after `body_timeout` (2 s) instead of holding the
    // connection until the request timeout (30 s) or forever.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = Stack::ready().await?;
    let addr = s.http.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    conn.write_all(
        b"POST /v1/ads HTTP/1.1\r\nHost: adserve\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"user_id\"",
    )
    .await?;
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), conn.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout") && answer.contains("body: not received within"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    Ok(())
}

#[tokio::test]
async fn oversized_body_is_rejected_with_413() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let body = json!({"user_id": "x".repeat(100_000), "context": {"placement": "p", "device": "mobile"}, "slots": 1});
    let (status, v) = post(&format!("{}/v1/ads", s.http), &body.to_string()).await?;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
    assert!(message(&v).starts_with("body"), "{v}");
    Ok(())
}

#[tokio::test]
async fn unknown_user_is_served_with_default_features() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let body = json!({"user_id": format!("never-seen-{}", uuid::Uuid::new_v4()), "context": {"placement": "feed_top", "device": "mobile"}, "slots": 1});
    let (status, v) = post(&format!("{}/v1/ads", s.http), &body.to_string()).await?;
    assert_eq!(status, 200, "{v}");
    let event = s.impression_event(v["winners"][0]["impression_id"].as_str().unwrap()).await?;
    let f = event.features.unwrap();
    let i = f.names.iter().position(|n| n == "user_ctr_30d").unwrap();
    assert_eq!(f.values[i], adserve_features::registry().features[i].default);
    Ok(())
}

#[tokio::test]
async fn corrupt_stored_feature_values_are_served_as_defaults_and_counted() -> anyhow::Result<()> {
    // A stored "nan", a counter past f32, a value that is not a number and a
    // CTR of 3.5: each cell is served as its default and counted invalid; the
    // rest of the request (other columns, other ads) is served as stored, and
    // nothing is reported degraded. Before, the NaN reached the ranker, which
    // refused the whole matrix, and "lots" failed the whole Redis MGET.
    use adserve_features::Entity;
    use adserve_proto::v1::{GetFeaturesRequest, RequestContext, feature_service_client::FeatureServiceClient};
    use fred::interfaces::KeysInterface as _;
    let s = Stack::ready().await?;
    let registry = adserve_features::registry();
    let run = uuid::Uuid::new_v4().as_u128() as i64 & 0x7fff_ffff;
    let (user, bad_ad, good_ad) = (format!("corrupt-{run}"), 9_000_000_000 + run, 9_100_000_000 + run);
    let spec = |name: &str| registry.features.iter().find(|f| f.name == name).expect(name);
    let realtime = s.realtime_store().await?;
    realtime
        .set_counters(&[
            (Entity::User, user.clone(), vec![(spec("user_impressions_1h").attribute.clone(), f64::NAN)]),
            (Entity::Ad, good_ad.to_string(), vec![(spec("ad_impressions_1h").attribute.clone(), 12.0)]),
        ])
        .await?;
    let redis = fred::prelude::Client::new(fred::prelude::Config::from_url(&s.redis)?, None, None, None);
    fred::interfaces::ClientLike::init(&redis).await?;
    let _: () = redis
        .set(registry.realtime_key(Entity::Ad, &bad_ad.to_string()), "impressions_1h=lots", None, None, false)
        .await?;
    let batch = s.batch_store();
    batch
        .put_users(&[(user.clone(), [("ctr_30d".to_string(), 0.05), ("sessions_7d".to_string(), 1e30)].into())])
        .await?;
    batch
        .put_ads(&[
            (bad_ad, [("ctr_7d".to_string(), 3.5), ("quality_score".to_string(), 0.8)].into()),
            (good_ad, [("ctr_7d".to_string(), 0.04), ("quality_score".to_string(), 0.7)].into()),
        ])
        .await?;
    let mut c = FeatureServiceClient::connect(s.features.clone()).await?;
    let ctx = RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() };
    let resp = c
        .get_features(GetFeaturesRequest { user_id: user.clone(), ad_ids: vec![bad_ad, good_ad], context: Some(ctx) })
        .await?
        .into_inner();
    assert!(resp.degraded.is_empty(), "{:?}", resp.degraded);
    let m = resp.matrix.expect("matrix");
    assert!(m.values.iter().all(|v| v.is_finite()));
    let col = |name: &str| registry.index_of(name).expect(name);
    let cell = |row: usize, name: &str| m.values[row * m.feature_names.len() + col(name)];
    for row in 0..2 {
        assert_eq!(cell(row, "user_impressions_1h"), spec("user_impressions_1h").default, "NaN in Redis");
        assert_eq!(cell(row, "user_sessions_7d"), spec("user_sessions_7d").default, "1e30 is out of range");
        assert_eq!(cell(row, "user_ctr_30d"), 0.05, "the user's valid values are served");
    }
    assert_eq!(cell(0, "ad_ctr_7d"), spec("ad_ctr_7d").default, "a CTR of 3.5");
    assert_eq!(cell(0, "ad_impressions_1h"), spec("ad_impressions_1h").default, "\"lots\"");
    assert_eq!(cell(0, "ad_quality_score"), 0.8);
    assert_eq!((cell(1, "ad_ctr_7d"), cell(1, "ad_impressions_1h")), (0.04, 12.0), "the other ad is untouched");
    // One count per column: dense, then categorical, then embedding columns.
    let columns = m.feature_names.len() + m.categorical_names.len() + m.embedding_names.len();
    assert_eq!((resp.invalid.len(), resp.missing.len()), (columns, columns));
    assert_eq!(resp.invalid[col("user_impressions_1h")], 2);
    assert_eq!(resp.invalid[col("user_sessions_7d")], 2);
    assert_eq!(resp.invalid[col("ad_ctr_7d")], 1);
    assert_eq!(resp.invalid[col("ad_impressions_1h")], 1);
    // The log1p view of the same stored 1e30 is refused too (the range is
    // checked on the stored value, before the transform).
    assert_eq!(resp.invalid[col("user_sessions_7d_log")], 2);
    // "lots" is not the packed layout: every real-time column of that ad.
    let ad_realtime = registry.select(Entity::Ad, adserve_features::Source::Redis).count() as u32;
    for (c, _) in registry.select(Entity::Ad, adserve_features::Source::Redis) {
        assert_eq!(resp.invalid[c], 1, "{}", registry.features[c].name);
    }
    assert_eq!(resp.invalid.iter().sum::<u32>(), 7 + ad_realtime);
    // Columns nobody stored are missing, not invalid.
    assert_eq!(resp.missing[col("user_interest_travel")], 2);
    assert_eq!(resp.missing[col("ad_ctr_7d")], 0);
    Ok(())
}

#[tokio::test]
async fn an_updated_ad_row_reaches_the_in_process_table_within_seconds() -> anyhow::Result<()> {
    // The feature-service serves ad batch features from memory; a write
    // bumps the table's version and the next refresh swaps the copy. A new
    // ad is served at once (looked up in DynamoDB until the reload).
    use adserve_proto::v1::{GetFeaturesRequest, RequestContext, feature_service_client::FeatureServiceClient};
    let s = Stack::ready().await?;
    let registry = adserve_features::registry();
    let ad = 9_200_000_000 + (uuid::Uuid::new_v4().as_u128() as i64 & 0x7fff_ffff);
    let batch = s.batch_store();
    let before = batch.ad_version().await?;
    batch.put_ads(&[(ad, [("ctr_7d".to_string(), 0.011)].into())]).await?;
    assert!(batch.ad_version().await? > before, "a write bumps the version");
    let mut c = FeatureServiceClient::connect(s.features.clone()).await?;
    let ctx = RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() };
    let col = registry.index_of("ad_ctr_7d").expect("ad_ctr_7d");
    let ask = |c: &mut FeatureServiceClient<tonic::transport::Channel>| {
        let req = GetFeaturesRequest { user_id: "u".into(), ad_ids: vec![ad], context: Some(ctx.clone()) };
        let mut c = c.clone();
        async move { anyhow::Ok(c.get_features(req).await?.into_inner().matrix.expect("matrix").values[col]) }
    };
    assert_eq!(ask(&mut c).await?, 0.011, "a new ad is served at once");
    // Wait until the service's copy holds the write (its version gauge), so
    // the update below can only reach the answer through a reload.
    let written = batch.ad_version().await?;
    let metrics = s.metrics.iter().find(|(n, _)| n == "feature-service").map(|(_, a)| a.clone()).expect("address");
    let version = || async {
        let text = adserve_integration_tests::http_client()
            .get(format!("http://{metrics}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        anyhow::Ok(
            text.lines()
                .find_map(|l| l.strip_prefix("adserve_feature_ad_table_version "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(-1.0),
        )
    };
    let mut loaded = false;
    for _ in 0..100 {
        if version().await? >= written as f64 {
            loaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(loaded, "the table reloaded to version {written} within 10 s");
    batch.put_ads(&[(ad, [("ctr_7d".to_string(), 0.022)].into())]).await?;
    let mut seen = 0.0;
    for _ in 0..100 {
        seen = ask(&mut c).await?;
        if seen == 0.022 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 0.022, "the update is served after the refresh (ad_table.refresh = 1 s)");
    Ok(())
}

/// A gateway in this process, on a random port, wired as `tweak` says.
async fn gateway(s: &Stack, tweak: impl FnOnce(&mut GatewayConfig)) -> anyhow::Result<String> {
    Ok(format!("{}/v1/ads", s.in_process_gateway(tweak).await?))
}

/// Guards against hangs only; no timing is asserted.
async fn answer(url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    tokio::time::timeout(Duration::from_secs(20), post(url, &body.to_string())).await?
}

#[tokio::test]
async fn empty_catalog_is_a_no_fill_not_an_error() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let schema = format!("empty_{}", uuid::Uuid::new_v4().simple());
    let url = gateway(&s, |c| c.postgres.schema = schema).await?;
    let (status, v) = answer(&url, &good()).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["winners"], json!([]));
    assert_eq!(v["no_fill_reason"], "no_eligible_ads");
    Ok(())
}

#[tokio::test]
async fn dead_feature_ranker_and_auction_services_degrade_but_still_serve() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let url = gateway(&s, |c| {
        c.upstreams.feature_service = DEAD.into();
        c.upstreams.ranker = DEAD.into();
        c.upstreams.auction = DEAD.into();
    })
    .await?;
    let (status, v) = answer(&url, &good()).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["winners"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["model_version"], "fallback-prior");
    let degraded: Vec<&str> =
        v["degraded"].as_array().unwrap().iter().map(|d| d["component"].as_str().unwrap()).collect();
    assert_eq!(degraded, vec!["feature-service", "ranker", "auction"]);
    // The impression still records exactly what was used to rank.
    let event = s.impression_event(v["winners"][0]["impression_id"].as_str().unwrap()).await?;
    assert_eq!(event.model_version, "fallback-prior");
    assert_eq!(event.score_level(), adserve_proto::v1::ScoreLevel::Prior, "the gateway's own prior");
    assert_eq!(
        event.features.unwrap().values,
        adserve_gateway::pipeline::default_matrix(
            &[event.ad_id],
            &adserve_proto::v1::RequestContext {
                placement: "feed_top".into(),
                device: "mobile".into(),
                ..Default::default()
            }
        )
        .values
    );
    Ok(())
}

#[tokio::test]
async fn dead_catalog_answers_503_naming_it() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let url = gateway(&s, |c| c.postgres.url = "postgres://adserve:adserve@127.0.0.1:1/adserve".into()).await?;
    let (status, v) = answer(&url, &good()).await?;
    assert_eq!(status, 503, "{v}");
    assert!(message(&v).starts_with("catalog unavailable"), "{v}");
    Ok(())
}

#[tokio::test]
async fn dead_kafka_serves_no_unlogged_ad() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let url = gateway(&s, |c| {
        c.kafka.brokers = "127.0.0.1:1".into();
        c.kafka.publish_timeout = std::time::Duration::from_secs(1);
        c.deadlines.request = std::time::Duration::from_secs(2);
    })
    .await?;
    let (status, v) = answer(&url, &good()).await?;
    assert_eq!(status, 503, "{v}");
    assert!(message(&v).contains("kafka"), "{v}");
    Ok(())
}

#[tokio::test]
async fn a_fatal_kafka_producer_makes_the_gateway_unready_until_it_is_replaced() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut config = s.gateway_config();
    // The first replacement waits 3 s: long enough to observe the unready state.
    config.kafka.recovery_backoff_min = Duration::from_secs(3);
    let events = EventPublisher::new(&config.kafka, "test")?;
    events.warm_up(&adserve_integration_tests::WARM_TOPICS, Duration::from_secs(5)).await?;
    let readiness = adserve_core::Readiness::new();
    adserve_events::report_health(events.clone(), readiness.clone(), "kafka impression log");
    let server = AdServer::new(config.clone(), Catalog::connect_lazy(&config.postgres)?, events.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = http::router(server, http::BodyLimits::of(&config), readiness);
    tokio::spawn(async move { axum::serve(listener, router).await });
    let ads = format!("{base}/v1/ads");
    assert_eq!(answer(&ads, &good()).await?.0, 200);

    // What librdkafka does to a fenced idempotent producer: it never recovers by itself.
    events.inject_fatal_error_for_tests("fenced by the test");
    let (status, v) = answer(&ads, &good()).await?;
    assert_eq!(status, 503, "{v}");
    assert!(message(&v).contains("fenced by the test"), "{v}");
    // The failed send marked the producer fatal, which made the gateway unready
    // at once, naming the dependency.
    let r = adserve_integration_tests::http_client().get(format!("{base}/healthz")).send().await?;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await?;
    assert!(v["reasons"].to_string().contains("kafka impression log"), "{v}");
    // A fresh producer replaces the fatal one: ready and serving again.
    let mut served = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ready =
            adserve_integration_tests::http_client().get(format!("{base}/healthz")).send().await?.status() == 200;
        if ready && answer(&ads, &good()).await?.0 == 200 {
            served = true;
            break;
        }
    }
    assert!(served, "the gateway did not serve again after the producer was replaced");
    Ok(())
}

#[tokio::test]
async fn dead_redis_counters_degrade_but_still_serve() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let url = gateway(&s, |c| {
        c.counters.url = "redis://127.0.0.1:1/0".into();
        c.pacing.interval = Duration::from_millis(200);
    })
    .await?;
    let (status, v) = answer(&url, &good()).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["winners"].as_array().map(Vec::len), Some(1), "{v}");
    let reasons: Vec<String> = v["degraded"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["component"] == "redis")
        .map(|d| d["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(reasons.iter().any(|r| r.starts_with("frequency caps not applied")), "{v}");
    // A click is still logged: durable in Kafka, where the aggregator reads
    // it (the gateway writes no counters).
    // The replay guard is in Redis too: without it the click is logged
    // unguarded (the joiner and aggregator count one click per impression).
    let click =
        json!({"impression_id": v["winners"][0]["impression_id"], "click_token": v["winners"][0]["click_token"]});
    let base = url.trim_end_matches("/v1/ads");
    let (status, c) = post(&format!("{base}/v1/clicks"), &click.to_string()).await?;
    assert_eq!(status, 202, "{c}");
    Ok(())
}

/// Publisher API keys across both faces of a real gateway: without a key,
/// or with one that is not configured, ad requests and clicks are refused
/// (401 / Unauthenticated) before any work; each configured key is admitted
/// up to its own bucket and then refused (429 with Retry-After /
/// ResourceExhausted) without touching the other publisher; health checks
/// need no key.
#[tokio::test]
async fn api_keys_admit_their_publishers_and_each_has_its_own_rate_limit() -> anyhow::Result<()> {
    use adserve_gateway::{auth::key_sha256, config::ApiKey, grpc::GatewayGrpc};
    use adserve_proto::v1::{GetAdsRequest, RequestContext, gateway_service_client::GatewayServiceClient};
    let s = Stack::ready().await?;
    let (news, app) = ("news-key-5b2f0c7e91d4", "app-key-0f6c2d9a84e1");
    let mut config = s.gateway_config();
    config.auth.api_keys = vec![
        ApiKey { publisher: "news".into(), sha256: key_sha256(news), requests_per_second: 1, burst: 2 },
        ApiKey { publisher: "app".into(), sha256: key_sha256(app), requests_per_second: 1000, burst: 1000 },
    ];
    let events = EventPublisher::new(&config.kafka, "test")?;
    events.warm_up(&adserve_integration_tests::WARM_TOPICS, Duration::from_secs(5)).await?;
    let server = AdServer::new(config.clone(), Catalog::connect_lazy(&config.postgres)?, events)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = http::router(server.clone(), http::BodyLimits::of(&config), adserve_core::Readiness::new());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_url = format!("http://{}", grpc_listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GatewayGrpc(server).into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc_listener)),
    );

    let client = adserve_integration_tests::http_client();
    let ads = format!("{base}/v1/ads");
    let post = |header: Option<(&'static str, String)>| {
        let mut r = client.post(&ads).json(&good());
        if let Some((name, value)) = header {
            r = r.header(name, value);
        }
        r.send()
    };
    // No key, an unknown key: 401, before any work.
    for header in [None, Some(("authorization", "Bearer not-a-key".to_string()))] {
        let r = post(header).await?;
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers().get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
        let v: Value = r.json().await?;
        assert_eq!(v["error"]["code"], "unauthenticated", "{v}");
    }
    let r = client.post(format!("{base}/v1/clicks")).json(&json!({"impression_id": "x"})).send().await?;
    assert_eq!(r.status(), 401, "clicks need a key too");
    assert_eq!(client.get(format!("{base}/healthz")).send().await?.status(), 200, "health needs none");

    // The news publisher: its burst of 2 (either header form), then 429.
    assert_eq!(post(Some(("authorization", format!("Bearer {news}")))).await?.status(), 200);
    assert_eq!(post(Some(("x-api-key", news.to_string()))).await?.status(), 200);
    let r = post(Some(("x-api-key", news.to_string()))).await?;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).expect("Retry-After");
    assert!(retry >= 1, "{retry}");
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    // The other publisher is not throttled by it.
    assert_eq!(post(Some(("x-api-key", app.to_string()))).await?.status(), 200);

    // gRPC: the same keys in metadata.
    let mut grpc = GatewayServiceClient::connect(grpc_url).await?;
    let request = || GetAdsRequest {
        user_id: "demo-user-2".into(),
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
        slots: 1,
        ..Default::default()
    };
    let status = grpc.get_ads(request()).await.expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let mut keyed = tonic::Request::new(request());
    keyed.metadata_mut().insert("authorization", format!("Bearer {app}").parse()?);
    assert!(grpc.get_ads(keyed).await.is_ok());
    let mut throttled = tonic::Request::new(request());
    throttled.metadata_mut().insert("x-api-key", news.parse()?);
    let status = grpc.get_ads(throttled).await.expect_err("news is over its rate");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    Ok(())
}
