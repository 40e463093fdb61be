//! The streaming aggregates against the real broker and Redis: events on the
//! impressions and clicks topics become the users' and ads' real-time
//! features within seconds, exactly once, with event-time windows that move
//! as time passes; malformed messages are dead-lettered and the consumer
//! goes on; a killed or frozen aggregator loses and duplicates nothing.

use std::{process::Stdio, time::Duration};

use adserve_events::{EventPublisher, IMPRESSIONS_TOPIC, KafkaConfig};
use adserve_feature_service::{Aggregator, aggregates::Applied, aggregates::Attribution, config::AggregatesConfig};
use adserve_features::{Entity, realtime};
use adserve_integration_tests::{Stack, bench::prom, binary, free_port};
use adserve_proto::v1::{
    ClickEvent, FeatureRow, GetFeaturesRequest, ImpressionEvent, RequestContext,
    feature_service_client::FeatureServiceClient,
};
use anyhow::Context as _;
use fred::prelude::*;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn run_id() -> i64 {
    (uuid::Uuid::new_v4().as_u128() as i64 & 0x3fff_ffff) + 1
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64
}

fn impression(id: &str, user: &str, ad_id: i64, served_at_s: i64) -> ImpressionEvent {
    ImpressionEvent {
        impression_id: id.into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        user_id: user.into(),
        ad_id,
        campaign_id: 1,
        served_at: Some(prost_types::Timestamp { seconds: served_at_s, nanos: 0 }),
        features: Some(FeatureRow::default()),
        ..Default::default()
    }
}

fn click(impression_id: &str, at_s: i64) -> ClickEvent {
    ClickEvent {
        click_id: uuid::Uuid::new_v4().to_string(),
        impression_id: impression_id.into(),
        clicked_at: Some(prost_types::Timestamp { seconds: at_s, nanos: 0 }),
        ..Default::default()
    }
}

async fn redis(url: &str) -> anyhow::Result<Client> {
    let client = Client::new(Config::from_url(url)?, None, None, None);
    client.init().await?;
    Ok(client)
}

/// The packed counters of an entity, by name (empty when it has none).
async fn counters(
    redis: &Client,
    prefix: &str,
    entity: Entity,
    id: &str,
) -> anyhow::Result<std::collections::HashMap<String, f32>> {
    let value: Option<Vec<u8>> = redis.get(realtime::value_key(prefix, entity, id)).await?;
    let Some(bytes) = value else { return Ok(Default::default()) };
    let packed = realtime::Packed::decode(&bytes).context("not the packed layout")?;
    Ok(realtime::attributes().into_iter().zip(packed.values).collect())
}

/// What a test through the real broker and Redis starts from: the stack, a
/// publisher to its broker, a client of its Redis (logical database `db`, or
/// the stack's own) and the registry's key prefix.
async fn through_the_stack(db: Option<u32>) -> anyhow::Result<(Stack, EventPublisher, Client, String)> {
    let s = Stack::ready().await?;
    let kafka = KafkaConfig { brokers: s.kafka.clone(), ..KafkaConfig::default() };
    let events = EventPublisher::new(&kafka, "test")?;
    let client = redis(&db.map_or_else(|| s.redis.clone(), |db| s.redis_db(db))).await?;
    Ok((s, events, client, adserve_features::registry().redis.key_prefix.clone()))
}

async fn wait_for(
    what: &str,
    patience: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = tokio::time::Instant::now();
    loop {
        if check().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > patience {
            anyhow::bail!("{what}: not within {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn windows_move_with_event_time_and_redeliveries_count_once() -> anyhow::Result<()> {
    // The aggregator's script driven with a clock of the test's own, against
    // the real Redis, under a key prefix of its own (the stack's aggregator
    // never refreshes these entities).
    let s = Stack::ready().await?;
    let client = redis(&s.redis).await?;
    let prefix = format!("test-agg-{}", run_id());
    let agg = Aggregator::new(client.clone(), &prefix, &AggregatesConfig::default());
    let t0 = 1_800_000_010; // 10 s into a minute (1_800_000_000 is an hour boundary)
    let (user, ad) = ("u1".to_string(), 42);

    let imp = impression("imp-1", &user, ad, t0);
    assert_eq!(agg.impression(&imp, t0).await?, Applied::Counted);
    assert_eq!(agg.impression(&imp, t0 + 1).await?, Applied::Duplicate, "a redelivery changes nothing");
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!((u["impressions_5m"], u["impressions_1h"], u["impressions_24h"]), (1.0, 1.0, 1.0));
    let a = counters(&client, &prefix, Entity::Ad, "42").await?;
    assert_eq!(a["impressions_1h"], 1.0);

    // The click is attributed through the impression's marker.
    let to = agg.attributions(&["imp-1", "never-shown"]).await?;
    let shown = Attribution {
        user_id: user.clone(),
        ad_id: ad,
        campaign_id: 1,
        price_cpc_micros: 0,
        served_ms: t0 * 1000,
        on_notice: false,
        per_impression: true,
        layout: 3,
    };
    assert_eq!(to, vec![Some(shown), None]);
    let c = click("imp-1", t0 + 5);
    let to = to[0].as_ref().expect("attributed");
    assert_eq!(agg.click(&c, to, t0 + 5).await?, (Applied::Counted, false), "a CPM impression's click pays nothing");
    assert_eq!(agg.click(&c, to, t0 + 6).await?, (Applied::Duplicate, false));
    let a = counters(&client, &prefix, Entity::Ad, "42").await?;
    assert_eq!((a["clicks_5m"], a["clicks_1h"], a["clicks_24h"]), (1.0, 1.0, 1.0));
    let smoothed = (1.0 + realtime::PRIOR_CTR * realtime::PRIOR_WEIGHT) / (1.0 + realtime::PRIOR_WEIGHT);
    assert!((f64::from(a[realtime::SMOOTHED_CTR]) - smoothed).abs() < 1e-5, "{a:?}");

    // Six minutes on, with no new event: the refresh takes the impression and
    // click out of the 5-minute window only.
    assert_eq!(agg.refresh_due(t0 + 360, 100).await?, 2, "the user and the ad were due");
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!((u["impressions_5m"], u["impressions_1h"], u["clicks_5m"], u["clicks_1h"]), (0.0, 1.0, 0.0, 1.0));
    assert_eq!(agg.refresh_due(t0 + 361, 100).await?, 0, "nothing is due again before the hour is up");

    // Two hours on: only the day still holds them.
    agg.refresh_due(t0 + 7200, 100).await?;
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!((u["impressions_1h"], u["impressions_24h"], u["clicks_24h"]), (0.0, 1.0, 1.0));

    // An event read late (two hours behind the clock) counts in the day only;
    // one older than a day counts nowhere.
    let late = impression("imp-late", &user, ad, t0);
    assert_eq!(agg.impression(&late, t0 + 7200).await?, Applied::Counted);
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!((u["impressions_1h"], u["impressions_24h"]), (0.0, 2.0));
    let expired = impression("imp-old", &user, ad, t0 + 7200 - 90_000);
    assert_eq!(agg.impression(&expired, t0 + 7200).await?, Applied::Expired);

    // A day later everything is gone: value, buckets and schedule entry.
    agg.refresh_due(t0 + 7200 + 86_400, 100).await?;
    assert!(counters(&client, &prefix, Entity::User, &user).await?.is_empty());
    let buckets: i64 = client.exists(realtime::buckets_key(&prefix, Entity::User, &user)).await?;
    assert_eq!(buckets, 0);
    let scheduled: i64 = client.zcard(realtime::refresh_key(&prefix)).await?;
    assert_eq!(scheduled, 0);

    // COPPA impressions count for the ad only.
    let mut coppa = impression("imp-coppa", "child", ad, t0);
    coppa.coppa = true;
    assert_eq!(agg.impression(&coppa, t0).await?, Applied::Counted);
    assert!(counters(&client, &prefix, Entity::User, "child").await?.is_empty());
    let anonymous = Attribution {
        user_id: String::new(),
        ad_id: ad,
        campaign_id: 1,
        price_cpc_micros: 0,
        served_ms: t0 * 1000,
        on_notice: false,
        per_impression: true,
        layout: 3,
    };
    assert_eq!(agg.attributions(&["imp-coppa"]).await?, vec![Some(anonymous)]);
    Ok(())
}

#[tokio::test]
async fn impressions_and_first_clicks_are_what_frequency_and_spend_count() -> anyhow::Result<()> {
    // The script driven with the test's own clock against the real Redis.
    // Spend and frequency keys are the gateway's (no registry prefix): the
    // campaigns and the user are this run's own, on a day no traffic uses.
    let s = Stack::ready().await?;
    let client = redis(&s.redis).await?;
    let run = run_id();
    let prefix = format!("test-agg-{run}");
    let agg = Aggregator::new(client.clone(), &prefix, &AggregatesConfig::default());
    let counters = adserve_counters::Counters::new(client.clone());
    let t0 = 1_800_000_010;
    let day = adserve_counters::day_of(t0 as u64);
    let user = format!("spender-{run}");
    let (cpm, cpc) = (run * 10, run * 10 + 1);
    let window = adserve_features::registry().label.window().as_secs() as i64;

    // A CPM impression: the user's count and a thousandth of the price, once.
    let mut shown = impression(&format!("{run}-cpm"), &user, 42, t0);
    (shown.campaign_id, shown.price_cpm_micros) = (cpm, 2_000_400);
    assert_eq!(agg.impression(&shown, t0).await?, Applied::Counted);
    assert_eq!(agg.impression(&shown, t0 + 1).await?, Applied::Duplicate);
    assert_eq!(counters.spend(day).await?.get(&cpm), Some(&2_000));
    assert_eq!(counters.frequency(day, &user).await?.get(&cpm), Some(&1));

    // CPC impressions count for frequency now and pay on their first click
    // within the label window only.
    let cpc_imp = |n: &str| {
        let mut e = impression(&format!("{run}-{n}"), &user, 43, t0);
        (e.campaign_id, e.price_cpc_micros) = (cpc, 150_000);
        e
    };
    let (first, late, racing) = (cpc_imp("first"), cpc_imp("late"), cpc_imp("racing"));
    for e in [&first, &late, &racing] {
        assert_eq!(agg.impression(e, t0).await?, Applied::Counted);
    }
    assert_eq!(counters.frequency(day, &user).await?.get(&cpc), Some(&3));
    assert_eq!(counters.spend(day).await?.get(&cpc), None, "nothing before a click");

    let attributed = |id: String| {
        let agg = agg.clone();
        async move { anyhow::Ok(agg.attributions(&[id.as_str()]).await?.remove(0).context("attributed")?) }
    };
    let c = click(&first.impression_id, t0 + 5);
    let to = attributed(first.impression_id.clone()).await?;
    assert_eq!(agg.click(&c, &to, t0 + 5).await?, (Applied::Counted, true));
    assert_eq!(agg.click(&c, &to, t0 + 6).await?, (Applied::Duplicate, false), "a redelivered click");
    let again = click(&first.impression_id, t0 + 7);
    let to = attributed(first.impression_id.clone()).await?;
    assert_eq!(to.price_cpc_micros, 0, "the marker says it was charged");
    assert_eq!(agg.click(&again, &to, t0 + 7).await?, (Applied::Counted, false), "a second click counts, pays nothing");
    assert_eq!(counters.spend(day).await?.get(&cpc), Some(&150_000));

    // After the label window: a click, not a paid one (the joiner labels it 0).
    let to = attributed(late.impression_id.clone()).await?;
    let after = t0 + window + 1;
    assert_eq!(agg.click(&click(&late.impression_id, after), &to, after).await?, (Applied::Counted, false));

    // Two clicks on one impression applied concurrently, both read its price:
    // the guard lets one pay.
    let to = attributed(racing.impression_id.clone()).await?;
    let (c1, c2) = (click(&racing.impression_id, t0 + 9), click(&racing.impression_id, t0 + 9));
    let (r1, r2) = tokio::join!(agg.click(&c1, &to, t0 + 9), agg.click(&c2, &to, t0 + 9));
    let paid = [r1?, r2?].iter().filter(|(a, charged)| *a == Applied::Counted && *charged).count();
    assert_eq!(paid, 1);
    assert_eq!(counters.spend(day).await?.get(&cpc), Some(&300_000));

    // A COPPA impression: no user count, its CPM spend still counts.
    let mut child = impression(&format!("{run}-coppa"), &format!("child-{run}"), 44, t0);
    (child.coppa, child.campaign_id, child.price_cpm_micros) = (true, cpm, 1_000_000);
    assert_eq!(agg.impression(&child, t0).await?, Applied::Counted);
    assert_eq!(counters.spend(day).await?.get(&cpm), Some(&3_000));
    assert!(counters.frequency(day, &format!("child-{run}")).await?.is_empty());

    // A click charges the day it happened on, an impression the day it was served.
    let mut midnight = impression(&format!("{run}-midnight"), &user, 45, (day as i64 + 1) * 86_400 - 1);
    (midnight.campaign_id, midnight.price_cpc_micros) = (cpc, 70_000);
    assert_eq!(agg.impression(&midnight, t0).await?, Applied::Counted);
    assert_eq!(counters.frequency(day, &user).await?.get(&cpc), Some(&4));
    let to = attributed(midnight.impression_id.clone()).await?;
    let next_day = (day as i64 + 1) * 86_400 + 5;
    assert_eq!(agg.click(&click(&midnight.impression_id, next_day), &to, next_day).await?, (Applied::Counted, true));
    assert_eq!(counters.spend(day + 1).await?.get(&cpc), Some(&70_000));
    assert_eq!(counters.spend(day).await?.get(&cpc), Some(&300_000));

    for key in [adserve_counters::keys::spend(day), adserve_counters::keys::spend(day + 1)] {
        let _: i64 = client.hdel(&key, vec![cpm.to_string(), cpc.to_string()]).await?;
    }
    let _: i64 = client.del(adserve_counters::keys::frequency(day, &user)).await?;
    Ok(())
}

#[tokio::test]
async fn a_bid_billed_on_notice_counts_on_its_notice_or_first_click_and_charges_on_its_notice() -> anyhow::Result<()> {
    // The script with the test's own clock against the real Redis: a bid
    // (OpenRTB, billed on notice) counts nothing until the exchange's billing
    // notice, which counts it once and charges the clearing price, or a click
    // inside the label window, which counts it (the notice still charges).
    let s = Stack::ready().await?;
    let client = redis(&s.redis).await?;
    let run = run_id();
    let prefix = format!("test-bill-{run}");
    let agg = Aggregator::new(client.clone(), &prefix, &AggregatesConfig::default());
    let counters_of = adserve_counters::Counters::new(client.clone());
    let t0 = 1_800_000_010;
    let day = adserve_counters::day_of(t0 as u64);
    let user = format!("bidder-{run}");
    let (cpm, cpc) = (run * 10, run * 10 + 1);
    let ad = 9_000 + run;
    let attributed = |id: String| {
        let agg = agg.clone();
        async move { anyhow::Ok(agg.attributions(&[id.as_str()]).await?.remove(0).context("attributed")?) }
    };
    let notice = |id: &str, at_s: i64, price: i64| ClickEvent {
        billing_notice: true,
        price_cpm_micros: price,
        ..click(id, at_s)
    };

    let mut won = impression(&format!("{run}-won"), &user, ad, t0);
    (won.campaign_id, won.price_cpm_micros, won.billed_on_notice) = (cpm, 3_000_000, true);
    let mut lost = impression(&format!("{run}-lost"), &user, ad, t0);
    (lost.campaign_id, lost.price_cpm_micros, lost.billed_on_notice) = (cpm, 3_000_000, true);
    for e in [&won, &lost] {
        assert_eq!(agg.impression(e, t0).await?, Applied::Awaiting);
    }
    assert_eq!(agg.impression(&won, t0).await?, Applied::Duplicate);
    assert!(counters_of.frequency(day, &user).await?.is_empty(), "a bid is not a shown impression");
    assert_eq!(counters_of.spend(day).await?.get(&cpm), None, "nor a charge");
    assert!(counters(&client, &prefix, Entity::Ad, &ad.to_string()).await?.is_empty());

    // The notice: counted at the clearing price (2.5 per mille, a thousandth of it charged).
    let to = attributed(won.impression_id.clone()).await?;
    assert!(to.on_notice && to.per_impression);
    assert_eq!(
        agg.outcome(&notice(&won.impression_id, t0 + 1, 2_500_000), &to, t0 + 1).await?,
        (Applied::Counted, false)
    );
    // The exchange sends it again (the gateway logs it with a new id): counted once.
    assert_eq!(agg.outcome(&notice(&won.impression_id, t0 + 2, 2_500_000), &to, t0 + 2).await?.0, Applied::Duplicate);
    assert_eq!(counters_of.spend(day).await?.get(&cpm), Some(&2_500));
    assert_eq!(counters_of.frequency(day, &user).await?.get(&cpm), Some(&1), "the lost bid is never counted");
    let ad_counts = counters(&client, &prefix, Entity::Ad, &ad.to_string()).await?;
    assert_eq!(ad_counts.get("impressions_5m"), Some(&1.0), "{ad_counts:?}");

    // A CPC bid: its notice counts it, its click pays.
    let mut cpc_bid = impression(&format!("{run}-cpc"), &user, ad, t0);
    (cpc_bid.campaign_id, cpc_bid.price_cpc_micros, cpc_bid.billed_on_notice) = (cpc, 200_000, true);
    assert_eq!(agg.impression(&cpc_bid, t0).await?, Applied::Awaiting);
    let to = attributed(cpc_bid.impression_id.clone()).await?;
    assert!(!to.per_impression);
    assert_eq!(agg.outcome(&notice(&cpc_bid.impression_id, t0 + 1, 900_000), &to, t0 + 1).await?.0, Applied::Counted);
    assert_eq!(counters_of.spend(day).await?.get(&cpc), None, "a CPC bid pays per click, not per notice");
    assert_eq!(counters_of.frequency(day, &user).await?.get(&cpc), Some(&1));
    let to = attributed(cpc_bid.impression_id.clone()).await?;
    assert_eq!(agg.outcome(&click(&cpc_bid.impression_id, t0 + 3), &to, t0 + 3).await?, (Applied::Counted, true));
    assert_eq!(counters_of.spend(day).await?.get(&cpc), Some(&200_000));

    // A notice for an impression billed when served changes nothing.
    let mut native = impression(&format!("{run}-native"), &user, ad, t0);
    (native.campaign_id, native.price_cpm_micros) = (cpm, 1_000_000);
    assert_eq!(agg.impression(&native, t0).await?, Applied::Counted);
    let to = attributed(native.impression_id.clone()).await?;
    assert_eq!(
        agg.outcome(&notice(&native.impression_id, t0 + 1, 1_000_000), &to, t0 + 1).await?.0,
        Applied::NotExpected
    );
    assert_eq!(counters_of.spend(day).await?.get(&cpm), Some(&3_500));
    assert_eq!(counters_of.frequency(day, &user).await?.get(&cpm), Some(&2));

    // A CPM bid clicked before its notice: the click proves it was shown
    // (the label-joiner writes its row on the click), so it counts the
    // impression; the notice then only charges its clearing price, once.
    let ad_impressions = async || -> anyhow::Result<f32> {
        Ok(counters(&client, &prefix, Entity::Ad, &ad.to_string()).await?["impressions_5m"])
    };
    assert_eq!(ad_impressions().await?, 3.0);
    let mut early = impression(&format!("{run}-early"), &user, ad, t0);
    (early.campaign_id, early.price_cpm_micros, early.billed_on_notice) = (cpm, 3_000_000, true);
    assert_eq!(agg.impression(&early, t0).await?, Applied::Awaiting);
    let to = attributed(early.impression_id.clone()).await?;
    assert_eq!(agg.outcome(&click(&early.impression_id, t0 + 2), &to, t0 + 2).await?, (Applied::Counted, false));
    assert_eq!(counters_of.frequency(day, &user).await?.get(&cpm), Some(&3), "counted on its click");
    assert_eq!(ad_impressions().await?, 4.0);
    assert_eq!(counters_of.spend(day).await?.get(&cpm), Some(&3_500), "not charged before its notice");
    assert_eq!(agg.outcome(&notice(&early.impression_id, t0 + 3, 2_000_000), &to, t0 + 3).await?.0, Applied::Counted);
    assert_eq!(agg.outcome(&notice(&early.impression_id, t0 + 4, 2_000_000), &to, t0 + 4).await?.0, Applied::Duplicate);
    assert_eq!(counters_of.spend(day).await?.get(&cpm), Some(&5_500), "charged once, by the notice");
    assert_eq!(counters_of.frequency(day, &user).await?.get(&cpm), Some(&3), "the notice counted nothing more");
    // A second click counts as a click, not as another impression.
    assert_eq!(agg.outcome(&click(&early.impression_id, t0 + 5), &to, t0 + 5).await?.0, Applied::Counted);
    assert_eq!(ad_impressions().await?, 4.0);
    // A click after the label window is no proof (the joiner does not take it): no impression.
    let mut stray = impression(&format!("{run}-stray"), &user, ad, t0);
    (stray.campaign_id, stray.price_cpm_micros, stray.billed_on_notice) = (cpm, 3_000_000, true);
    assert_eq!(agg.impression(&stray, t0).await?, Applied::Awaiting);
    let to = attributed(stray.impression_id.clone()).await?;
    let window = adserve_features::registry().label.window().as_secs() as i64;
    let after = t0 + window + 1;
    assert_eq!(agg.outcome(&click(&stray.impression_id, after), &to, after).await?.0, Applied::Counted);
    assert_eq!(counters_of.frequency(day, &user).await?.get(&cpm), Some(&3));

    let _: i64 = client.hdel(adserve_counters::keys::spend(day), vec![cpm.to_string(), cpc.to_string()]).await?;
    let _: i64 = client.del(adserve_counters::keys::frequency(day, &user)).await?;
    Ok(())
}

#[tokio::test]
async fn a_click_changes_the_users_features_within_seconds() -> anyhow::Result<()> {
    // Through the stack: the gateway's topics, the feature-service's own
    // aggregator (mode = both), and GetFeatures.
    let (s, events, client, prefix) = through_the_stack(None).await?;
    let run = run_id();
    let (user, ad) = (format!("agg-user-{run}"), 8_000_000_000 + run);
    let imp_id = uuid::Uuid::new_v4().to_string();
    events.impression(&impression(&imp_id, &user, ad, now_s())).await?;

    let mut features = FeatureServiceClient::connect(s.features.clone()).await?;
    let registry = adserve_features::registry();
    let col = |name: &str| registry.index_of(name).expect(name);
    let request = GetFeaturesRequest {
        user_id: user.clone(),
        ad_ids: vec![ad],
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
    };
    let took = wait_for("the impression in GetFeatures", Duration::from_secs(20), async || {
        let m = features.get_features(request.clone()).await?.into_inner().matrix.expect("matrix");
        let row = &m.values[..m.feature_names.len()];
        Ok(row[col("user_impressions_1h")] == 1.0 && row[col("ad_impressions_1h")] == 1.0)
    })
    .await?;
    eprintln!("impression visible in GetFeatures after {took:?}");

    events.click(&click(&imp_id, now_s())).await?;
    let took = wait_for("the click in the user's counters", Duration::from_secs(20), async || {
        let u = counters(&client, &prefix, Entity::User, &user).await?;
        Ok(u.get("clicks_5m") == Some(&1.0))
    })
    .await?;
    eprintln!("click visible in the user's real-time features after {took:?}");

    // The same impression published again (a producer retry) and a garbage
    // message: the first changes nothing, the second is dead-lettered, and the
    // consumer goes on to count the next impression.
    let metrics_url = format!(
        "http://{}/metrics",
        s.metrics.iter().find(|(n, _)| n == "feature-service").expect("feature-service metrics").1
    );
    let scrape = async || prom::scrape(&metrics_url).await;
    let dead_before = prom::counter(&scrape().await?, "adserve_feature_aggregates_events_total", &["dead_lettered"]);
    events.impression(&impression(&imp_id, &user, ad, now_s())).await?;
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &s.kafka).create()?;
    producer
        .send(
            FutureRecord::to(IMPRESSIONS_TOPIC).key("agg-garbage").payload(&b"\xff\xfenot protobuf"[..]),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?;
    events.impression(&impression(&uuid::Uuid::new_v4().to_string(), &user, ad, now_s())).await?;
    wait_for("the next impression after the garbage", Duration::from_secs(20), async || {
        let u = counters(&client, &prefix, Entity::User, &user).await?;
        Ok(u.get("impressions_1h") == Some(&2.0))
    })
    .await?;
    let dead_after = prom::counter(&scrape().await?, "adserve_feature_aggregates_events_total", &["dead_lettered"]);
    assert!(dead_after > dead_before, "the garbage was dead-lettered ({dead_before} -> {dead_after})");
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!(u["impressions_1h"], 2.0, "the redelivered impression counted once: {u:?}");
    Ok(())
}

#[tokio::test]
async fn every_ad_of_a_multi_slot_answer_counts_once_and_a_click_on_any_of_them_is_attributed() -> anyhow::Result<()> {
    // Through the stack's aggregator: the answer is one message (an
    // ImpressionBatch) on the impressions topic, published twice (a producer
    // retry of the whole answer).
    let (_stack, events, client, prefix) = through_the_stack(None).await?;
    let run = run_id();
    let user = format!("agg-answer-{run}");
    let ads: Vec<i64> = (0..3).map(|i| 8_100_000_000 + run * 4 + i).collect();
    let ids = adserve_events::answer_impression_ids(3);
    let answer: Vec<ImpressionEvent> =
        ids.iter().zip(&ads).map(|(id, ad)| impression(id, &user, *ad, now_s())).collect();
    events.impressions(&answer).await?;
    events.impressions(&answer).await?;
    events.click(&click(&ids[1], now_s())).await?;
    wait_for("the answer's impressions and the click", Duration::from_secs(20), async || {
        let u = counters(&client, &prefix, Entity::User, &user).await?;
        let clicked = counters(&client, &prefix, Entity::Ad, &ads[1].to_string()).await?;
        Ok(u.get("impressions_1h") == Some(&3.0) && clicked.get("clicks_1h") == Some(&1.0))
    })
    .await?;
    for ad in &ads {
        let a = counters(&client, &prefix, Entity::Ad, &ad.to_string()).await?;
        assert_eq!(a["impressions_1h"], 1.0, "ad {ad}: {a:?}");
    }
    // One more impression, read after the retried answer (one partition):
    // the retry counted nothing.
    events.impression(&impression(&uuid::Uuid::now_v7().to_string(), &user, ads[0], now_s())).await?;
    wait_for("the impression after the retried answer", Duration::from_secs(20), async || {
        let u = counters(&client, &prefix, Entity::User, &user).await?;
        Ok(u.get("impressions_1h") == Some(&4.0))
    })
    .await?;
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!((u["impressions_1h"], u["clicks_1h"]), (4.0, 1.0), "{u:?}");
    Ok(())
}

/// A feature-service of its own that only aggregates, into a Redis database
/// of its own (so the stack's aggregator's counts do not mix in), in a
/// consumer group of its own.
fn aggregator_process(s: &Stack, db: u32, group: &str) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(binary("adserve-feature-service"))
        .env("ADSERVE_MODE", "aggregate")
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_REDIS__URL", s.redis_db(db))
        .env("ADSERVE_AGGREGATES__KAFKA__BROKERS", &s.kafka)
        .env("ADSERVE_AGGREGATES__GROUP_ID", group)
        .env("ADSERVE_AGGREGATES__COMMIT_INTERVAL", "200ms")
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

fn signal(child: &tokio::process::Child, sig: &str) -> anyhow::Result<()> {
    let pid = child.id().expect("running");
    anyhow::ensure!(std::process::Command::new("kill").args([sig, &pid.to_string()]).status()?.success());
    Ok(())
}

#[tokio::test]
async fn a_killed_or_frozen_aggregator_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let db = 9;
    let (s, events, client, prefix) = through_the_stack(Some(db)).await?;
    let run = run_id();
    let (user, ad) = (format!("agg-kill-{run}"), 8_500_000_000 + run);
    let group = format!("adserve-test-aggregates-{run}");
    let total = 300;

    let mut child = aggregator_process(&s, db, &group)?;
    let publish = {
        let (events, user) = (events.clone(), user.clone());
        tokio::spawn(async move {
            for i in 0..total {
                events.impression(&impression(&format!("{run}-{i}"), &user, ad, now_s())).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        })
    };
    // Kill it mid-stream, then freeze its replacement for longer than the
    // consumer's session timeout, then let it go on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&child, "-KILL")?;
    let _ = child.wait().await;
    let child = aggregator_process(&s, db, &group)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&child, "-STOP")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&child, "-CONT")?;
    publish.await??;
    let took = wait_for("every impression counted", Duration::from_secs(60), async || {
        let u = counters(&client, &prefix, Entity::User, &user).await?;
        Ok(u.get("impressions_1h").copied().unwrap_or(0.0) >= total as f32)
    })
    .await?;
    eprintln!("all {total} counted {took:?} after the last publish");
    // Give a duplicate time to show, then check the exact count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let u = counters(&client, &prefix, Entity::User, &user).await?;
    assert_eq!(u["impressions_1h"], total as f32, "exactly once after SIGKILL and SIGSTOP: {u:?}");
    let a = counters(&client, &prefix, Entity::Ad, &ad.to_string()).await?;
    assert_eq!(a["impressions_1h"], total as f32, "{a:?}");
    drop(child);
    Ok(())
}

/// The aggregators' progress in Redis database `db`: the oldest entry (unix ms).
async fn progress(client: &Client, prefix: &str) -> anyhow::Result<Option<i64>> {
    let entries: std::collections::HashMap<String, String> = client.hgetall(realtime::progress_key(prefix)).await?;
    Ok(entries.values().filter_map(|v| v.parse().ok()).min())
}

#[tokio::test]
async fn a_frozen_aggregator_stops_its_progress_and_stale_progress_marks_feature_answers_degraded() -> anyhow::Result<()>
{
    let db = 11;
    let (s, events, client, prefix) = through_the_stack(Some(db)).await?;
    let _: i64 = client.del(realtime::progress_key(&prefix)).await?;
    let run = run_id();
    let now_ms = || now_s() * 1000;

    // An aggregator that has read its partitions to the end reports the clock.
    let mut child = aggregator_process(&s, db, &format!("adserve-test-progress-{run}"))?;
    events.impression(&impression(&format!("{run}-p"), &format!("fresh-{run}"), 8_600_000_000 + run, now_s())).await?;
    wait_for("the aggregator caught up", Duration::from_secs(60), async || {
        Ok(progress(&client, &prefix).await?.is_some_and(|p| now_ms() - p < 3_000))
    })
    .await?;
    // Frozen, it reports nothing: its progress stops where it was.
    signal(&child, "-STOP")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let frozen = progress(&client, &prefix).await?.expect("reported");
    assert!(now_ms() - frozen >= 3_000, "a frozen aggregator's progress must not move ({} ms old)", now_ms() - frozen);
    // Thawed, it catches up and the clock moves on again.
    signal(&child, "-CONT")?;
    wait_for("the thawed aggregator reports again", Duration::from_secs(30), async || {
        Ok(progress(&client, &prefix).await?.is_some_and(|p| now_ms() - p < 3_000))
    })
    .await?;
    child.start_kill()?;
    let _ = child.wait().await;
    // Restarted on partitions it had read to their end, with nothing new to
    // read: it still reports (its committed offsets are the ends), so the
    // entries its previous incarnation left do not freeze.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut child = aggregator_process(&s, db, &format!("adserve-test-progress-{run}"))?;
    wait_for("the restarted aggregator reports the clock without a new event", Duration::from_secs(30), async || {
        Ok(progress(&client, &prefix).await?.is_some_and(|p| now_ms() - p < 3_000))
    })
    .await?;
    child.start_kill()?;
    let _ = child.wait().await;

    // A feature-service over that database. An aggregator stopped two
    // minutes ago (past the real-time features' 1-minute SLA): still an
    // answer, with the stored values, marked degraded naming the SLA.
    let grpc = free_port();
    let _service = tokio::process::Command::new(binary("adserve-feature-service"))
        .env("ADSERVE_MODE", "serve")
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_REDIS__URL", s.redis_db(db))
        .env("ADSERVE_DYNAMODB__ENDPOINT", &s.dynamodb)
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "error")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stale = now_ms() - 120_000;
    let _: i64 = client.hset(realtime::progress_key(&prefix), ("adserve.impressions.v1/0", stale.to_string())).await?;
    let request = GetFeaturesRequest {
        user_id: format!("fresh-{run}"),
        ad_ids: vec![1, 2],
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
    };
    let mut features = None;
    for _ in 0..100 {
        if let Ok(c) = FeatureServiceClient::connect(format!("http://127.0.0.1:{grpc}")).await {
            features = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut features = features.context("feature-service did not start")?;
    let freshness = |r: &adserve_proto::v1::GetFeaturesResponse| {
        r.degraded
            .iter()
            .find(|d| d.component == "redis" && d.reason.contains("freshness_sla"))
            .map(|d| d.reason.clone())
    };
    wait_for("stale real-time features reported", Duration::from_secs(20), async || {
        let r = features.get_features(request.clone()).await?.into_inner();
        Ok(r.matrix.is_some() && freshness(&r).is_some())
    })
    .await?;
    let r = features.get_features(request.clone()).await?.into_inner();
    let reason = freshness(&r).expect("still stale");
    assert!(reason.contains("user_impressions_1h") && reason.contains("ad_impressions_1h"), "{reason}");
    // The aggregator is back: the next answers are clean again.
    let entries: std::collections::HashMap<String, String> = client.hgetall(realtime::progress_key(&prefix)).await?;
    for field in entries.keys() {
        let _: i64 = client.hset(realtime::progress_key(&prefix), (field.as_str(), now_ms().to_string())).await?;
    }
    wait_for("fresh again", Duration::from_secs(20), async || {
        let r = features.get_features(request.clone()).await?.into_inner();
        Ok(freshness(&r).is_none())
    })
    .await?;
    let _: i64 = client.del(realtime::progress_key(&prefix)).await?;
    Ok(())
}
