//! `adserve-sim`: drives the running stack with a simulated world whose
//! click truth is known, so the feedback loop (serve → log → join → train)
//! can be scored against an oracle.
//!
//! It creates the world's own advertisers, campaigns and ads in the catalog
//! (once per seed; their budgets are far above what a run spends, and every
//! other advertiser is blocked from the world's requests, so simulated
//! traffic never spends a real campaign's budget), publishes the world's
//! features (DynamoDB batch features for its users and ads, and the
//! catalog's retrieval estimate),
//! sends ad requests to the gateway from `--concurrency` clients, decides
//! each served impression's click from the TRUE probability, posts the
//! click after a long-tailed delay (some after the label window, as in
//! production), waits until the label-joiner has written a row for every
//! impression, and writes:
//!
//! - `OUT/truth.csv`: `impression_id,p_click,p_label` (p_label = p_click ×
//!   P(the click arrives inside the label window)), which
//!   `python -m adserve_trainer.train --data … --truth OUT/truth.csv`
//!   scores the trained model against;
//! - `OUT/sim.json`: the run's settings and counts, and the oracle's AUC on
//!   the rows the label-joiner wrote.
//!
//! It writes to the feature store of the stack it is pointed at: point it
//! at a local or staging stack, never at production.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use adserve_features::Entity;
use adserve_gateway::pipeline::MAX_BLOCKED;
use adserve_integration_tests::{
    Stack, read_rows,
    sim::{Ad, DEVICES, Delays, Exposure, PLACEMENTS, Rng, TOPICS, Truth, World, auc, derive},
};
use adserve_proto::v1::{FlushRequest, GetStatusRequest};
use anyhow::{Context, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};

/// Drive the local stack with a simulated world of known click truth.
#[derive(Debug, Parser)]
#[command(name = "adserve-sim", version)]
struct Args {
    /// Seed of the world, the traffic and the clicks.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Users in the world.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    users: u32,
    /// Ad requests to send (one slot each).
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    requests: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Median click delay (log-normal).
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    click_delay_median: Duration,
    /// Spread of ln(click delay).
    #[arg(long, default_value_t = 1.0)]
    click_delay_sigma: f64,
    /// Clicks drawn later than this are never sent (the user left).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    max_click_delay: Duration,
    /// The label-joiner's label window (what the oracle's p_label assumes).
    #[arg(long, env = "ADSTACK_LABEL_WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    label_window: Duration,
    /// Longest wait for the label-joiner to write every impression's row.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    wait_rows: Duration,
    /// Output directory (truth.csv, sim.json).
    #[arg(long)]
    out: PathBuf,
}

/// One served impression and its truth.
#[derive(Debug, Clone)]
struct Served {
    impression_id: String,
    p_click: f64,
    p_label: f64,
    /// Clicked, and when the click was (to be) sent after the answer.
    click: Option<Duration>,
}

#[derive(Debug, Default)]
struct Counts {
    ok: usize,
    no_fill: usize,
    failed: usize,
    degraded: HashMap<String, usize>,
    unknown_ads: usize,
    clicks_drawn: usize,
    clicks_abandoned: usize,
    first_error: Option<String>,
}

fn check(args: &Args) -> anyhow::Result<()> {
    ensure!(
        args.click_delay_sigma.is_finite() && args.click_delay_sigma > 0.0 && args.click_delay_sigma <= 5.0,
        "--click-delay-sigma must be in (0, 5], got {}",
        args.click_delay_sigma
    );
    ensure!(!args.click_delay_median.is_zero(), "--click-delay-median must be positive");
    ensure!(!args.label_window.is_zero(), "--label-window must be positive");
    ensure!(
        args.max_click_delay >= args.click_delay_median,
        "--max-click-delay ({:?}) must be at least --click-delay-median ({:?})",
        args.max_click_delay,
        args.click_delay_median
    );
    Ok(())
}

/// Campaigns of the simulated world's advertisers.
const WORLD_CAMPAIGNS: usize = 20;
/// Ads per world campaign.
const WORLD_ADS_PER_CAMPAIGN: usize = 5;
/// Daily budget of a world campaign (micro units): far above what any
/// simulated run spends, so budget pacing never throttles the world.
const WORLD_DAILY_BUDGET_MICROS: i64 = 1_000_000_000_000_000;

/// The world's own advertisers, campaigns and ads in the catalog (created
/// once per seed; idempotent), so simulated traffic never spends the budgets
/// of the catalog's real campaigns (and never makes the pacer throttle
/// them). Returns the world's active ads (id, category) and the domains of
/// every other advertiser, which the simulated publisher blocks (OpenRTB
/// badv), so only the world's ads compete.
async fn world_catalog(stack: &Stack, seed: u64) -> anyhow::Result<(Vec<(i64, String)>, Vec<String>)> {
    let catalog = stack.catalog()?;
    let prefix = format!("sim-{seed}-advertiser-");
    let like = format!("{prefix}%");
    let existing: Vec<(i64,)> = sqlx::query_as(
        "SELECT c.id FROM campaigns c JOIN advertisers v ON v.id = c.advertiser_id WHERE v.name LIKE $1",
    )
    .bind(&like)
    .fetch_all(catalog.pool())
    .await
    .context("reading the world's campaigns")?;
    if existing.is_empty() {
        for c in 0..WORLD_CAMPAIGNS {
            let mut r = Rng::new(derive(seed, "campaign", c as u64));
            let campaign = adserve_catalog::NewCampaign {
                advertiser: format!("{prefix}{}", c % 8),
                advertiser_domain: format!("{prefix}{}.example", c % 8),
                name: format!("sim-{seed}-campaign-{c}"),
                bid_cpc_micros: 300_000 + (r.uniform() * 1_700_000.0) as i64,
                daily_budget_micros: WORLD_DAILY_BUDGET_MICROS,
                ads: (0..WORLD_ADS_PER_CAMPAIGN)
                    .map(|a| {
                        let topic = TOPICS[(c + a) % TOPICS.len()];
                        adserve_catalog::NewAd {
                            title: format!("{topic} (simulated) {c}.{a}"),
                            landing_url: format!("https://sim-{seed}.example/{c}/{a}"),
                            category: topic.into(),
                            ..adserve_catalog::NewAd::default()
                        }
                    })
                    .collect(),
                ..adserve_catalog::NewCampaign::default()
            };
            catalog.insert_campaign(&campaign).await.context("creating the world's campaigns")?;
        }
    }
    let ads: Vec<(i64, String)> = sqlx::query_as(
        "SELECT a.id, a.category FROM ads a JOIN campaigns c ON c.id = a.campaign_id \
         JOIN advertisers v ON v.id = c.advertiser_id \
         WHERE v.name LIKE $1 AND a.status = 'active' AND c.status = 'active' ORDER BY a.id",
    )
    .bind(&like)
    .fetch_all(catalog.pool())
    .await
    .context("reading the world's ads")?;
    ensure!(!ads.is_empty(), "the world's campaigns have no active ads (paused by hand?)");
    let others: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT domain FROM advertisers WHERE domain <> '' AND name NOT LIKE $1 ORDER BY domain",
    )
    .bind(&like)
    .fetch_all(catalog.pool())
    .await
    .context("reading the catalog's other advertisers")?;
    let others: Vec<String> = others.into_iter().map(|(d,)| d).collect();
    ensure!(
        others.len() <= MAX_BLOCKED,
        "the catalog has {} other advertisers; a request blocks at most {MAX_BLOCKED} (run the simulator on its own stack)",
        others.len()
    );
    Ok((ads, others))
}

/// Writes the world's batch features (users, ads) and the catalog's CTR estimate.
async fn publish(stack: &Stack, world: &World) -> anyhow::Result<()> {
    let batch = stack.batch_store();
    batch.ensure_tables().await?;
    let mut ads: Vec<&Ad> = world.ads.values().collect();
    ads.sort_by_key(|a| a.id);
    let ads: Vec<_> = ads.into_iter().map(World::ad_row).collect();
    batch.put_ad_rows(&ads).await?;
    let ctrs: Vec<(i64, f32)> = world.ads.values().map(|a| (a.id, a.ctr_7d as f32)).collect();
    stack.catalog()?.set_estimated_ctr(&ctrs).await?;
    for chunk in world.users.chunks(500) {
        let rows: Vec<_> = chunk.iter().map(World::user_row).collect();
        batch.put_rows(Entity::User, &rows).await?;
    }
    Ok(())
}

fn hour_now() -> f64 {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    (secs % 86_400.0) / 3600.0
}

#[allow(clippy::too_many_arguments)]
async fn client(
    stack: Arc<Stack>,
    world: Arc<World>,
    args: Arc<Args>,
    cumulative: Arc<Vec<f64>>,
    blocked: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    served: Arc<Mutex<Vec<Served>>>,
    counts: Arc<Mutex<Counts>>,
    clicks: Arc<Mutex<tokio::task::JoinSet<anyhow::Result<()>>>>,
) {
    let http = adserve_integration_tests::http_client();
    let delays = Delays { median: args.click_delay_median, sigma: args.click_delay_sigma };
    let within = delays.within(args.label_window);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= args.requests as usize {
            return;
        }
        let mut r = Rng::new(derive(args.seed, "request", i as u64));
        let total = *cumulative.last().unwrap_or(&1.0);
        let x = r.uniform() * total;
        let user = &world.users[cumulative.partition_point(|c| *c <= x).min(world.users.len() - 1)];
        let placement = r.pick(PLACEMENTS.iter().map(|p| p.1));
        let device = r.pick(DEVICES.iter().map(|d| d.1));
        let body = json!({
            "user_id": user.id,
            "context": {"placement": PLACEMENTS[placement].0, "device": DEVICES[device].0, "surface": "home"},
            "slots": 1,
            "blocked_advertisers": blocked.as_slice(),
        });
        let answer = http.post(format!("{}/v1/ads", stack.http)).json(&body).send().await;
        let v: Value = match answer {
            Ok(resp) if resp.status().is_success() => match resp.json().await {
                Ok(v) => v,
                Err(e) => {
                    failed(&counts, format!("ad answer is not JSON: {e}"));
                    continue;
                }
            },
            Ok(resp) => {
                let status = resp.status();
                failed(&counts, format!("ad request answered {status}: {}", resp.text().await.unwrap_or_default()));
                continue;
            }
            Err(e) => {
                failed(&counts, format!("ad request failed: {e}"));
                continue;
            }
        };
        let winners = v["winners"].as_array().cloned().unwrap_or_default();
        {
            let mut c = counts.lock().expect("counts");
            c.ok += 1;
            if winners.is_empty() {
                c.no_fill += 1;
            }
            for d in v["degraded"].as_array().into_iter().flatten() {
                *c.degraded.entry(d["component"].as_str().unwrap_or("?").to_string()).or_default() += 1;
            }
        }
        for (slot, w) in winners.iter().enumerate() {
            let id = w["impression_id"].as_str().unwrap_or_default().to_string();
            let Some(ad) = w["ad_id"].as_i64().and_then(|a| world.ads.get(&a)) else {
                counts.lock().expect("counts").unknown_ads += 1;
                continue;
            };
            let e = Exposure { user, ad, placement: Some(placement), device, hour: hour_now() };
            let p_click = world.p_click(&e);
            let mut cr = Rng::new(derive(args.seed, "click", (i as u64) << 4 | slot as u64));
            let click = (cr.uniform() < p_click).then(|| delays.sample(&mut cr));
            let mut sent = click;
            if let Some(delay) = click {
                let mut c = counts.lock().expect("counts");
                c.clicks_drawn += 1;
                if delay > args.max_click_delay {
                    c.clicks_abandoned += 1;
                    sent = None;
                }
            }
            if let Some(delay) = sent {
                let (http, url, id) = (http.clone(), format!("{}/v1/clicks", stack.http), id.clone());
                let token = w["click_token"].clone();
                clicks.lock().expect("clicks").spawn(async move {
                    tokio::time::sleep(delay).await;
                    let r = http.post(url).json(&json!({"impression_id": id, "click_token": token})).send().await?;
                    ensure!(r.status().is_success(), "click for {id} answered {}", r.status());
                    Ok(())
                });
            }
            served.lock().expect("served").push(Served {
                impression_id: id,
                p_click,
                p_label: p_click * within,
                click: sent,
            });
        }
    }
}

fn failed(counts: &Mutex<Counts>, why: String) {
    let mut c = counts.lock().expect("counts");
    c.failed += 1;
    c.first_error.get_or_insert(why);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    check(&args)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let stack = Arc::new(Stack::ready().await?);
    let (ads, blocked) = world_catalog(&stack, args.seed).await?;
    let world = Arc::new(World::new(args.seed, args.users as usize, &ads, Truth::default()));
    println!(
        "== simulated world (seed {}): {} users, {} ads of its own advertisers over {}; \
         the {} other advertisers of the catalog are blocked from its requests",
        args.seed,
        world.users.len(),
        world.ads.len(),
        TOPICS.join(", "),
        blocked.len()
    );
    let blocked = Arc::new(blocked);
    publish(&stack, &world).await?;
    // The world's campaigns and CTR estimates are what the gateway's catalog index serves.
    stack.wait_gateway_catalog(std::time::SystemTime::now()).await?;
    println!("== published the world's batch features (DynamoDB) and CTR estimates (catalog)");

    // Users come back in proportion to their sessions.
    let mut acc = 0.0;
    let cumulative: Arc<Vec<f64>> = Arc::new(
        world
            .users
            .iter()
            .map(|u| {
                acc += u.sessions_7d;
                acc
            })
            .collect(),
    );
    let args = Arc::new(args);
    let served = Arc::new(Mutex::new(Vec::with_capacity(args.requests as usize)));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let clicks = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    println!(
        "== {} ad requests from {} clients; clicks drawn from the truth, sent after a log-normal delay \
         (median {:?}, sigma {}; label window {:?}, so {:.1}% of clicks arrive inside it)",
        args.requests,
        args.concurrency,
        args.click_delay_median,
        args.click_delay_sigma,
        args.label_window,
        100.0 * Delays { median: args.click_delay_median, sigma: args.click_delay_sigma }.within(args.label_window)
    );
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        clients.spawn(client(
            stack.clone(),
            world.clone(),
            args.clone(),
            cumulative.clone(),
            blocked.clone(),
            next.clone(),
            served.clone(),
            counts.clone(),
            clicks.clone(),
        ));
    }
    let progress = {
        let (next, args) = (next.clone(), args.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = next.load(Ordering::Relaxed).min(args.requests as usize);
                println!(
                    "   {done}/{} requests, {:.0}/s",
                    args.requests,
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    while let Some(r) = clients.join_next().await {
        r.context("a simulated client panicked")?;
    }
    progress.abort();
    let traffic = started.elapsed();
    let mut clicks = std::mem::take(&mut *clicks.lock().expect("clicks"));
    let mut click_errors = 0usize;
    let mut first_click_error = None;
    while let Some(r) = clicks.join_next().await {
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
            click_errors += 1;
            first_click_error.get_or_insert(e.to_string());
        }
    }
    let served = std::mem::take(&mut *served.lock().expect("served"));
    let c = std::mem::take(&mut *counts.lock().expect("counts"));
    let clicks_sent = served.iter().filter(|s| s.click.is_some()).count();
    let late = served.iter().filter(|s| s.click.is_some_and(|d| d > args.label_window)).count();
    println!(
        "== {} answers in {:.1} s ({:.0}/s), {} without an ad, {} failed; {} impressions; \
         {} clicks drawn: {} sent inside the window, {late} after it, {} abandoned",
        c.ok,
        traffic.as_secs_f64(),
        c.ok as f64 / traffic.as_secs_f64(),
        c.no_fill,
        c.failed,
        served.len(),
        c.clicks_drawn,
        clicks_sent - late,
        c.clicks_abandoned,
    );
    if !c.degraded.is_empty() {
        println!("   degraded answers by component: {:?}", c.degraded);
    }
    if let Some(e) = &c.first_error {
        println!("   first failure: {e}");
    }
    ensure!(
        c.failed * 20 <= args.requests as usize,
        "{} of {} ad requests failed (first: {})",
        c.failed,
        args.requests,
        c.first_error.as_deref().unwrap_or("?")
    );
    ensure!(click_errors == 0, "{click_errors} clicks were refused (first: {})", first_click_error.unwrap_or_default());
    ensure!(!served.is_empty(), "no impression was served");

    let truth_path = args.out.join("truth.csv");
    let mut csv = String::from("impression_id,p_click,p_label\n");
    for s in &served {
        csv.push_str(&format!("{},{:.8},{:.8}\n", s.impression_id, s.p_click, s.p_label));
    }
    write_atomically(&truth_path, csv.as_bytes())?;

    // Every impression's row: the label-joiner closes a window once its
    // watermark passes it; Flush writes what is closed now.
    let mut joiner = stack.joiner_client().await?;
    let dir = PathBuf::from(joiner.get_status(GetStatusRequest {}).await?.into_inner().output_dir);
    println!("== waiting for the label-joiner to write a row for every impression ({})", dir.display());
    let ids: HashSet<&str> = served.iter().map(|s| s.impression_id.as_str()).collect();
    let deadline = Instant::now() + args.wait_rows;
    let rows = loop {
        joiner.flush(FlushRequest { close_open_windows: false }).await?;
        let rows: HashMap<String, i8> = read_rows(&dir)?
            .into_iter()
            .filter(|r| r.kind == "final" && ids.contains(r.impression_id.as_str()))
            .map(|r| (r.impression_id, r.label))
            .collect();
        if rows.len() == ids.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let (mut p, mut y, mut disagree) = (Vec::new(), Vec::new(), 0usize);
    for s in &served {
        if let Some(label) = rows.get(&s.impression_id) {
            let clicked = *label == 1;
            // What the simulator expects the joiner to have labelled.
            if clicked != s.click.is_some_and(|d| d <= args.label_window) {
                disagree += 1;
            }
            p.push(s.p_label);
            y.push(clicked);
        }
    }
    let oracle = auc(&p, &y);
    let positives = y.iter().filter(|l| **l).count();
    println!(
        "== {} of {} impressions have their training row, {positives} labelled clicked ({:.2}%); \
         oracle AUC (the true probability as the score) {}",
        rows.len(),
        served.len(),
        100.0 * positives as f64 / y.len().max(1) as f64,
        oracle.map_or("n/a (one class)".into(), |a| format!("{a:.4}"))
    );
    if disagree > 0 {
        println!(
            "   {disagree} rows labelled otherwise than the click's send time implies (clicks at the window's edge)"
        );
    }
    let summary = json!({
        "seed": args.seed,
        "users": args.users,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "click_delay_median_ms": args.click_delay_median.as_millis() as u64,
        "click_delay_sigma": args.click_delay_sigma,
        "max_click_delay_ms": args.max_click_delay.as_millis() as u64,
        "label_window_ms": args.label_window.as_millis() as u64,
        "truth": format!("{:?}", world.truth),
        "answers": c.ok,
        "no_fill": c.no_fill,
        "failed": c.failed,
        "degraded": c.degraded,
        "unknown_ads": c.unknown_ads,
        "impressions": served.len(),
        "clicks_drawn": c.clicks_drawn,
        "clicks_sent": clicks_sent,
        "clicks_after_window": late,
        "clicks_abandoned": c.clicks_abandoned,
        "traffic_seconds": traffic.as_secs_f64(),
        "rows_joined": rows.len(),
        "rows_labelled_clicked": positives,
        "label_disagreements": disagree,
        "oracle_auc": oracle,
        "truth_file": truth_path,
        "parquet_dir": dir,
    });
    write_atomically(&args.out.join("sim.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("== wrote {} and {}", truth_path.display(), args.out.join("sim.json").display());
    if rows.len() < served.len() {
        bail!(
            "only {} of {} impressions had a training row after {:?}: is the label-joiner running (see its log)?",
            rows.len(),
            served.len(),
            args.wait_rows
        );
    }
    Ok(())
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
