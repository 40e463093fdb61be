//! The gateway's in-memory catalog index against real PostgreSQL: a campaign
//! added while the gateway runs is served within moments (LISTEN/NOTIFY, not
//! the periodic poll), and while the catalog cannot be read the gateway
//! keeps serving its last good index, saying so once it is older than
//! `catalog_index.max_staleness`, and recovers when the catalog is back.

use std::time::Duration;

use adserve_catalog::{NewAd, NewCampaign};
use adserve_integration_tests::Stack;
use serde_json::{Value, json};

async fn ads(base: &str) -> anyhow::Result<Value> {
    let body = json!({"user_id": format!("idx-{}", uuid::Uuid::new_v4()), "context": {"placement": "feed_top", "device": "mobile"}, "slots": 1});
    let resp = adserve_integration_tests::http_client().post(format!("{base}/v1/ads")).json(&body).send().await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    Ok(resp.json().await?)
}

fn campaign(name: &str, bid: i64) -> NewCampaign {
    NewCampaign {
        advertiser: format!("idx-{name}"),
        advertiser_domain: format!("idx-{name}.example"),
        name: name.into(),
        bid_cpc_micros: bid,
        daily_budget_micros: 1_000_000_000_000,
        ads: vec![NewAd {
            title: format!("{name} ad"),
            landing_url: format!("https://idx-{name}.example/"),
            category: "travel".into(),
            ..NewAd::default()
        }],
        ..NewCampaign::default()
    }
}

/// Asks until `done` holds of the answer (at most 15 s); the last answer.
async fn until(base: &str, what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    for _ in 0..150 {
        last = ads(base).await?;
        if done(&last) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{what}: not within 15 s; last answer {last}")
}

fn title(v: &Value) -> &str {
    v["winners"][0]["title"].as_str().unwrap_or_default()
}

fn catalog_degraded(v: &Value) -> bool {
    v["degraded"].as_array().is_some_and(|d| d.iter().any(|d| d["component"] == "catalog"))
}

/// A gateway of its own on a fresh catalog holding `first`, with the
/// index's poll interval and staleness limit.
async fn gateway(
    s: &Stack,
    first: NewCampaign,
    refresh: Duration,
    max_staleness: Duration,
) -> anyhow::Result<(adserve_catalog::Catalog, String)> {
    let (schema, catalog) = s.fresh_catalog().await?;
    catalog.insert_campaign(&first).await?;
    let base = s
        .in_process_gateway(|c| {
            c.postgres.schema = schema.clone();
            c.catalog_index.refresh = refresh;
            c.catalog_index.max_staleness = max_staleness;
        })
        .await?;
    Ok((catalog, base))
}

#[tokio::test]
async fn changes_are_served_within_moments_and_a_dead_catalog_serves_its_last_index() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    // A minute between polls: only a notification explains a quick change.
    let minute = Duration::from_secs(60);
    let (catalog, base) = gateway(&s, campaign("first", 1_000_000), minute, minute).await?;
    assert_eq!(title(&ads(&base).await?), "first ad");

    // A better campaign while the gateway runs.
    catalog.insert_campaign(&campaign("second", 9_000_000)).await?;
    until(&base, "the new campaign", |v| title(v) == "second ad").await?;
    Ok(())
}

#[tokio::test]
async fn a_catalog_that_cannot_be_read_serves_its_last_index_and_says_so_when_stale() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (refresh, stale_after) = (Duration::from_millis(200), Duration::from_millis(1500));
    let (catalog, base) = gateway(&s, campaign("kept", 1_000_000), refresh, stale_after).await?;
    let v = ads(&base).await?;
    assert_eq!(title(&v), "kept ad");
    assert!(!catalog_degraded(&v), "{v}");

    // The catalog cannot be read (its ads table is gone): the gateway keeps
    // serving from memory, and says so once the index is older than 1.5 s.
    sqlx::query("ALTER TABLE ads RENAME TO ads_away").execute(catalog.pool()).await?;
    let stale = until(&base, "a stale-catalog degradation", catalog_degraded).await;
    sqlx::query("ALTER TABLE ads_away RENAME TO ads").execute(catalog.pool()).await?;
    let stale = stale?;
    assert_eq!(title(&stale), "kept ad", "still served from the last good index: {stale}");

    // Readable again: the next rebuild (a poll, 200 ms) ends the degradation.
    let fresh = until(&base, "recovery", |v| !catalog_degraded(v)).await?;
    assert_eq!(title(&fresh), "kept ad");
    Ok(())
}
