//! The auction's policies across the gateway, against the real stack: each
//! test runs a gateway in this process over its own catalog schema, the
//! stack's feature-service, ranker, auction service, Kafka and Redis.
//! Frequency caps, budgets (the hard stop and click charges), CPM spend,
//! blocked categories and advertisers, the advertiser cap and exploration
//! with logged propensities. Frequency counts and spend are written by the
//! stack's stream aggregator from the logged events (the gateway only reads
//! them), so the tests wait for it where a count matters.

use std::time::Duration;

use adserve_catalog::{Catalog, NewAd, NewCampaign};
use adserve_gateway::GatewayConfig;
use adserve_integration_tests::Stack;
use fred::interfaces::{HashesInterface as _, KeysInterface as _};
use serde_json::{Value, json};

async fn post(url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        adserve_integration_tests::http_client().post(url).json(body).send(),
    )
    .await??;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

/// A CPC campaign of `advertiser` with one ad in `category`.
fn campaign(advertiser: &str, name: &str, bid_cpc_micros: i64, category: &str) -> NewCampaign {
    NewCampaign {
        advertiser: advertiser.into(),
        advertiser_domain: format!("{advertiser}.example"),
        name: name.into(),
        bid_cpc_micros,
        daily_budget_micros: 1_000_000_000_000,
        ads: vec![NewAd {
            title: format!("{name} ad"),
            landing_url: format!("https://{advertiser}.example/{name}"),
            category: category.into(),
            ..NewAd::default()
        }],
        ..NewCampaign::default()
    }
}

/// Inserts `campaigns`; returns each one's campaign id.
async fn insert(catalog: &Catalog, campaigns: &[NewCampaign]) -> anyhow::Result<Vec<i64>> {
    let mut ids = Vec::new();
    for c in campaigns {
        let ad = catalog.insert_campaign(c).await?[0];
        let (campaign,): (i64,) =
            sqlx::query_as("SELECT campaign_id FROM ads WHERE id = $1").bind(ad).fetch_one(catalog.pool()).await?;
        ids.push(campaign);
    }
    Ok(ids)
}

fn request(user: &str, slots: u32) -> Value {
    json!({"user_id": user, "context": {"placement": "feed_top", "device": "mobile"}, "slots": slots})
}

fn campaigns_of(v: &Value) -> Vec<i64> {
    v["winners"].as_array().map(|w| w.iter().map(|w| w["campaign_id"].as_i64().unwrap()).collect()).unwrap_or_default()
}

fn today() -> u64 {
    adserve_counters::day_of(adserve_gateway::pacing::unix_now())
}

/// Waits (up to 20 s) until `read` gives `want`; the value last read.
async fn settles<F, Fut>(want: Option<i64>, mut read: F) -> anyhow::Result<Option<i64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<i64>>>,
{
    let started = std::time::Instant::now();
    loop {
        let got = read().await?;
        if got == want || started.elapsed() > Duration::from_secs(20) {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn gateway_on(s: &Stack, schema: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> anyhow::Result<String> {
    let schema = schema.to_string();
    s.in_process_gateway(|c| {
        c.postgres.schema = schema;
        c.pacing.interval = Duration::from_millis(100);
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn a_frequency_capped_campaign_stops_serving_the_user_and_only_that_user() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let mut capped = campaign("acme", "capped", 3_000_000, "travel");
    capped.frequency_cap_per_day = Some(2);
    let ids = insert(&catalog, &[capped, campaign("globex", "open", 1_000_000, "travel")]).await?;
    let base = gateway_on(&s, &schema, |_| {}).await?;
    let counters = s.counters().await?;
    let user = format!("cap-user-{}", uuid::Uuid::new_v4());
    let mut served = Vec::new();
    for _ in 0..4 {
        let (status, v) = post(&format!("{base}/v1/ads"), &request(&user, 1)).await?;
        assert_eq!(status, 200, "{v}");
        let redis = v["degraded"].as_array().unwrap().iter().any(|d| d["component"] == "redis");
        assert!(!redis, "the counters answered: {v}");
        served.extend(campaigns_of(&v));
        // The aggregator counts each logged impression once.
        for id in &ids {
            let want = served.iter().filter(|&c| c == id).count() as i64;
            let want = (want > 0).then_some(want);
            let seen =
                settles(want, || async { Ok(counters.frequency(today(), &user).await?.get(id).copied()) }).await?;
            assert_eq!(seen, want, "campaign {id} after {served:?}");
        }
    }
    assert_eq!(served, vec![ids[0], ids[0], ids[1], ids[1]], "twice the capped campaign, then the other");
    // Another user still gets it.
    let (_, v) = post(&format!("{base}/v1/ads"), &request(&format!("other-{}", uuid::Uuid::new_v4()), 1)).await?;
    assert_eq!(campaigns_of(&v), vec![ids[0]]);
    Ok(())
}

#[tokio::test]
async fn a_campaign_out_of_budget_is_never_served_and_clicks_charge_once() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let mut small = campaign("acme", "small-budget", 3_000_000, "travel");
    small.daily_budget_micros = 5_000_000;
    let ids = insert(&catalog, &[small, campaign("globex", "big-budget", 1_000_000, "travel")]).await?;
    let base = gateway_on(&s, &schema, |c| c.pacing.enabled = false).await?;
    let counters = s.counters().await?;

    // Served, and a click charges its price, once.
    let (_, v) = post(&format!("{base}/v1/ads"), &request("budget-user", 1)).await?;
    assert_eq!(campaigns_of(&v), vec![ids[0]], "{v}");
    let price = v["winners"][0]["price_cpc_micros"].as_i64().unwrap();
    assert!(price > 0 && price <= 3_000_000, "{v}");
    let click =
        json!({"impression_id": v["winners"][0]["impression_id"], "click_token": v["winners"][0]["click_token"]});
    let (status, c) = post(&format!("{base}/v1/clicks"), &click).await?;
    assert_eq!(status, 202, "{c}");
    let click_id = c["click_id"].as_str().expect("click id").to_string();
    // The same click again is a replay: refused at the door, never logged.
    let (status, c) = post(&format!("{base}/v1/clicks"), &click).await?;
    assert_eq!(status, 409, "{c}");
    assert_eq!(c["error"]["code"], "already_recorded", "{c}");
    // The click reaches the aggregator (its dedup marker) and pays. (Two
    // logged clicks of one impression, as when the replay guard's Redis is
    // down, pay once: aggregates.rs.)
    let prefix = &adserve_features::registry().redis.key_prefix;
    let marker = adserve_features::realtime::click_marker(prefix, &click_id);
    let counted = settles(Some(1), || async {
        let n: i64 = counters.client().exists(marker.clone()).await?;
        Ok(Some(n))
    })
    .await?;
    assert_eq!(counted, Some(1), "the click was counted");
    assert_eq!(counters.spend(today()).await?.get(&ids[0]), Some(&price), "charged once");

    // Spend reaches the budget: within a few pacing rounds the campaign is
    // gone, and then it never comes back today.
    counters.add_spend(today(), ids[0], 5_000_000).await?;
    let mut gone = false;
    for _ in 0..100 {
        let (_, v) = post(&format!("{base}/v1/ads"), &request("budget-user-2", 1)).await?;
        if campaigns_of(&v) == vec![ids[1]] {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the spent campaign was still served");
    for i in 0..20 {
        let (_, v) = post(&format!("{base}/v1/ads"), &request(&format!("after-{i}"), 2)).await?;
        assert_eq!(campaigns_of(&v), vec![ids[1]], "{v}");
    }
    Ok(())
}

#[tokio::test]
async fn a_cpm_campaign_pays_per_impression_when_served() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let cpm = NewCampaign { bid_cpc_micros: 0, bid_cpm_micros: 900_000_000, ..campaign("acme", "cpm", 0, "travel") };
    let ids = insert(&catalog, &[cpm, campaign("globex", "cpc", 100_000, "travel")]).await?;
    let base = gateway_on(&s, &schema, |_| {}).await?;
    let (_, v) = post(&format!("{base}/v1/ads"), &request("cpm-user", 1)).await?;
    assert_eq!(campaigns_of(&v), vec![ids[0]], "{v}");
    let w = &v["winners"][0];
    let price = w["price_cpm_micros"].as_i64().unwrap();
    assert!(price > 0 && price <= 900_000_000 && w["price_cpc_micros"] == 0, "{v}");
    let counters = s.counters().await?;
    let want = Some((price + 500) / 1000);
    let spent = settles(want, || async { Ok(counters.spend(today()).await?.get(&ids[0]).copied()) }).await?;
    assert_eq!(spent, want, "a thousandth of the CPM price per impression, counted from the log");
    let event = s.impression_event(w["impression_id"].as_str().unwrap()).await?;
    assert_eq!((event.price_cpm_micros, event.price_cpc_micros), (price, 0));
    Ok(())
}

#[tokio::test]
async fn blocked_categories_and_advertisers_are_never_served() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let ids = insert(
        &catalog,
        &[
            campaign("acme", "travel", 3_000_000, "travel"),
            campaign("globex", "games", 2_000_000, "games"),
            campaign("initech", "books", 1_000_000, "books"),
        ],
    )
    .await?;
    let base = gateway_on(&s, &schema, |c| c.auction.max_per_advertiser = 0).await?;
    let mut body = request("bcat-user", 3);
    body["blocked_categories"] = json!(["travel"]);
    body["blocked_advertisers"] = json!(["Globex.Example"]);
    let (status, v) = post(&format!("{base}/v1/ads"), &body).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(campaigns_of(&v), vec![ids[2]]);
    body["blocked_categories"] = json!(["travel", "games", "books"]);
    let (_, v) = post(&format!("{base}/v1/ads"), &body).await?;
    assert_eq!(v["no_fill_reason"], "no_eligible_ads", "{v}");
    body["blocked_categories"] = json!([""]);
    let (status, v) = post(&format!("{base}/v1/ads"), &body).await?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("blocked_categories"), "{v}");
    Ok(())
}

#[tokio::test]
async fn one_advertiser_takes_at_most_its_share_of_slots() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let ids = insert(
        &catalog,
        &[
            campaign("acme", "a1", 5_000_000, "travel"),
            campaign("acme", "a2", 4_000_000, "travel"),
            campaign("acme", "a3", 3_000_000, "travel"),
            campaign("globex", "g1", 1_000_000, "travel"),
        ],
    )
    .await?;
    let base = gateway_on(&s, &schema, |c| c.auction.max_per_advertiser = 2).await?;
    let (_, v) = post(&format!("{base}/v1/ads"), &request("diverse-user", 3)).await?;
    assert_eq!(campaigns_of(&v), vec![ids[0], ids[1], ids[3]], "{v}");
    Ok(())
}

#[tokio::test]
async fn explored_slots_log_their_propensity_in_the_impression() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let campaigns: Vec<NewCampaign> =
        (0..5).map(|i| campaign(&format!("adv{i}"), &format!("c{i}"), 1_000_000 + i * 100_000, "travel")).collect();
    insert(&catalog, &campaigns).await?;
    let base = gateway_on(&s, &schema, |c| c.auction.exploration_share = 0.5).await?;
    let mut ids = Vec::new();
    for i in 0..30 {
        let (status, v) = post(&format!("{base}/v1/ads"), &request(&format!("explore-{i}"), 1)).await?;
        assert_eq!(status, 200, "{v}");
        ids.push(v["winners"][0]["impression_id"].as_str().unwrap().to_string());
    }
    let keys: Vec<&str> = ids.iter().map(String::as_str).collect();
    let events = s.impression_events(&keys).await?;
    let (mut explored, mut exploited) = (0, 0);
    for event in events.values() {
        if event.explored {
            explored += 1;
            // Uniform over the 5 candidates with probability 0.5.
            assert!((event.propensity - 0.1).abs() < 1e-6, "{event:?}");
        } else {
            exploited += 1;
            assert!((event.propensity - 0.6).abs() < 1e-6, "greedy: 0.5 + 0.5 / 5, got {}", event.propensity);
        }
    }
    assert!(explored > 0 && exploited > 0, "explored {explored}, exploited {exploited}");
    Ok(())
}

/// Thaws a process when dropped, so a failing test never leaves it frozen.
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> anyhow::Result<Self> {
        // SAFETY: plain signal syscalls.
        anyhow::ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP {pid}");
        Ok(Self(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: plain signal syscall.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn redis_degradations(v: &Value) -> Vec<String> {
    v["degraded"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter(|d| d["component"] == "redis")
                .map(|d| d["reason"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Requests with fresh users until one answers without a Redis degradation
/// (stale pacing rates aside); false after ~10 s.
async fn until_counters_answer(ads: &str) -> anyhow::Result<bool> {
    for _ in 0..100 {
        let (_, v) = post(ads, &request(&format!("probe-{}", uuid::Uuid::new_v4()), 1)).await?;
        if redis_degradations(&v).iter().all(|r| r.starts_with("budget pacing")) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

#[tokio::test]
async fn redis_down_at_start_then_frozen_costs_its_deadline_and_caps_resume_when_it_thaws() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (schema, catalog) = s.fresh_catalog().await?;
    let mut capped = campaign("acme", "capped", 3_000_000, "travel");
    capped.frequency_cap_per_day = Some(1);
    let ids = insert(&catalog, &[capped, campaign("globex", "open", 1_000_000, "travel")]).await?;
    // A Redis of this test's own (freezing it stops nothing else), not
    // started yet: the gateway starts without it.
    let port = adserve_integration_tests::free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let base = gateway_on(&s, &schema, |c| {
        c.counters.url = url.clone();
        c.counters.timeout = Duration::from_millis(100);
        c.pacing.max_staleness = Duration::from_secs(1);
    })
    .await?;
    let ads = format!("{base}/v1/ads");
    let (status, v) = post(&ads, &request("down-a", 1)).await?;
    assert_eq!(status, 200, "{v}");
    assert!(redis_degradations(&v).iter().any(|r| r.starts_with("frequency caps not applied")), "{v}");

    // Redis comes up: the gateway's client connects by itself (it used to
    // give up for good when its first connection failed).
    let mut redis = tokio::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = redis.id().expect("running") as i32;
    assert!(until_counters_answer(&ads).await?, "the gateway never connected to the Redis that came up after it");
    let counters = adserve_counters::Counters::connect(&adserve_counters::RedisConfig {
        url: url.clone(),
        timeout: Duration::from_secs(2),
    })
    .await?;
    let (_, v) = post(&ads, &request("up-a", 1)).await?;
    assert_eq!((campaigns_of(&v), redis_degradations(&v).len()), (vec![ids[0]], 0), "{v}");

    // Frozen: a hung peer, not a dead one. Every answer still comes (the
    // counters' deadline is 100 ms per call; post gives up after 20 s), says
    // what degraded, and serves without caps.
    let frozen = Frozen::freeze(pid)?;
    for i in 0..3 {
        let (status, v) = post(&ads, &request(&format!("frozen-{i}"), 1)).await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(campaigns_of(&v), vec![ids[0]], "{v}");
        let reasons = redis_degradations(&v);
        assert!(reasons.iter().any(|r| r.starts_with("frequency caps not applied")), "{v}");
    }
    drop(frozen);

    // Thawed: caps come back without a restart. This Redis is the test's
    // own (the stack's aggregator counts into the stack's), so the test
    // writes the count the aggregator would.
    assert!(until_counters_answer(&ads).await?, "the gateway did not recover its counters after the thaw");
    let user = format!("after-thaw-{}", uuid::Uuid::new_v4());
    let (_, first) = post(&ads, &request(&user, 1)).await?;
    assert_eq!(campaigns_of(&first), vec![ids[0]], "{first}");
    let key = adserve_counters::keys::frequency(today(), &user);
    let _: i64 = counters.client().hincrby(&key, ids[0].to_string(), 1).await?;
    let (_, second) = post(&ads, &request(&user, 1)).await?;
    assert_eq!(campaigns_of(&second), vec![ids[1]], "the cap holds again: {second}");
    redis.kill().await?;
    Ok(())
}
