//! End to end: open-loop load on the gateway (`POST /v1/ads` and gRPC
//! `GetAds`) at rising rates up to saturation, with 500 and 1000 eligible
//! candidates per request; beside it the sum of the component medians, each
//! component called directly in the same run, and the gateway's own per-hop
//! histogram for each step. Then the OpenRTB face (`POST /openrtb2/auction`,
//! two banner imps) against the native `POST /v1/ads` on the same 500
//! candidates, step by step at the same rates: what the OpenRTB mapping costs.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use adserve_catalog::{NewAd, NewCampaign, Retrieval, Targeting};
use adserve_events::{EventPublisher, KafkaConfig};
use adserve_gateway::pipeline::Hop;
use adserve_proto::v1::{
    AuctionCandidate, FeatureRow, GetAdsRequest, GetFeaturesRequest, ImpressionEvent, RequestContext, ScoreRequest,
    auction_service_client::AuctionServiceClient, feature_service_client::FeatureServiceClient,
    gateway_service_client::GatewayServiceClient, ranker_service_client::RankerServiceClient,
};
use anyhow::Context;

use super::{
    Settings,
    load::{self, Measurement, Outcome, Summary},
    prom,
    report::{Breakdown, Comparison, Metric, Role},
};
use crate::Stack;

/// Bench placements and how many ads each must make eligible. Only bench
/// campaigns target them, plus the demo campaigns that target every placement.
pub const SIZES: [(&str, usize); 2] = [("bench_500", 500), ("bench_1000", 1000)];
/// Users the load spreads over (features seeded for each).
pub const USERS: usize = 1000;
/// Slots per request.
pub const SLOTS: u32 = 2;
const ADS_PER_CAMPAIGN: usize = 50;

/// The user of call `i`.
pub fn user(i: u64) -> String {
    format!("bench-user-{}", i % USERS as u64)
}

/// Makes `placement` have at least `target` eligible ads (idempotent: tops
/// up), seeds their features, and returns the eligible ad ids.
pub async fn seed_placement(stack: &Stack, placement: &str, target: usize) -> anyhow::Result<Vec<i64>> {
    let catalog = stack.catalog()?;
    let targeting = Targeting { placement, device: "mobile", ..Targeting::default() };
    let existing = catalog.eligible_ads(&targeting, &Retrieval::all(5000)).await?.len();
    let mut need = target.saturating_sub(existing);
    let mut k = 0;
    while need > 0 {
        let n = need.min(ADS_PER_CAMPAIGN);
        // One advertiser per campaign: the gateway's retrieval quotas (per
        // campaign, per advertiser) must not cut the bench's candidate set.
        let campaign = NewCampaign {
            advertiser: format!("adserve-bench-{placement}-{existing}-{k}"),
            name: format!("{placement}-{existing}-{k}"),
            bid_cpc_micros: 200_000 + ((k * 37) % 19) as i64 * 100_000,
            daily_budget_micros: 1_000_000_000_000,
            placements: vec![placement.into()],
            ads: (0..n)
                .map(|a| NewAd {
                    title: format!("bench offer {k}.{a}"),
                    landing_url: format!("https://bench.example/{placement}/{k}/{a}"),
                    category: "bench".into(),
                    ..NewAd::default()
                })
                .collect(),
            ..NewCampaign::default()
        };
        catalog.insert_campaign(&campaign).await?;
        need -= n;
        k += 1;
    }
    let ids: Vec<i64> =
        catalog.eligible_ads(&targeting, &Retrieval::all(target)).await?.into_iter().map(|a| a.ad_id).collect();
    anyhow::ensure!(ids.len() == target, "{placement}: {} eligible ads after seeding, wanted {target}", ids.len());
    let users: Vec<String> = (0..USERS as u64).map(user).collect();
    stack.seed_features(&ids, &users).await?;
    Ok(ids)
}

fn context(placement: &str) -> RequestContext {
    RequestContext { placement: placement.into(), device: "mobile".into(), surface: "home".into(), coppa: false }
}

/// Rates offered, lowest first; the ladder stops at saturation.
fn rates(quick: bool) -> &'static [f64] {
    if quick { &[25.0, 50.0, 100.0] } else { &[10.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 400.0] }
}

/// Saturated: the gateway no longer keeps up with the offered rate, or its
/// answers are failing, degrading (a dependency past its deadline is how an
/// overloaded stack sheds work), or slower than any client would wait.
fn saturated(m: &Measurement) -> bool {
    let offered = m.offered_rate.unwrap_or_default();
    let calls = m.calls().max(1) as f64;
    m.rate() < 0.9 * offered
        || m.errors as f64 / calls > 0.01
        || m.degraded as f64 / calls > 0.01
        || m.ms(0.99) > 1000.0
}

/// Runs the end-to-end part.
pub async fn run(s: &Settings) -> anyhow::Result<(Vec<Comparison>, Vec<Breakdown>)> {
    let stack = &s.stack;
    load::ensure_loopback(&stack.http)?;
    load::ensure_loopback(&stack.gateway)?;
    let metrics_url = format!("http://{}/metrics", s.gateway_metrics);
    let mut comparisons = Vec::new();
    let mut hop_rows = Vec::new();
    let mut component_rows = Vec::new();
    for (placement, size) in SIZES {
        let ad_ids = seed_placement(stack, placement, size).await?;
        stack.wait_gateway_catalog(std::time::SystemTime::now()).await?;
        let (floor, rows) = components(s, placement, &ad_ids).await?;
        component_rows.extend(rows);
        for proto in ["HTTP", "gRPC"] {
            for &rate in rates(s.quick) {
                let (m, row) = with_hops(&metrics_url, format!("{proto} {size} @ {rate:.0}/s"), async {
                    step(s, &s.stack.http, proto, placement, size, rate, Users::Known).await
                })
                .await?;
                hop_rows.push(row);
                let sat = saturated(&m);
                let case = format!("{proto} {size} candidates, {rate:.0} req/s offered");
                let mut c = Comparison::new("end-to-end", case, Metric::P50, &format!("adserve gateway ({proto})"), &m)
                    .with_summary("sum of component medians (direct calls)", Role::Floor, floor.clone());
                if sat {
                    c = c.note(
                        "saturated: achieved rate below 90% of offered, >1% errors or degraded answers, or p99 > 1 s",
                    );
                }
                comparisons.push(c);
                tracing::info!(proto, size, rate, achieved = m.rate(), p99_ms = m.ms(0.99), "end-to-end step done");
                if sat {
                    break;
                }
            }
        }
    }
    comparisons.extend(openrtb(s, &metrics_url, &mut hop_rows).await?);
    let (cache, cache_rows) = prediction_cache(s).await?;
    comparisons.extend(cache);
    let mut columns = vec!["step".to_string()];
    columns.extend(Hop::ALL.iter().map(|h| format!("{} p50 / p99 ms", h.label())));
    let breakdowns = vec![
        Breakdown {
            title: "Gateway per-hop latency (from adserve_gateway_hop_seconds, per step)".into(),
            columns,
            rows: hop_rows,
        },
        Breakdown {
            title: "Prediction cache: share of candidate rows the ranker did not score (from adserve_ranker_rows)"
                .into(),
            columns: ["users", "gateway", "rows not sent to the ranker", "p50 ms", "p99 ms"].map(String::from).to_vec(),
            rows: cache_rows,
        },
        Breakdown {
            title: "Components called directly (closed loop, concurrency 1)".into(),
            columns: vec!["candidates".into(), "component".into(), "p50 ms".into(), "p99 ms".into()],
            rows: component_rows,
        },
    ];
    Ok((comparisons, breakdowns))
}

/// The OpenRTB ladder: at each rate a native `POST /v1/ads` step, then an
/// OpenRTB step, on the same 500 candidates (the placement an OpenRTB imp
/// without a mapped `tagid` gets).
async fn openrtb(s: &Settings, metrics_url: &str, hop_rows: &mut Vec<Vec<String>>) -> anyhow::Result<Vec<Comparison>> {
    let placement = adserve_gateway::GatewayConfig::default().openrtb.default_placement;
    let size = SIZES[0].1;
    seed_placement(&s.stack, &placement, size).await?;
    s.stack.wait_gateway_catalog(std::time::SystemTime::now()).await?;
    let mut out = Vec::new();
    for &rate in rates(s.quick) {
        let native = step(s, &s.stack.http, "HTTP", &placement, size, rate, Users::Known).await?;
        let (m, row) = with_hops(metrics_url, format!("OpenRTB {size} @ {rate:.0}/s"), async {
            step(s, &s.stack.http, "OpenRTB", &placement, size, rate, Users::Known).await
        })
        .await?;
        hop_rows.push(row);
        let sat = saturated(&m) || saturated(&native);
        let case = format!("OpenRTB {size} candidates, 2 banner imps, {rate:.0} req/s offered");
        let mut c = Comparison::new("end-to-end", case, Metric::P50, "adserve gateway (OpenRTB)", &m).with(
            "native HTTP /v1/ads, same candidates and slots, step before",
            Role::Floor,
            &native,
        );
        if sat {
            c = c.note("saturated: achieved rate below 90% of offered, >1% errors or degraded answers, or p99 > 1 s");
        }
        out.push(c);
        tracing::info!(size, rate, achieved = m.rate(), p99_ms = m.ms(0.99), "OpenRTB step done");
        if sat {
            break;
        }
    }
    Ok(out)
}

/// The prediction cache off, exact (the default) and at 8 mantissa bits, on
/// the same 500 candidates at one rate, for known users and for anonymous
/// ones (OpenRTB `lmt`): three gateways in this process (alike but for the
/// cache) in front of the stack's feature-service, ranker and auction, run
/// one after the other. The hit rate is the share of candidate rows the
/// stack's ranker, which nothing else calls meanwhile, did not score.
async fn prediction_cache(s: &Settings) -> anyhow::Result<(Vec<Comparison>, Vec<Vec<String>>)> {
    const RATE: f64 = 100.0;
    let placement = adserve_gateway::GatewayConfig::default().openrtb.default_placement;
    let size = SIZES[0].1;
    let ranker_metrics = s
        .stack
        .metrics
        .iter()
        .find(|(name, _)| name == "ranker")
        .map(|(_, addr)| format!("http://{addr}/metrics"))
        .ok_or_else(|| anyhow::anyhow!("no ranker metrics address"))?;
    let rows_scored = async || -> anyhow::Result<f64> {
        Ok(prom::counter(&prom::scrape(&ranker_metrics).await?, "adserve_ranker_rows_sum", &[]))
    };
    let arms: [(&str, Option<u32>); 3] =
        [("cache off", None), ("cache on, exact", Some(23)), ("cache on, 8 bits", Some(8))];
    let mut gateways = Vec::new();
    for (name, bits) in arms {
        let url = s
            .stack
            .in_process_gateway(|c| match bits {
                None => c.prediction_cache.enabled = false,
                Some(b) => c.prediction_cache.mantissa_bits = b,
            })
            .await?;
        gateways.push((name, url));
    }
    let (mut out, mut rows) = (Vec::new(), Vec::new());
    for users in [Users::Known, Users::Anonymous] {
        let mut ms = Vec::new();
        for (name, url) in &gateways {
            let before = rows_scored().await?;
            let m = step(s, url, "OpenRTB", &placement, size, RATE, users).await?;
            let scored = rows_scored().await? - before;
            let asked = m.calls() as f64 * size as f64;
            let skipped = if asked > 0.0 { (1.0 - scored / asked).max(0.0) } else { 0.0 };
            rows.push(vec![
                format!("{users:?}"),
                name.to_string(),
                format!("{:.1}%", skipped * 100.0),
                format!("{:.2}", m.ms(0.5)),
                format!("{:.2}", m.ms(0.99)),
            ]);
            tracing::info!(?users, gateway = name, skipped, p50_ms = m.ms(0.5), "prediction cache step done");
            ms.push(m);
        }
        let case = format!("prediction cache: OpenRTB {size} candidates, {users:?} users, {RATE:.0} req/s offered");
        let c = Comparison::new("end-to-end", case, Metric::P50, "in-process gateway, cache on (exact)", &ms[1])
            .with("the same gateway, cache off", Role::Peer, &ms[0])
            .with("the same gateway, cache on, 8 mantissa bits", Role::Peer, &ms[2]);
        out.push(c);
    }
    Ok((out, rows))
}

/// Runs `step`, and the gateway's per-hop p50 / p99 over it (from the
/// change in `adserve_gateway_hop_seconds`) as a row headed `label`.
async fn with_hops(
    metrics_url: &str,
    label: String,
    step: impl std::future::Future<Output = anyhow::Result<Measurement>>,
) -> anyhow::Result<(Measurement, Vec<String>)> {
    let hops = || async {
        anyhow::Ok(prom::histogram(&prom::scrape(metrics_url).await?, "adserve_gateway_hop_seconds", "hop"))
    };
    let before = hops().await?;
    let m = step.await?;
    let delta = prom::delta(&before, &hops().await?);
    let mut row = vec![label];
    for hop in Hop::ALL {
        let b = delta.get(hop.label());
        let q = |q: f64| b.and_then(|b| prom::quantile(b, q)).map_or("—".into(), |v| format!("{:.2}", v * 1e3));
        row.push(format!("{} / {}", q(0.5), q(0.99)));
    }
    Ok((m, row))
}

/// Who the requests of a step are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Users {
    /// The bench's users ([`user`]), features seeded.
    Known,
    /// OpenRTB only: the same user ids, with `device.lmt = 1`, so the
    /// gateway serves them as anonymous (no user features).
    Anonymous,
}

/// One open-loop step against the gateway whose HTTP face is `http`
/// (gRPC: the stack's).
async fn step(
    s: &Settings,
    http: &str,
    proto: &str,
    placement: &str,
    size: usize,
    rate: f64,
    users: Users,
) -> anyhow::Result<Measurement> {
    let timeout = Duration::from_secs(2);
    let max_in_flight = 4096;
    let m = if proto == "OpenRTB" {
        let url = format!("{http}/openrtb2/auction");
        let http = crate::http_builder().pool_max_idle_per_host(512).build()?;
        let lmt = u8::from(users == Users::Anonymous);
        load::open_loop(rate, s.step(), timeout, max_in_flight, size as u64, move |i| {
            let (http, url) = (http.clone(), url.clone());
            let imp = |id: &str| serde_json::json!({"id": id, "banner": {"w": 300, "h": 250}});
            let body = serde_json::json!({
                "id": format!("bench-{i}"),
                "imp": [imp("1"), imp("2")],
                "site": {"page": "https://bench.example/"},
                "device": {"devicetype": 4, "lmt": lmt},
                "user": {"id": user(i)},
            });
            async move {
                let resp = match http.post(url).json(&body).send().await {
                    Ok(r) => r,
                    Err(e) => return Outcome::Error(e.to_string()),
                };
                if resp.status() == reqwest::StatusCode::NO_CONTENT {
                    return Outcome::Error("no bid".into());
                }
                match load::json_answer_of(resp).await {
                    Ok(v) if v["seatbid"][0]["bid"].as_array().is_some_and(|b| !b.is_empty()) => {
                        if v["ext"]["adserve"]["degraded"].as_array().is_some_and(|d| !d.is_empty()) {
                            Outcome::Degraded
                        } else {
                            Outcome::Ok
                        }
                    }
                    Ok(v) => Outcome::Error(format!("no bids: {v}")),
                    Err(e) => e,
                }
            }
        })
        .await
    } else if proto == "HTTP" {
        anyhow::ensure!(users == Users::Known, "native requests always name their user");
        let url = format!("{http}/v1/ads");
        let http = crate::http_builder().pool_max_idle_per_host(512).build()?;
        let placement = placement.to_string();
        load::open_loop(rate, s.step(), timeout, max_in_flight, size as u64, move |i| {
            let (http, url) = (http.clone(), url.clone());
            let body = serde_json::json!({
                "user_id": user(i),
                "context": {"placement": placement, "device": "mobile", "surface": "home"},
                "slots": SLOTS,
            });
            async move {
                match load::json_answer(http.post(url).json(&body)).await {
                    Ok(v) => judge(
                        v["candidates"].as_u64().unwrap_or_default() as usize,
                        v["winners"].as_array().map_or(0, Vec::len),
                        v["degraded"].as_array().is_some_and(|d| !d.is_empty()),
                        size,
                    ),
                    Err(e) => e,
                }
            }
        })
        .await
    } else {
        // The gateway's gRPC listener lets one connection hold at most
        // HTTP2_PUBLIC_MAX_CONCURRENT_STREAMS calls open; a client that wants
        // more in flight opens more connections, as the HTTP step's pool does.
        // Enough of them that the generator's own cap binds first: otherwise
        // calls past the limit would wait in this client, not at the gateway.
        // Twice as many as an even spread needs: calls are dealt round-robin
        // but finish unevenly.
        let connections =
            (2 * max_in_flight).div_ceil(adserve_core::net::HTTP2_PUBLIC_MAX_CONCURRENT_STREAMS as usize).max(1);
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = adserve_core::net::grpc_endpoint(s.stack.gateway.clone())?.connect().await?;
            clients.push(GatewayServiceClient::new(channel));
        }
        let clients = Arc::new(clients);
        let ctx = context(placement);
        load::open_loop(rate, s.step(), timeout, max_in_flight, size as u64, move |i| {
            let mut client = clients[i as usize % clients.len()].clone();
            let req =
                GetAdsRequest { user_id: user(i), context: Some(ctx.clone()), slots: SLOTS, ..Default::default() };
            async move {
                match client.get_ads(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        judge(r.candidates as usize, r.winners.len(), !r.degraded.is_empty(), size)
                    }
                    Err(e) => Outcome::Error(format!("{:?}: {}", e.code(), e.message())),
                }
            }
        })
        .await
    };
    Ok(m)
}

fn judge(candidates: usize, winners: usize, degraded: bool, size: usize) -> Outcome {
    if candidates != size {
        Outcome::Error(format!("{candidates} candidates scored, expected {size}"))
    } else if winners == 0 {
        Outcome::Error("no fill".into())
    } else if degraded {
        Outcome::Degraded
    } else {
        Outcome::Ok
    }
}

/// Calls each component the way the gateway does, directly and one at a
/// time, and returns the sum of their medians (as a floor summary) plus a
/// row per component.
async fn components(s: &Settings, placement: &str, ad_ids: &[i64]) -> anyhow::Result<(Summary, Vec<Vec<String>>)> {
    let stack = &s.stack;
    let n = ad_ids.len();
    let timeout = Duration::from_secs(2);
    let mut parts: BTreeMap<usize, (&str, Measurement)> = BTreeMap::new();

    let catalog = stack.catalog()?;
    let placement_owned = placement.to_string();
    let m = load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |_| {
        let (catalog, placement) = (catalog.clone(), placement_owned.clone());
        async move {
            let t = Targeting { placement: &placement, device: "mobile", ..Targeting::default() };
            match catalog.eligible_ads(&t, &Retrieval::all(n)).await {
                Ok(a) if a.len() == n => Outcome::Ok,
                Ok(a) => Outcome::Error(format!("{} ads", a.len())),
                Err(e) => Outcome::Error(e.to_string()),
            }
        }
    })
    .await;
    // The query is what a gateway without its catalog index runs (and runs
    // until the index has loaded): a row of its own, not in the sum.
    let query = m;
    // What the gateway runs: eligibility from the in-memory index.
    let snapshot = Arc::new(adserve_catalog::index::Snapshot::load(stack.catalog()?.pool(), timeout).await?);
    let placement_owned = placement.to_string();
    let m = load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |_| {
        let (snapshot, placement) = (snapshot.clone(), placement_owned.clone());
        async move {
            let t = Targeting { placement: &placement, device: "mobile", ..Targeting::default() };
            match snapshot.eligible_ads(&t, &Retrieval::all(n)) {
                a if a.len() == n => Outcome::Ok,
                a => Outcome::Error(format!("{} ads", a.len())),
            }
        }
    })
    .await;
    parts.insert(0, ("catalog eligibility (in-memory index)", m));

    let features =
        FeatureServiceClient::new(adserve_core::net::grpc_endpoint(stack.features.clone())?.connect().await?);
    let ctx = context(placement);
    let ids = Arc::new(ad_ids.to_vec());
    let m = {
        let (features, ctx, ids) = (features.clone(), ctx.clone(), ids.clone());
        load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |i| {
            let mut c = features.clone();
            let req = GetFeaturesRequest { user_id: user(i), ad_ids: (*ids).clone(), context: Some(ctx.clone()) };
            async move {
                match c.get_features(req).await {
                    Ok(r) if r.get_ref().degraded.is_empty() => Outcome::Ok,
                    Ok(_) => Outcome::Degraded,
                    Err(e) => Outcome::Error(e.message().to_string()),
                }
            }
        })
        .await
    };
    parts.insert(1, ("feature-service GetFeatures", m));

    let matrix = features
        .clone()
        .get_features(GetFeaturesRequest { user_id: user(0), ad_ids: ad_ids.to_vec(), context: Some(ctx.clone()) })
        .await?
        .into_inner()
        .matrix
        .context("GetFeatures returned no matrix")?;
    let ranker = RankerServiceClient::new(adserve_core::net::grpc_endpoint(stack.ranker.clone())?.connect().await?);
    let m = {
        let (ranker, matrix) = (ranker.clone(), Arc::new(matrix.clone()));
        load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |_| {
            let (mut c, matrix) = (ranker.clone(), matrix.clone());
            async move {
                match c.score(ScoreRequest { matrix: Some((*matrix).clone()), ..Default::default() }).await {
                    Ok(_) => Outcome::Ok,
                    Err(e) => Outcome::Error(e.message().to_string()),
                }
            }
        })
        .await
    };
    parts.insert(2, ("ranker Score", m));

    let pctr = ranker
        .clone()
        .score(ScoreRequest { matrix: Some(matrix.clone()), ..Default::default() })
        .await?
        .into_inner()
        .pctr;
    let catalog_ads = stack
        .catalog()?
        .eligible_ads(&Targeting { placement, device: "mobile", ..Targeting::default() }, &Retrieval::all(n))
        .await?;
    let candidates: Vec<AuctionCandidate> = catalog_ads
        .iter()
        .zip(&pctr)
        .map(|(a, p)| AuctionCandidate {
            ad_id: a.ad_id,
            campaign_id: a.campaign_id,
            advertiser_id: a.advertiser_id,
            bid_cpc_micros: a.bid_cpc_micros.unwrap_or(0),
            bid_cpm_micros: a.bid_cpm_micros.unwrap_or(0),
            pctr: *p,
            quality: a.quality,
            reserve_ecpm_micros: a.reserve_ecpm_micros,
            ..AuctionCandidate::default()
        })
        .collect();
    let auction = AuctionServiceClient::new(adserve_core::net::grpc_endpoint(stack.auction.clone())?.connect().await?);
    let m = {
        let rules = adserve_gateway::GatewayConfig::default().auction.rules(SLOTS as usize, 7);
        let request = adserve_auction::wire::request_to_proto(candidates, &rules);
        load::closed_loop(1, s.warmup(), s.window(), timeout, n as u64, move |_| {
            let (mut c, request) = (auction.clone(), request.clone());
            async move {
                match c.run_auction(request).await {
                    Ok(_) => Outcome::Ok,
                    Err(e) => Outcome::Error(e.message().to_string()),
                }
            }
        })
        .await
    };
    parts.insert(3, ("auction RunAuction", m));

    let kafka = KafkaConfig { brokers: stack.kafka.clone(), ..KafkaConfig::default() };
    let publisher = EventPublisher::new(&kafka, "adserve-bench")?;
    let row = FeatureRow {
        names: matrix.feature_names.clone(),
        values: matrix.row(0).unwrap_or_default().to_vec(),
        ..Default::default()
    };
    let m = load::closed_loop(1, s.warmup(), s.window(), timeout, SLOTS as u64, move |_| {
        let publisher = publisher.clone();
        // One answer's impressions, as the gateway logs them: one message.
        let events: Vec<ImpressionEvent> = adserve_events::answer_impression_ids(SLOTS as usize)
            .into_iter()
            .zip(0..)
            .map(|(impression_id, slot)| ImpressionEvent {
                impression_id,
                request_id: "adserve-bench".into(),
                user_id: "adserve-bench".into(),
                ad_id: 1,
                slot,
                served_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                model_version: "adserve-bench".into(),
                pctr: 0.01,
                features: Some(row.clone()),
                ..Default::default()
            })
            .collect();
        async move {
            match publisher.impressions(&events).await {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Error(e.to_string()),
            }
        }
    })
    .await;
    parts.insert(4, ("Kafka ack of the impressions", m));

    let sum50: f64 = parts.values().map(|(_, m)| m.ms(0.5)).sum();
    let row = |name: &str, m: &Measurement| {
        vec![n.to_string(), name.to_string(), format!("{:.2}", m.ms(0.5)), format!("{:.2}", m.ms(0.99))]
    };
    let mut rows: Vec<Vec<String>> = parts.values().map(|(name, m)| row(name, m)).collect();
    rows.push(row("(not in the sum) catalog eligibility, PostgreSQL query", &query));
    let floor = Summary {
        p50_ms: sum50,
        mean_ms: sum50,
        ok: parts.values().map(|(_, m)| m.ok).sum(),
        degraded: parts.values().map(|(_, m)| m.degraded).sum(),
        errors: parts.values().map(|(_, m)| m.errors).sum(),
        error_samples: parts.values().flat_map(|(_, m)| m.error_samples.clone()).take(3).collect(),
        seconds: parts.values().map(|(_, m)| m.elapsed.as_secs_f64()).sum(),
        ..Summary::default()
    };
    Ok((floor, rows))
}
