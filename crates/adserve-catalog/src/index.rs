//! The catalog at request speed: every servable ad in memory, so eligibility
//! costs no database round trip and survives PostgreSQL being down.
//!
//! [`CatalogIndex`] holds a [`Snapshot`] of the servable catalog (active ads
//! of active campaigns not yet ended, with their advertiser's domain, and the
//! floors), read in one repeatable-read transaction and swapped atomically.
//! It is rebuilt when the catalog changes (statement triggers on `ads`,
//! `campaigns`, `advertisers` and `floors` send `NOTIFY adserve_catalog`;
//! changes are coalesced for `debounce`), and every `refresh` as a safety
//! net against a lost notification. PostgreSQL stays the source of truth: a
//! rebuild that fails keeps the last good snapshot serving, and its age is
//! there for the caller to judge.
//!
//! [`Snapshot::eligible_ads`] answers exactly what [`crate::Catalog::eligible_ads`]
//! answers on the same data (a test holds them equal on random catalogs):
//! the same filters, the same estimated-eCPM order (ties by ad id), the same
//! per-campaign and per-advertiser quotas, the same floors. Entries are kept
//! in that order once per snapshot, bucketed by targeted placement (plus one
//! bucket of campaigns that target every placement), so a request merges
//! two ordered lists and stops at `max_candidates`.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use adserve_core::{Invalid, check_duration};
use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool};
use tokio::sync::mpsc;

use crate::{CatalogError, EligibleAd, Retrieval, Targeting, notify::Notice};

/// The channel the catalog's triggers notify; the payload is
/// `<schema>.<table>`.
pub const NOTIFY_CHANNEL: &str = "adserve_catalog";

/// How the index follows the catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogIndexConfig {
    /// Serve eligibility from memory. Off: every request queries PostgreSQL.
    pub enabled: bool,
    /// Rebuild at least this often, notification or not.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// After a change notification, wait this long for more before
    /// rebuilding (a bulk edit is one rebuild, not thousands).
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// A snapshot older than this (PostgreSQL unreadable) still serves, but
    /// the answer says the catalog is degraded.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// Statement timeout of a rebuild's reads.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
}

impl Default for CatalogIndexConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            refresh: Duration::from_secs(30),
            debounce: Duration::from_millis(50),
            max_staleness: Duration::from_secs(300),
            load_timeout: Duration::from_secs(30),
        }
    }
}

impl CatalogIndexConfig {
    /// Validation (`prefix` names the config table).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let key = |k: &str| format!("{prefix}.{k}");
        check_duration(&key("refresh"), self.refresh, Duration::from_millis(100), Duration::from_secs(86_400))?;
        check_duration(&key("debounce"), self.debounce, Duration::ZERO, Duration::from_secs(60))?;
        check_duration(&key("max_staleness"), self.max_staleness, self.refresh, Duration::from_secs(30 * 86_400))?;
        check_duration(&key("load_timeout"), self.load_timeout, Duration::from_millis(100), Duration::from_secs(600))?;
        Ok(())
    }
}

/// One servable ad as read for the index.
#[derive(Debug, FromRow)]
struct Row {
    ad_id: i64,
    campaign_id: i64,
    advertiser_id: i64,
    title: String,
    landing_url: String,
    category: String,
    bid_cpc_micros: Option<i64>,
    bid_cpm_micros: Option<i64>,
    quality: f32,
    est_ctr: f32,
    daily_budget_micros: i64,
    frequency_cap_per_day: Option<i32>,
    placements: Vec<String>,
    devices: Vec<String>,
    under13_safe: bool,
    starts_ms: Option<i64>,
    ends_ms: Option<i64>,
    advertiser_domain: String,
}

/// Active ads of active campaigns that have not ended (a campaign that
/// starts later is kept: it becomes eligible on time, without a rebuild).
const SERVABLE: &str = "SELECT a.id AS ad_id, a.campaign_id, c.advertiser_id, a.title, a.landing_url, a.category,
        c.bid_cpc_micros, c.bid_cpm_micros, a.quality, a.est_ctr, c.daily_budget_micros, c.frequency_cap_per_day,
        c.placements, c.devices, a.under13_safe,
        (extract(epoch FROM c.starts_at) * 1000)::bigint AS starts_ms,
        (extract(epoch FROM c.ends_at) * 1000)::bigint AS ends_ms,
        COALESCE(v.domain, '') AS advertiser_domain
   FROM ads a
   JOIN campaigns c ON c.id = a.campaign_id
   LEFT JOIN advertisers v ON v.id = c.advertiser_id
  WHERE a.status = 'active' AND c.status = 'active' AND (c.ends_at IS NULL OR c.ends_at > now())";

#[derive(Debug)]
struct Entry {
    /// What a request gets (its reserve is set per request).
    ad: EligibleAd,
    devices: Vec<String>,
    under13_safe: bool,
    starts_ms: Option<i64>,
    ends_ms: Option<i64>,
}

impl Entry {
    fn eligible(&self, t: &Targeting<'_>, now_ms: i64) -> bool {
        (self.devices.is_empty() || self.devices.iter().any(|d| d == t.device))
            && (!t.coppa || self.under13_safe)
            && self.starts_ms.is_none_or(|s| s <= now_ms)
            && self.ends_ms.is_none_or(|e| e > now_ms)
            && !t.blocked_categories.contains(&self.ad.category)
            && (self.ad.advertiser_domain.is_empty() || !t.blocked_advertisers.contains(&self.ad.advertiser_domain))
    }
}

/// The servable catalog at one point in time.
#[derive(Debug)]
pub struct Snapshot {
    /// Best estimated eCPM first, ties by ad id: the retrieval order.
    entries: Vec<Entry>,
    /// Indices (ascending, so in retrieval order) of ads whose campaign
    /// targets every placement.
    everywhere: Vec<u32>,
    /// The same, per targeted placement.
    by_placement: HashMap<String, Vec<u32>>,
    /// (placement, category, reserve eCPM micros).
    floors: Vec<(String, String, i64)>,
    /// Taken before the read began: every change committed before it is in.
    loaded_at: Instant,
    as_of: SystemTime,
}

/// The estimate retrieval orders by, with the query's arithmetic
/// (`COALESCE(bid_cpc::float8 * est_ctr * 1000, bid_cpm::float8) * quality`).
fn est_ecpm(r: &Row) -> f64 {
    let bid = match (r.bid_cpc_micros, r.bid_cpm_micros) {
        (Some(cpc), _) => cpc as f64 * f64::from(r.est_ctr) * 1000.0,
        (None, Some(cpm)) => cpm as f64,
        (None, None) => 0.0,
    };
    bid * f64::from(r.quality)
}

impl Snapshot {
    fn build(rows: Vec<Row>, floors: Vec<(String, String, i64)>, loaded_at: Instant, as_of: SystemTime) -> Self {
        let mut ranked: Vec<(f64, Row)> = rows.into_iter().map(|r| (est_ecpm(&r), r)).collect();
        ranked.sort_by(|(ea, a), (eb, b)| eb.total_cmp(ea).then(a.ad_id.cmp(&b.ad_id)));
        let mut everywhere = Vec::new();
        let mut by_placement: HashMap<String, Vec<u32>> = HashMap::new();
        let mut entries = Vec::with_capacity(ranked.len());
        for (i, (_, r)) in ranked.into_iter().enumerate() {
            let i = i as u32;
            if r.placements.is_empty() {
                everywhere.push(i);
            } else {
                let mut placements = r.placements.clone();
                placements.sort();
                placements.dedup();
                for p in placements {
                    by_placement.entry(p).or_default().push(i);
                }
            }
            entries.push(Entry {
                ad: EligibleAd {
                    ad_id: r.ad_id,
                    campaign_id: r.campaign_id,
                    advertiser_id: r.advertiser_id,
                    title: r.title,
                    landing_url: r.landing_url,
                    category: r.category,
                    bid_cpc_micros: r.bid_cpc_micros,
                    bid_cpm_micros: r.bid_cpm_micros,
                    quality: r.quality,
                    daily_budget_micros: r.daily_budget_micros,
                    frequency_cap_per_day: r.frequency_cap_per_day,
                    reserve_ecpm_micros: 0,
                    advertiser_domain: r.advertiser_domain,
                },
                devices: r.devices,
                under13_safe: r.under13_safe,
                starts_ms: r.starts_ms,
                ends_ms: r.ends_ms,
            });
        }
        Self { entries, everywhere, by_placement, floors, loaded_at, as_of }
    }

    /// Reads the servable catalog in one consistent snapshot.
    pub async fn load(pool: &PgPool, statement_timeout: Duration) -> Result<Self, CatalogError> {
        let (loaded_at, as_of) = (Instant::now(), SystemTime::now());
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL statement_timeout = {}", statement_timeout.as_millis())))
            .execute(&mut *tx)
            .await?;
        let rows: Vec<Row> = sqlx::query_as(SERVABLE).fetch_all(&mut *tx).await?;
        let floors: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT placement, category, reserve_ecpm_micros FROM floors").fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(Self::build(rows, floors, loaded_at, as_of))
    }

    /// How many ads it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no ad.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How long ago it was read (from just before the read began).
    pub fn age(&self) -> Duration {
        self.loaded_at.elapsed()
    }

    /// The wall-clock time just before the read began: every change
    /// committed before it is in this snapshot.
    pub fn as_of(&self) -> SystemTime {
        self.as_of
    }

    /// [`crate::Catalog::eligible_ads`], from memory, at `now_ms` (unix ms).
    pub fn eligible_ads_at(&self, t: &Targeting<'_>, r: &Retrieval, now_ms: i64) -> Vec<EligibleAd> {
        let mut floor: HashMap<&str, i64> = HashMap::new();
        for (placement, category, reserve) in &self.floors {
            if placement == t.placement || placement == "*" {
                let f = floor.entry(category.as_str()).or_insert(*reserve);
                *f = (*f).max(*reserve);
            }
        }
        let everywhere_floor = floor.get("*").copied().unwrap_or(0);
        let targeted = self.by_placement.get(t.placement).map_or(&[][..], Vec::as_slice);
        let (mut a, mut b) = (self.everywhere.iter().peekable(), targeted.iter().peekable());
        let mut per_campaign: HashMap<i64, usize> = HashMap::new();
        let mut per_advertiser: HashMap<i64, usize> = HashMap::new();
        let mut out = Vec::new();
        while out.len() < r.max_candidates {
            // Merge the two ascending index lists: retrieval order.
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => None,
            };
            let Some(&i) = next else { break };
            let e = &self.entries[i as usize];
            if !e.eligible(t, now_ms) {
                continue;
            }
            // The query's quotas: rank within the campaign among eligible
            // ads, then within the advertiser among those the campaign kept.
            let n = per_campaign.entry(e.ad.campaign_id).or_default();
            *n += 1;
            if *n > r.per_campaign {
                continue;
            }
            let n = per_advertiser.entry(e.ad.advertiser_id).or_default();
            *n += 1;
            if *n > r.per_advertiser {
                continue;
            }
            let mut ad = e.ad.clone();
            ad.reserve_ecpm_micros = floor.get(ad.category.as_str()).copied().unwrap_or(0).max(everywhere_floor);
            out.push(ad);
        }
        out
    }

    /// [`Self::eligible_ads_at`] now.
    pub fn eligible_ads(&self, t: &Targeting<'_>, r: &Retrieval) -> Vec<EligibleAd> {
        self.eligible_ads_at(t, r, unix_ms())
    }
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug)]
struct Inner {
    snapshot: ArcSwapOption<Snapshot>,
    loaded: tokio::sync::Notify,
}

/// The servable catalog in memory, following PostgreSQL. Cheap to clone;
/// the background rebuilds stop when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct CatalogIndex {
    inner: Arc<Inner>,
}

impl CatalogIndex {
    /// Starts following the catalog in `schema` over `pool` (call from
    /// within a Tokio runtime). Nothing is served until the first rebuild.
    pub fn spawn(pool: PgPool, schema: &str, config: CatalogIndexConfig) -> Self {
        let inner = Arc::new(Inner { snapshot: ArcSwapOption::empty(), loaded: tokio::sync::Notify::new() });
        let (wake_tx, wake_rx) = mpsc::channel(1);
        tokio::spawn(listen(pool.clone(), format!("{schema}."), wake_tx, Arc::downgrade(&inner)));
        tokio::spawn(follow(pool, config, wake_rx, Arc::downgrade(&inner)));
        Self { inner }
    }

    /// The current snapshot; `None` until the first rebuild succeeds.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.inner.snapshot.load_full()
    }

    /// Waits up to `limit` for the first snapshot; whether there is one.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let waited = tokio::time::timeout(limit, async {
            loop {
                let notified = self.inner.loaded.notified();
                if self.snapshot().is_some() {
                    return;
                }
                notified.await;
            }
        });
        waited.await.is_ok()
    }
}

/// Rebuilds on each wake-up (coalesced for `debounce`) and every `refresh`;
/// after a failed rebuild, retries with backoff while the last good
/// snapshot keeps serving.
async fn follow(pool: PgPool, config: CatalogIndexConfig, mut wake: mpsc::Receiver<()>, inner: Weak<Inner>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let result = Snapshot::load(&pool, config.load_timeout).await;
        let Some(index) = inner.upgrade() else { return };
        let pause = match result {
            Ok(snapshot) => {
                metrics::counter!("adserve_catalog_index_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("adserve_catalog_index_ads").set(snapshot.len() as f64);
                let as_of = snapshot.as_of.duration_since(UNIX_EPOCH).unwrap_or_default();
                metrics::gauge!("adserve_catalog_index_as_of_timestamp_seconds").set(as_of.as_secs_f64());
                metrics::histogram!("adserve_catalog_index_load_seconds").record(started.elapsed().as_secs_f64());
                tracing::debug!(
                    ads = snapshot.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "catalog index rebuilt"
                );
                index.snapshot.store(Some(Arc::new(snapshot)));
                index.loaded.notify_waiters();
                backoff = Duration::from_millis(200);
                config.refresh
            }
            Err(e) => {
                metrics::counter!("adserve_catalog_index_reloads_total", "result" => "error").increment(1);
                let age = index.snapshot.load().as_ref().map(|s| s.age().as_secs());
                tracing::warn!(error = %e, serving_snapshot_age_s = ?age, retry_in = ?backoff,
                    "catalog index rebuild failed; the last good snapshot keeps serving");
                let pause = backoff;
                backoff = (backoff * 2).min(config.refresh);
                pause
            }
        };
        drop(index);
        tokio::select! {
            woken = wake.recv() => match woken {
                Some(()) => {
                    tokio::time::sleep(config.debounce).await;
                    while wake.try_recv().is_ok() {}
                }
                // The listener is gone: poll only.
                None => tokio::time::sleep(pause).await,
            },
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Wakes a rebuild on each change notification for a table in the schema
/// (`prefix` = `<schema>.`) and on each (re)connect, while the index lives.
async fn listen(pool: PgPool, prefix: String, wake: mpsc::Sender<()>, inner: Weak<Inner>) {
    let alive = || inner.strong_count() > 0;
    crate::notify::listen_forever(pool, NOTIFY_CHANNEL, "catalog index", alive, |notice| {
        if matches!(notice, Notice::Resync) || matches!(notice, Notice::Payload(p) if p.starts_with(&prefix)) {
            let _ = wake.try_send(());
        }
        true
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Catalog, NewAd, NewCampaign, tests::fresh_schema};

    /// A small deterministic generator (no dependency for a test).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, from: &[&'a str], most: usize) -> Vec<&'a str> {
            let n = self.below(most + 1);
            (0..n).map(|_| from[self.below(from.len())]).collect()
        }
    }

    const PLACEMENTS: [&str; 3] = ["feed_top", "sidebar", "story"];
    const DEVICES: [&str; 4] = ["mobile", "desktop", "tablet", "ctv"];
    const CATEGORIES: [&str; 4] = ["travel", "games", "books", "food"];

    /// A random catalog with every feature the query handles: targeting,
    /// COPPA, CPC and CPM bids, ties in the estimate, paused ads and
    /// campaigns, flight dates past, present and future, floors, domains.
    async fn random_catalog(catalog: &Catalog, seed: u64) {
        let mut r = Lcg(seed);
        let pool = catalog.pool();
        for c in 0..40 {
            let advertiser = r.below(6);
            let cpm = r.below(4) == 0;
            let ads = (0..1 + r.below(8))
                .map(|a| NewAd {
                    title: format!("ad {c}.{a}"),
                    landing_url: format!("https://l.example/{c}/{a}"),
                    category: CATEGORIES[r.below(CATEGORIES.len())].into(),
                    under13_safe: r.below(3) == 0,
                    quality: [0.5, 1.0, 1.0, 2.0][r.below(4)],
                })
                .collect();
            let campaign = NewCampaign {
                advertiser: format!("adv-{advertiser}"),
                // Some advertisers have no domain.
                advertiser_domain: if advertiser.is_multiple_of(3) {
                    String::new()
                } else {
                    format!("adv-{advertiser}.example")
                },
                name: format!("c{c}"),
                // Few distinct bids: ties in the estimate, broken by ad id.
                bid_cpc_micros: if cpm { 0 } else { [500_000, 1_000_000, 2_000_000][r.below(3)] },
                bid_cpm_micros: if cpm { [10_000_000, 20_000_000][r.below(2)] } else { 0 },
                daily_budget_micros: 1_000_000_000,
                frequency_cap_per_day: (r.below(2) == 0).then_some(3),
                placements: r.pick(&PLACEMENTS, 2).into_iter().map(String::from).collect(),
                devices: r.pick(&DEVICES, 2).into_iter().map(String::from).collect(),
                ads,
            };
            let ids = catalog.insert_campaign(&campaign).await.unwrap();
            let ctrs: Vec<(i64, f32)> = ids.iter().map(|&id| (id, [0.01, 0.02, 0.05][r.below(3)])).collect();
            catalog.set_estimated_ctr(&ctrs).await.unwrap();
            let by_ad = "WHERE id = (SELECT campaign_id FROM ads WHERE id = $1)";
            let flight = match r.below(6) {
                0 => Some("SET starts_at = now() + interval '1 day'"),
                1 => Some("SET ends_at = now() - interval '1 day'"),
                2 => Some("SET starts_at = now() - interval '1 day', ends_at = now() + interval '1 day'"),
                3 => Some("SET status = 'paused'"),
                _ => None,
            };
            if let Some(set) = flight {
                sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE campaigns {set} {by_ad}")))
                    .bind(ids[0])
                    .execute(pool)
                    .await
                    .unwrap();
            }
            if r.below(4) == 0 {
                sqlx::query("UPDATE ads SET status = 'paused' WHERE id = $1").bind(ids[0]).execute(pool).await.unwrap();
            }
        }
        for (placement, category, reserve) in
            [("*", "*", 1_000), ("feed_top", "*", 5_000), ("*", "travel", 8_000), ("sidebar", "games", 90_000)]
        {
            catalog.set_floor(placement, category, reserve).await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_index_answers_exactly_what_the_query_answers() {
        let (catalog, _) = fresh_schema().await;
        random_catalog(&catalog, 7).await;
        let snapshot = Snapshot::load(catalog.pool(), Duration::from_secs(30)).await.unwrap();
        assert!(snapshot.len() > 20, "{} ads", snapshot.len());
        let none: Vec<String> = vec![];
        let travel = vec!["travel".to_string()];
        let adv = vec!["adv-1.example".to_string(), "adv-2.example".to_string()];
        let retrievals = [
            Retrieval::all(1000),
            Retrieval { max_candidates: 7, per_campaign: 2, per_advertiser: 3 },
            Retrieval { max_candidates: 1000, per_campaign: 1, per_advertiser: 1000 },
            Retrieval { max_candidates: 1000, per_campaign: 1000, per_advertiser: 2 },
        ];
        let mut compared = 0;
        let mut nonempty = 0;
        for placement in PLACEMENTS.iter().chain(&["elsewhere"]) {
            for device in DEVICES {
                for coppa in [false, true] {
                    for (bc, ba) in [(&none, &none), (&travel, &none), (&none, &adv), (&travel, &adv)] {
                        let t = Targeting { placement, device, coppa, blocked_categories: bc, blocked_advertisers: ba };
                        for r in &retrievals {
                            let sql = catalog.eligible_ads(&t, r).await.unwrap();
                            let memory = snapshot.eligible_ads(&t, r);
                            assert_eq!(memory, sql, "{t:?} {r:?}");
                            compared += 1;
                            nonempty += usize::from(!sql.is_empty());
                        }
                    }
                }
            }
        }
        assert!(nonempty > compared / 2, "the cases must mostly find ads: {nonempty} of {compared}");
    }

    async fn until<T: std::fmt::Debug>(what: &str, mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
        for _ in 0..200 {
            let v = read();
            if done(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: not within 10 s; last {:?}", read());
    }

    #[tokio::test]
    async fn the_index_follows_changes_and_keeps_serving_when_the_catalog_cannot_be_read() {
        let (catalog, schema) = fresh_schema().await;
        let a = crate::tests::campaign("a", 500_000, &[], &[("first", false)]);
        catalog.insert_campaign(&a).await.unwrap();
        // An hour between polls: only notifications can explain what follows.
        let config = CatalogIndexConfig {
            refresh: Duration::from_secs(3600),
            max_staleness: Duration::from_secs(7200),
            debounce: Duration::from_millis(10),
            ..Default::default()
        };
        let index = CatalogIndex::spawn(catalog.pool().clone(), &schema, config);
        assert!(index.wait_loaded(Duration::from_secs(10)).await);
        let t = Targeting { placement: "feed_top", device: "mobile", ..Default::default() };
        let all = Retrieval::all(100);
        let titles = || -> Vec<String> {
            index.snapshot().unwrap().eligible_ads(&t, &all).into_iter().map(|a| a.title).collect()
        };
        assert_eq!(titles(), ["first"]);

        let b = crate::tests::campaign("b", 900_000, &[], &[("second", false)]);
        let b_ads = catalog.insert_campaign(&b).await.unwrap();
        until("a new campaign", titles, |t| t.len() == 2).await;
        sqlx::query("UPDATE ads SET status = 'paused' WHERE id = $1")
            .bind(b_ads[0])
            .execute(catalog.pool())
            .await
            .unwrap();
        until("a paused ad", titles, |t| *t == ["first"]).await;
        catalog.set_floor("*", "*", 4_000).await.unwrap();
        let reserve = || index.snapshot().unwrap().eligible_ads(&t, &all)[0].reserve_ecpm_micros;
        until("a new floor", reserve, |r| *r == 4_000).await;

        // The catalog cannot be read: the last good snapshot keeps serving.
        let good = index.snapshot().unwrap();
        sqlx::query("ALTER TABLE ads RENAME TO ads_away").execute(catalog.pool()).await.unwrap();
        catalog.set_floor("*", "*", 5_000).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(Arc::ptr_eq(&good, &index.snapshot().unwrap()), "a failed rebuild replaced the snapshot");
        assert_eq!(titles(), ["first"]);
        // Readable again: the next change is picked up.
        sqlx::query("ALTER TABLE ads_away RENAME TO ads").execute(catalog.pool()).await.unwrap();
        catalog.set_floor("*", "*", 6_000).await.unwrap();
        until("recovery", reserve, |r| *r == 6_000).await;
    }
}
