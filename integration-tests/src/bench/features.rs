//! Feature-service: `GetFeatures` for one user and 1, 100, 500 and 1000 ads,
//! next to the Feast feature server on the same machine and the same Redis,
//! a raw Redis MGET of the keys the service reads (the floor of its Redis
//! tier), and the service's own store reads called in-process (the floor of
//! the whole lookup: everything but gRPC and assembly).

use std::{sync::Arc, time::Duration};

use adserve_features::{Entity, Source};
use adserve_proto::v1::{GetFeaturesRequest, RequestContext, feature_service_client::FeatureServiceClient};
use anyhow::Context;
use fred::prelude::*;

use super::{
    Settings, host_port,
    load::{self, Outcome},
    peers::{self, Child},
    report::{Comparison, Metric, Role},
};

/// Ads per request.
pub const ADS: [usize; 4] = [1, 100, 500, 1000];
/// Features per entity in the Feast peer's views (the design's comparison).
pub const FEAST_USER_FEATURES: usize = 50;
/// See [`FEAST_USER_FEATURES`].
pub const FEAST_AD_FEATURES: usize = 30;
/// Users seeded in both systems.
const USERS: usize = super::e2e::USERS;

/// Runs the feature-service part over `ad_ids` (seeded in both tiers).
pub async fn run(s: &Settings, ad_ids: &[i64]) -> anyhow::Result<Vec<Comparison>> {
    let stack = &s.stack;
    load::ensure_loopback(&stack.features)?;
    load::ensure_loopback(&stack.redis)?;
    let registry = adserve_features::registry();
    let stored_user =
        registry.select(Entity::User, Source::Dynamodb).count() + registry.select(Entity::User, Source::Redis).count();
    let stored_ad =
        registry.select(Entity::Ad, Source::Dynamodb).count() + registry.select(Entity::Ad, Source::Redis).count();

    // Feast: same ids, same Redis server (its own logical database).
    let python = s.peer_python.to_str().context("peer python path")?.to_string();
    let repo = s.work_dir.join("feast-repo");
    let ids_file = s.work_dir.join("feast-ad-ids.txt");
    std::fs::write(&ids_file, ad_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n"))?;
    let redis = host_port(&stack.redis);
    let redis = redis.split('/').next().unwrap_or("127.0.0.1:6379").to_string();
    let script = "integration-tests/peers/feast_peer.py";
    peers::run(
        "Feast setup (apply + materialize)",
        &[
            &python,
            script,
            "setup",
            "--repo",
            repo.to_str().context("repo path")?,
            "--redis",
            &redis,
            "--redis-db",
            "1",
            "--users",
            &USERS.to_string(),
            "--ad-ids-file",
            ids_file.to_str().context("ids path")?,
            "--user-features",
            &FEAST_USER_FEATURES.to_string(),
            "--ad-features",
            &FEAST_AD_FEATURES.to_string(),
        ],
        &crate::repo_root(),
        &s.work_dir.join("logs/feast-setup.log"),
    )?;
    let port = crate::free_port();
    let mut feast = Child::spawn(
        "Feast feature server",
        &[&python, script, "serve", "--repo", repo.to_str().context("repo path")?, "--port", &port.to_string()],
        &[],
        &crate::repo_root(),
        s.work_dir.join("logs/feast-serve.log"),
    )?;
    feast.wait_ready(&format!("http://127.0.0.1:{port}/health"), Duration::from_secs(120)).await?;
    let feast_url = format!("http://127.0.0.1:{port}/get-online-features");
    let http = crate::http_client();

    let client = FeatureServiceClient::new(adserve_core::net::grpc_endpoint(stack.features.clone())?.connect().await?);
    let redis_client = raw_redis(&stack.redis).await?;
    let batch = Arc::new(stack.batch_store());
    let ctx = RequestContext {
        placement: "bench_1000".into(),
        device: "mobile".into(),
        surface: "home".into(),
        coppa: false,
    };
    let timeout = Duration::from_secs(5);
    let mut out = Vec::new();

    for n in ADS {
        let ids = Arc::new(ad_ids[..n].to_vec());
        let ours = {
            let (client, ids, ctx) = (client.clone(), ids.clone(), ctx.clone());
            load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |i| {
                let mut c = client.clone();
                let req = GetFeaturesRequest {
                    user_id: super::e2e::user(i),
                    ad_ids: (*ids).clone(),
                    context: Some(ctx.clone()),
                };
                async move {
                    match c.get_features(req).await {
                        Ok(r) if r.get_ref().degraded.is_empty() => Outcome::Ok,
                        Ok(r) => Outcome::Error(format!("degraded: {:?}", r.get_ref().degraded)),
                        Err(e) => Outcome::Error(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
            })
            .await
        };
        let mget = {
            let (redis, ids) = (redis_client.clone(), ids.clone());
            load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |i| {
                let (redis, keys) = (redis.clone(), redis_keys(&super::e2e::user(i), &ids));
                async move {
                    match redis.mget::<Vec<Option<Vec<u8>>>, _>(keys).await {
                        Ok(v) if v.iter().any(Option::is_some) => Outcome::Ok,
                        Ok(_) => Outcome::Error("no values: features not seeded".into()),
                        Err(e) => Outcome::Error(e.to_string()),
                    }
                }
            })
            .await
        };
        let stores = {
            let (redis, ids, batch) = (redis_client.clone(), ids.clone(), batch.clone());
            load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |i| {
                let (redis, ids, batch) = (redis.clone(), ids.clone(), batch.clone());
                async move {
                    let user = super::e2e::user(i);
                    let keys = redis_keys(&user, &ids);
                    let (r, u, a) =
                        tokio::join!(redis.mget::<Vec<Option<Vec<u8>>>, _>(keys), batch.user(&user), async {
                            batch.ads(&ids).await.into_result(0).map(|l| l.items)
                        });
                    match (r, u, a) {
                        (Ok(_), Ok(_), Ok(a)) if a.len() == ids.len() => Outcome::Ok,
                        (Ok(_), Ok(_), Ok(a)) => {
                            Outcome::Error(format!("{} of {} ads in DynamoDB", a.len(), ids.len()))
                        }
                        (r, u, a) => Outcome::Error(format!(
                            "{:?} {:?} {:?}",
                            r.err().map(|e| e.to_string()),
                            u.err().map(|e| e.to_string()),
                            a.err().map(|e| e.to_string())
                        )),
                    }
                }
            })
            .await
        };
        let feast_same = feast_load(s, &http, &feast_url, &ids, stored_user, stored_ad).await;
        let feast_full = feast_load(s, &http, &feast_url, &ids, FEAST_USER_FEATURES, FEAST_AD_FEATURES).await;
        out.push(
            Comparison::new(
                "feature-service",
                format!("1 user + {n} ads"),
                Metric::P99,
                "adserve feature-service GetFeatures (gRPC)",
                &ours,
            )
            .with(&format!("Feast, {stored_user} user + {stored_ad} ad features"), Role::Peer, &feast_same)
            .with(
                &format!("Feast, {FEAST_USER_FEATURES} user + {FEAST_AD_FEATURES} ad features"),
                Role::Peer,
                &feast_full,
            )
            .with("raw Redis MGET of the same keys", Role::Floor, &mget)
            .with("MGET + DynamoDB reads in-process", Role::Floor, &stores)
            .note(format!(
                "adserve assembles {} columns per row ({stored_user} user + {stored_ad} ad stored features, the rest \
                 from the request) from DynamoDB Local + Redis; Feast reads Redis only",
                registry.features.len()
            )),
        );
        tracing::info!(ads = n, "feature-service case done");
    }

    // One entity: the design's "1 entity x 50 features" comparison.
    let ours = {
        let (client, ctx) = (client.clone(), ctx.clone());
        let one = vec![ad_ids[0]];
        load::closed_loop(1, s.warmup(), s.window(), timeout, 1, move |i| {
            let mut c = client.clone();
            let req =
                GetFeaturesRequest { user_id: super::e2e::user(i), ad_ids: one.clone(), context: Some(ctx.clone()) };
            async move {
                match c.get_features(req).await {
                    Ok(_) => Outcome::Ok,
                    Err(e) => Outcome::Error(e.message().to_string()),
                }
            }
        })
        .await
    };
    let feast_user = feast_load(s, &http, &feast_url, &[], FEAST_USER_FEATURES, 0).await;
    out.push(
        Comparison::new("feature-service", "1 user entity", Metric::P99, "adserve GetFeatures (1 user + 1 ad)", &ours)
            .with(&format!("Feast, 1 user x {FEAST_USER_FEATURES} features"), Role::Peer, &feast_user)
            .note(format!(
                "unequal work until the registry grows: adserve reads {stored_user} user + {stored_ad} ad features \
                 from two stores, Feast {FEAST_USER_FEATURES} user features from Redis"
            )),
    );
    drop(feast);
    Ok(out)
}

/// A fred client with the service's socket settings.
async fn raw_redis(url: &str) -> anyhow::Result<Client> {
    let client = Builder::from_config(Config::from_url(url)?)
        .with_connection_config(|c| c.tcp = TcpConfig { nodelay: Some(true), ..TcpConfig::default() })
        .build()?;
    client.init().await?;
    Ok(client)
}

/// The Redis keys the feature-service reads for `user` and `ids`: one
/// packed value per entity that has real-time features.
fn redis_keys(user: &str, ids: &[i64]) -> Vec<String> {
    let registry = adserve_features::registry();
    let has = |entity| registry.select(entity, Source::Redis).next().is_some();
    let mut keys = Vec::with_capacity(1 + ids.len());
    if has(Entity::User) {
        keys.push(registry.realtime_key(Entity::User, user));
    }
    if has(Entity::Ad) {
        keys.extend(ids.iter().map(|id| registry.realtime_key(Entity::Ad, &id.to_string())));
    }
    keys
}

/// Closed-loop load on Feast's `/get-online-features` for one user and
/// `ads` (none: the user alone), asking for the first `user_features` and
/// `ad_features` features of each view.
async fn feast_load(
    s: &Settings,
    http: &reqwest::Client,
    url: &str,
    ads: &[i64],
    user_features: usize,
    ad_features: usize,
) -> load::Measurement {
    let (http, url) = (http.clone(), url.to_string());
    let ads = ads.to_vec();
    let rows = ads.len().max(1);
    // A slow peer still gets a fair number of samples.
    let window = s.window().max(Duration::from_secs(if ads.len() >= 500 { 8 } else { 2 }));
    load::closed_loop(1, s.warmup(), window, Duration::from_secs(10), rows as u64, move |i| {
        let body = feast_request(&super::e2e::user(i), &ads, user_features, ad_features);
        let (http, url) = (http.clone(), url.clone());
        async move {
            match load::json_answer(http.post(url).json(&body)).await {
                Ok(v) => feast_check(&v, rows, user_features + ad_features),
                Err(e) => e,
            }
        }
    })
    .await
}

/// The body of a Feast online-features request.
pub fn feast_request(user: &str, ads: &[i64], user_features: usize, ad_features: usize) -> serde_json::Value {
    let mut features: Vec<String> = (0..user_features).map(|i| format!("user_features:uf_{i:02}")).collect();
    features.extend((0..ad_features).map(|i| format!("ad_features:af_{i:02}")));
    let entities = if ads.is_empty() {
        serde_json::json!({ "user_id": [user] })
    } else {
        serde_json::json!({ "user_id": vec![user; ads.len()], "ad_id": ads })
    };
    serde_json::json!({ "features": features, "entities": entities })
}

/// A Feast answer counts only if every requested feature came back as a
/// number for every row: Feast 0.67 on Redis answers an unknown id with
/// status PRESENT and value null, so statuses alone prove nothing. Columns
/// are matched by `metadata.feature_names` (their order is not the request's).
fn feast_check(v: &serde_json::Value, rows: usize, features: usize) -> Outcome {
    let (Some(names), Some(results)) = (v["metadata"]["feature_names"].as_array(), v["results"].as_array()) else {
        return Outcome::Error(format!("unexpected answer {}", truncate(v)));
    };
    let mut columns = 0usize;
    for (name, column) in names.iter().zip(results) {
        let name = name.as_str().unwrap_or_default();
        if !(name.starts_with("uf_") || name.starts_with("af_")) {
            continue; // join keys
        }
        columns += 1;
        let values = column["values"].as_array().map(Vec::as_slice).unwrap_or_default();
        if values.len() != rows || !values.iter().all(serde_json::Value::is_number) {
            return Outcome::Error(format!("feature {name}: not a number for every row"));
        }
    }
    if columns == features { Outcome::Ok } else { Outcome::Error(format!("{columns} of {features} features returned")) }
}

fn truncate(v: &serde_json::Value) -> String {
    v.to_string().chars().take(200).collect()
}
