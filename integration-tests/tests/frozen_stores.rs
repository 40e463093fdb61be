//! A feature-service of the test's own over a Redis and a DynamoDB Local of
//! the test's own, each frozen with SIGSTOP (a hung peer, not a refused
//! port) and thawed with SIGCONT: every request is still answered, degraded
//! and naming the frozen tier; once the tier has missed `breaker.failures`
//! deadlines in a row, requests skip it ("circuit open") instead of waiting
//! it out; after SIGCONT a probe finds it back and its values are served
//! again.

use std::{path::PathBuf, process::Stdio, time::Duration};

use adserve_feature_service::{BatchStore, config::DynamoConfig};
use adserve_features::Entity;
use adserve_integration_tests::{Stack, adstack_home, binary, free_port};
use adserve_proto::v1::{
    GetFeaturesRequest, GetFeaturesResponse, RequestContext, feature_service_client::FeatureServiceClient,
};
use fred::prelude::*;
use tokio::process::{Child, Command};

struct Stores {
    redis: Child,
    redis_url: String,
    dynamodb: Child,
    dynamodb_url: String,
}

async fn wait_port(port: u16, what: &str, patience: Duration) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(start.elapsed() < patience, "{what} did not listen on {port} within {patience:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn start_stores() -> anyhow::Result<Stores> {
    let redis_port = free_port();
    let redis = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &redis_port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let dir: PathBuf = adstack_home().join("dynamodb-local");
    let dynamodb_port = free_port();
    let dynamodb = Command::new("java")
        .current_dir(&dir)
        .args(["-Xmx256m", "-XX:+UseSerialGC"])
        .arg(format!("-Djava.library.path={}", dir.join("DynamoDBLocal_lib").display()))
        .args(["-jar", "DynamoDBLocal.jar", "-inMemory", "-port", &dynamodb_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_port(redis_port, "redis-server", Duration::from_secs(20)).await?;
    wait_port(dynamodb_port, "DynamoDB Local", Duration::from_secs(60)).await?;
    Ok(Stores {
        redis,
        redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
        dynamodb,
        dynamodb_url: format!("http://127.0.0.1:{dynamodb_port}"),
    })
}

fn signal(child: &Child, sig: &str) -> anyhow::Result<()> {
    let pid = child.id().expect("running");
    anyhow::ensure!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status()?.success());
    Ok(())
}

fn reason<'a>(r: &'a GetFeaturesResponse, component: &str) -> Option<&'a str> {
    r.degraded.iter().find(|d| d.component == component).map(|d| d.reason.as_str())
}

#[tokio::test]
async fn frozen_tiers_cost_their_deadline_then_nothing_and_are_probed_back() -> anyhow::Result<()> {
    let _stack = Stack::ready().await?; // installed binaries and DynamoDB Local's jar
    let stores = start_stores().await?;
    let registry = adserve_features::registry();
    let user = "frozen-user".to_string();

    // The values each tier serves while it is up.
    let redis = Client::new(Config::from_url(&stores.redis_url)?, None, None, None);
    redis.init().await?;
    let packed = adserve_features::realtime::Packed::of(&[("impressions_1h", 5.0)], 0).expect("an attribute");
    let () = redis.set(registry.realtime_key(Entity::User, &user), packed.encode(), None, None, false).await?;
    let batch = BatchStore::new(
        &DynamoConfig {
            endpoint: stores.dynamodb_url.clone(),
            timeout: Duration::from_secs(5),
            ..DynamoConfig::default()
        },
        registry,
    );
    batch.ensure_tables().await?;
    batch.put_users(&[(user.clone(), [("ctr_30d".to_string(), 0.07)].into())]).await?;

    // Two feature-services over the stores: one reading DynamoDB on every
    // request (its user cache off), whose breaker this test drives, and one
    // with the user cache on (the default).
    let spawn = |user_cache_ttl: &str| -> anyhow::Result<(tokio::process::Child, u16, u16)> {
        let (grpc, metrics) = (free_port(), free_port());
        let child = Command::new(binary("adserve-feature-service"))
            .env("ADSERVE_MODE", "serve")
            .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{metrics}"))
            .env("ADSERVE_REDIS__URL", &stores.redis_url)
            .env("ADSERVE_DYNAMODB__ENDPOINT", &stores.dynamodb_url)
            .env("ADSERVE_BREAKER__FAILURES", "3")
            .env("ADSERVE_BREAKER__COOLDOWN", "500ms")
            .env("ADSERVE_USER_CACHE__TTL", user_cache_ttl)
            .env("ADSERVE_TELEMETRY__LOG_FILTER", "error")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok((child, grpc, metrics))
    };
    let (_service, grpc, metrics) = spawn("0s")?;
    let (_cached_service, cached_grpc, _) = spawn("60s")?;
    wait_port(grpc, "feature-service", Duration::from_secs(30)).await?;
    wait_port(cached_grpc, "feature-service (user cache on)", Duration::from_secs(30)).await?;
    let mut client = FeatureServiceClient::connect(format!("http://127.0.0.1:{grpc}")).await?;
    let mut cached = FeatureServiceClient::connect(format!("http://127.0.0.1:{cached_grpc}")).await?;
    let request = GetFeaturesRequest {
        user_id: user.clone(),
        ad_ids: vec![1, 2],
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
    };
    let col = |name: &str| registry.index_of(name).expect(name);
    let served = |r: &GetFeaturesResponse, name: &str| r.matrix.as_ref().expect("matrix").values[col(name)];
    // Asks until `done` holds (every answer must be an answer, never an error).
    let mut ask_until = async |what: &str, done: &dyn Fn(&GetFeaturesResponse) -> bool| {
        for _ in 0..200 {
            let r = client.get_features(request.clone()).await?.into_inner();
            if done(&r) {
                return anyhow::Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("{what}: never")
    };
    let healthy = |r: &GetFeaturesResponse| {
        r.degraded.is_empty() && served(r, "user_impressions_1h") == 5.0 && served(r, "user_ctr_30d") == 0.07
    };
    ask_until("both tiers served", &healthy).await?;
    // The cached service reads the user, and learns ads 1 and 2 are unknown
    // (asked again after its ad table's first load, which forgets that).
    for _ in 0..2 {
        let r = cached.get_features(request.clone()).await?.into_inner();
        assert!(healthy(&r), "{:?}", r.degraded);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    for (store, component, child) in [("redis", "redis", &stores.redis), ("dynamodb", "dynamodb", &stores.dynamodb)] {
        signal(child, "-STOP")?;
        // First the deadline is waited out and named (the service's own
        // timeout, or the client's, which is set to the same deadline)...
        let r = ask_until("the frozen tier named", &|r| reason(r, component).is_some()).await?;
        let waited = |x: &str| x.contains("no answer within") || x.contains("timed out");
        assert!(reason(&r, component).is_some_and(waited), "{store}: {:?}", r.degraded);
        // ...then, after three in a row, skipped.
        let r = ask_until("the circuit open", &|r| reason(r, component).is_some_and(|x| x.contains("circuit open")))
            .await?;
        let other = if component == "redis" { "user_ctr_30d" } else { "user_impressions_1h" };
        let expected = if component == "redis" { 0.07 } else { 5.0 };
        assert_eq!(served(&r, other), expected, "{store} frozen: the other tier still serves");
        if component == "dynamodb" {
            // With the user cache, a user read within its TTL is served from
            // memory while DynamoDB is frozen; a user it has not read degrades.
            let r = cached.get_features(request.clone()).await?.into_inner();
            assert!(reason(&r, component).is_none() && served(&r, "user_ctr_30d") == 0.07, "{:?}", r.degraded);
            let stranger = GetFeaturesRequest { user_id: "never-read".into(), ..request.clone() };
            let r = cached.get_features(stranger).await?.into_inner();
            assert!(reason(&r, component).is_some(), "a user not in the cache degrades: {:?}", r.degraded);
        }
        signal(child, "-CONT")?;
        // A probe finds it back.
        ask_until("the thawed tier served again", &healthy).await?;
    }

    let text = adserve_integration_tests::bench::prom::scrape(&format!("http://127.0.0.1:{metrics}/metrics")).await?;
    for source in ["redis", "dynamodb"] {
        let label = format!("source=\"{source}\"");
        let opened =
            adserve_integration_tests::bench::prom::counter(&text, "adserve_feature_breaker_opened_total", &[&label]);
        assert!(opened >= 1.0, "{source}: the breaker opened ({opened})\n{text}");
    }
    drop(stores.dynamodb);
    drop(stores.redis);
    Ok(())
}
