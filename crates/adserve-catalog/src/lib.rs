//! The ad catalog in PostgreSQL: schema migrations, the eligibility query
//! that turns a request context into candidate ads, the same eligibility
//! from memory ([`index`]), and a deterministic demo seed.

use std::time::Duration;

pub mod index;
pub mod notify;
pub use index::{CatalogIndex, CatalogIndexConfig};

use adserve_core::{Invalid, check_duration, check_range};
use serde::{Deserialize, Serialize};
use sqlx::{
    FromRow, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// Statement timeout of the migration connection (a PostgreSQL interval).
pub const MIGRATION_STATEMENT_TIMEOUT: &str = "60s";

/// The schema migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`.
    pub url: String,
    /// Schema to use (created by migrations when absent); "public" by default.
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// Longest a query waits for a connection, and statement timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Run migrations at start.
    pub migrate: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://adserve:adserve@127.0.0.1:5432/adserve".into(),
            schema: "public".into(),
            max_connections: 16,
            timeout: Duration::from_millis(200),
            migrate: true,
        }
    }
}

impl PostgresConfig {
    /// Validation of the settings.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.url.starts_with("postgres://") && !self.url.starts_with("postgresql://") {
            return Err(Invalid::new("postgres.url", "must start with postgres://"));
        }
        if self.schema.is_empty() || !self.schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Invalid::new("postgres.schema", "must be a plain identifier"));
        }
        check_range("postgres.max_connections", self.max_connections, 1..=1000)?;
        check_duration("postgres.timeout", self.timeout, Duration::from_millis(1), Duration::from_secs(60))?;
        Ok(())
    }
}

/// A catalog failure.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The database refused or did not answer.
    #[error("catalog database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("catalog migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Targeting and policy inputs of one request.
#[derive(Debug, Clone, Default)]
pub struct Targeting<'a> {
    /// Placement id.
    pub placement: &'a str,
    /// Device class.
    pub device: &'a str,
    /// Under-13 user: only `under13_safe` creatives.
    pub coppa: bool,
    /// Content categories the publisher blocks (OpenRTB bcat).
    pub blocked_categories: &'a [String],
    /// Advertiser domains the publisher blocks (OpenRTB badv), lower case.
    pub blocked_advertisers: &'a [String],
}

/// How many eligible ads retrieval hands to scoring, and how they are
/// chosen: by a cheap eCPM estimate (`bid x est_ctr x quality`, or a CPM bid
/// x quality), at most `per_campaign` ads of one campaign and
/// `per_advertiser` of one advertiser, so no campaign fills the candidate
/// set with its own creatives before any model has looked at them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retrieval {
    /// Most candidates per request.
    pub max_candidates: usize,
    /// Most candidates of one campaign.
    pub per_campaign: usize,
    /// Most candidates of one advertiser.
    pub per_advertiser: usize,
}

impl Default for Retrieval {
    fn default() -> Self {
        Self { max_candidates: 1000, per_campaign: 50, per_advertiser: 200 }
    }
}

impl Retrieval {
    /// Up to `n` ads, no quotas: everything eligible (tests, seeding, benches).
    pub const fn all(n: usize) -> Self {
        Self { max_candidates: n, per_campaign: n, per_advertiser: n }
    }

    /// Validation of the settings (`prefix` names the config table).
    pub fn validate(&self, prefix: &str, max: usize) -> Result<(), Invalid> {
        check_range(&format!("{prefix}.max_candidates"), self.max_candidates, 1..=max)?;
        check_range(&format!("{prefix}.per_campaign"), self.per_campaign, 1..=max)?;
        check_range(&format!("{prefix}.per_advertiser"), self.per_advertiser, 1..=max)?;
        Ok(())
    }
}

/// An ad that may run for a request, with what the auction needs of it.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct EligibleAd {
    /// Ad id.
    pub ad_id: i64,
    /// Campaign id.
    pub campaign_id: i64,
    /// Advertiser id.
    pub advertiser_id: i64,
    /// Creative headline.
    pub title: String,
    /// Where a click goes.
    pub landing_url: String,
    /// Content category.
    pub category: String,
    /// Campaign CPC bid, micro units (set for CPC campaigns).
    pub bid_cpc_micros: Option<i64>,
    /// Campaign CPM bid, micro units (set for CPM campaigns).
    pub bid_cpm_micros: Option<i64>,
    /// Ad quality multiplier.
    pub quality: f32,
    /// The campaign's daily budget, micro units.
    pub daily_budget_micros: i64,
    /// Most impressions per user per day (None: the gateway's default).
    pub frequency_cap_per_day: Option<i32>,
    /// The highest floor matching the placement and the ad's category.
    pub reserve_ecpm_micros: i64,
    /// The advertiser's domain (OpenRTB `adomain`); empty when unknown.
    pub advertiser_domain: String,
}

/// A pool that connects lazily (the first query opens connections, so a
/// database that is down at start does not stop the caller), every
/// connection on `config.schema` with `config.timeout` as its statement
/// timeout. Shared by the catalog and the model registry.
pub fn pool_lazy(config: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = config.url.parse()?;
    let options = options.options([
        ("search_path", config.schema.as_str()),
        ("statement_timeout", &config.timeout.as_millis().to_string()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.timeout.max(Duration::from_secs(1)))
        .connect_lazy_with(options))
}

/// Creates `schema` if needed and applies `migrator`'s pending migrations.
///
/// Pool connections carry the request-path statement timeout
/// (`postgres.timeout`, 200 ms by default); DDL on a busy database can take
/// longer, so migrations run on a connection of their own, opened with
/// [`MIGRATION_STATEMENT_TIMEOUT`] as its timeout from the start. (Lifting
/// the timeout with `SET` on a pool connection is not enough: the `SET` is
/// itself a statement under the request-path timeout, and with a timeout of
/// a few milliseconds on a busy machine even it can be cancelled.) The
/// pool's connections never see the longer timeout.
pub async fn migrate(pool: &PgPool, schema: &str, migrator: &sqlx::migrate::Migrator) -> Result<(), CatalogError> {
    use sqlx::Connection as _;
    // `options` appends `-c statement_timeout=...` after the pool's own:
    // PostgreSQL applies startup options in order, so the last one wins.
    let options = (*pool.connect_options()).clone().options([("statement_timeout", MIGRATION_STATEMENT_TIMEOUT)]);
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    if schema != "public" {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
            .execute(&mut conn)
            .await?;
    }
    // run_direct on the connection itself (not `run` over `Acquire`): the
    // generic form makes callers' futures fail the Send check when spawned.
    let migrated = migrator.run_direct(None, &mut conn, false).await;
    let _ = conn.close().await;
    migrated?;
    Ok(())
}

/// The catalog over a PostgreSQL pool.
#[derive(Debug, Clone)]
pub struct Catalog {
    pool: PgPool,
}

impl Catalog {
    /// Connects lazily (the first query opens connections, so a database that
    /// is down at start does not stop the caller) with per-statement timeouts.
    pub fn connect_lazy(config: &PostgresConfig) -> Result<Self, CatalogError> {
        Ok(Self { pool: pool_lazy(config)? })
    }

    /// Creates the schema if needed and applies pending migrations.
    ///
    /// Pool connections carry the request-path statement timeout
    /// (`postgres.timeout`, 200 ms by default); DDL on a busy database can
    /// take longer, so migrations run on one connection with
    /// [`MIGRATION_STATEMENT_TIMEOUT`] instead ([`migrate`]).
    pub async fn migrate(&self, schema: &str) -> Result<(), CatalogError> {
        migrate(&self.pool, schema, &MIGRATOR).await
    }

    /// The pool, for callers that write to the catalog.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Ads that may run for `targeting`: active ad and campaign, within its
    /// flight dates, targeting matched, COPPA respected, blocked categories
    /// and advertisers out; chosen and ordered as `retrieval` says (best
    /// estimated eCPM first, ties by ad id). Budgets and frequency caps are
    /// real-time counters: the gateway applies them.
    pub async fn eligible_ads(
        &self,
        targeting: &Targeting<'_>,
        retrieval: &Retrieval,
    ) -> Result<Vec<EligibleAd>, CatalogError> {
        let rows = sqlx::query_as::<_, EligibleAd>(
            // Ranked on narrow rows (ids and the estimate), wide columns joined
            // back for the chosen few; floors pre-aggregated per category; the
            // advertisers table read only when the request blocks some.
            "WITH fl AS (
               SELECT category, max(reserve_ecpm_micros) AS reserve FROM floors
               WHERE placement IN ($1, '*') GROUP BY category
             ), eligible AS (
               SELECT a.id AS ad_id, a.campaign_id, c.advertiser_id,
                      COALESCE(c.bid_cpc_micros::float8 * a.est_ctr * 1000, c.bid_cpm_micros::float8)
                        * a.quality AS est_ecpm
               FROM ads a
               JOIN campaigns c ON c.id = a.campaign_id
               WHERE a.status = 'active' AND c.status = 'active'
                 AND (c.starts_at IS NULL OR c.starts_at <= now())
                 AND (c.ends_at IS NULL OR c.ends_at > now())
                 AND (cardinality(c.placements) = 0 OR $1 = ANY (c.placements))
                 AND (cardinality(c.devices) = 0 OR $2 = ANY (c.devices))
                 AND (NOT $3 OR a.under13_safe)
                 AND NOT (a.category = ANY ($4))
                 AND (cardinality($5::text[]) = 0 OR NOT EXISTS (
                   SELECT 1 FROM advertisers v
                   WHERE v.id = c.advertiser_id AND v.domain <> '' AND v.domain = ANY ($5)))
             ), in_campaign AS (
               SELECT ad_id, advertiser_id, est_ecpm,
                      row_number() OVER (PARTITION BY campaign_id ORDER BY est_ecpm DESC, ad_id) AS nth
               FROM eligible
             ), chosen AS (
               SELECT ad_id, est_ecpm FROM (
                 SELECT ad_id, est_ecpm,
                        row_number() OVER (PARTITION BY advertiser_id ORDER BY est_ecpm DESC, ad_id) AS nth_adv
                 FROM in_campaign WHERE nth <= $6
               ) r
               WHERE nth_adv <= $7
               ORDER BY est_ecpm DESC, ad_id
               LIMIT $8
             )
             SELECT a.id AS ad_id, a.campaign_id, c.advertiser_id, a.title, a.landing_url, a.category,
                    c.bid_cpc_micros, c.bid_cpm_micros, a.quality, c.daily_budget_micros,
                    c.frequency_cap_per_day,
                    GREATEST(COALESCE(fc.reserve, 0), COALESCE((SELECT reserve FROM fl WHERE category = '*'), 0))
                      AS reserve_ecpm_micros,
                    COALESCE(v.domain, '') AS advertiser_domain
             FROM chosen ch
             JOIN ads a ON a.id = ch.ad_id
             JOIN campaigns c ON c.id = a.campaign_id
             LEFT JOIN advertisers v ON v.id = c.advertiser_id
             LEFT JOIN fl fc ON fc.category = a.category
             ORDER BY ch.est_ecpm DESC, a.id",
        )
        .bind(targeting.placement)
        .bind(targeting.device)
        .bind(targeting.coppa)
        .bind(targeting.blocked_categories)
        .bind(targeting.blocked_advertisers)
        .bind(retrieval.per_campaign as i64)
        .bind(retrieval.per_advertiser as i64)
        .bind(retrieval.max_candidates as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Where a click on ad `ad_id` goes (any status: an ad paused since it
    /// was served still has its landing page); `None` for an unknown ad.
    pub async fn landing_url(&self, ad_id: i64) -> Result<Option<String>, CatalogError> {
        Ok(sqlx::query_scalar("SELECT landing_url FROM ads WHERE id = $1")
            .bind(ad_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Daily budget of every active campaign, micro units (the pacer's input).
    pub async fn campaign_budgets(&self) -> Result<Vec<(i64, i64)>, CatalogError> {
        Ok(sqlx::query_as("SELECT id, daily_budget_micros FROM campaigns WHERE status = 'active'")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Sets ads' cached CTR estimates (the batch job that publishes ad CTR
    /// features calls this with the same values), clamped to `(0, 1]`.
    pub async fn set_estimated_ctr(&self, ctrs: &[(i64, f32)]) -> Result<u64, CatalogError> {
        let ids: Vec<i64> = ctrs.iter().map(|(id, _)| *id).collect();
        let values: Vec<f32> =
            ctrs.iter().map(|(_, v)| if v.is_finite() { v.clamp(1e-6, 1.0) } else { 0.01 }).collect();
        let done = sqlx::query(
            "UPDATE ads SET est_ctr = v.ctr FROM unnest($1::bigint[], $2::real[]) AS v(id, ctr) WHERE ads.id = v.id",
        )
        .bind(&ids)
        .bind(&values)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Sets the reserve floor for a placement and category (`*` = any).
    pub async fn set_floor(
        &self,
        placement: &str,
        category: &str,
        reserve_ecpm_micros: i64,
    ) -> Result<(), CatalogError> {
        sqlx::query(
            "INSERT INTO floors (placement, category, reserve_ecpm_micros) VALUES ($1, $2, $3)
             ON CONFLICT (placement, category) DO UPDATE
               SET reserve_ecpm_micros = EXCLUDED.reserve_ecpm_micros, updated_at = now()",
        )
        .bind(placement)
        .bind(category)
        .bind(reserve_ecpm_micros)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Inserts an advertiser, campaign and its ads; returns the ad ids.
    pub async fn insert_campaign(&self, campaign: &NewCampaign) -> Result<Vec<i64>, CatalogError> {
        let mut tx = self.pool.begin().await?;
        let (advertiser_id,): (i64,) = sqlx::query_as(
            "INSERT INTO advertisers (name, domain) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET domain = EXCLUDED.domain RETURNING id",
        )
        .bind(&campaign.advertiser)
        .bind(campaign.advertiser_domain.to_ascii_lowercase())
        .fetch_one(&mut *tx)
        .await?;
        let nonzero = |v: i64| (v != 0).then_some(v);
        let (campaign_id,): (i64,) = sqlx::query_as(
            "INSERT INTO campaigns (advertiser_id, name, bid_cpc_micros, bid_cpm_micros, daily_budget_micros,
                                    placements, devices, frequency_cap_per_day)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (advertiser_id, name) DO UPDATE
               SET bid_cpc_micros = EXCLUDED.bid_cpc_micros, bid_cpm_micros = EXCLUDED.bid_cpm_micros,
                   daily_budget_micros = EXCLUDED.daily_budget_micros,
                   frequency_cap_per_day = EXCLUDED.frequency_cap_per_day
             RETURNING id",
        )
        .bind(advertiser_id)
        .bind(&campaign.name)
        .bind(nonzero(campaign.bid_cpc_micros))
        .bind(nonzero(campaign.bid_cpm_micros))
        .bind(campaign.daily_budget_micros)
        .bind(&campaign.placements)
        .bind(&campaign.devices)
        .bind(campaign.frequency_cap_per_day)
        .fetch_one(&mut *tx)
        .await?;
        let mut ids = Vec::with_capacity(campaign.ads.len());
        for ad in &campaign.ads {
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO ads (campaign_id, title, landing_url, category, under13_safe, quality)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(campaign_id)
            .bind(&ad.title)
            .bind(&ad.landing_url)
            .bind(&ad.category)
            .bind(ad.under13_safe)
            .bind(if ad.quality > 0.0 { ad.quality } else { 1.0 })
            .fetch_one(&mut *tx)
            .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }
}

/// A campaign to insert.
#[derive(Debug, Clone, Default)]
pub struct NewCampaign {
    /// Advertiser name (created if new).
    pub advertiser: String,
    /// Advertiser domain (OpenRTB badv matches it); empty for none.
    pub advertiser_domain: String,
    /// Campaign name (unique per advertiser).
    pub name: String,
    /// CPC bid, micro units; 0 for a CPM campaign.
    pub bid_cpc_micros: i64,
    /// CPM bid, micro units; 0 for a CPC campaign.
    pub bid_cpm_micros: i64,
    /// Most impressions per user per day; None for the gateway's default.
    pub frequency_cap_per_day: Option<i32>,
    /// Daily budget, micro units.
    pub daily_budget_micros: i64,
    /// Placements targeted (empty = all).
    pub placements: Vec<String>,
    /// Devices targeted (empty = all).
    pub devices: Vec<String>,
    /// Creatives.
    pub ads: Vec<NewAd>,
}

/// A creative to insert.
#[derive(Debug, Clone, Default)]
pub struct NewAd {
    /// Headline.
    pub title: String,
    /// Landing page.
    pub landing_url: String,
    /// Content category.
    pub category: String,
    /// COPPA-safe.
    pub under13_safe: bool,
    /// Quality multiplier; 0 stores the neutral 1.
    pub quality: f32,
}

/// A deterministic demo catalog: `campaigns` campaigns with `ads_per` ads each,
/// bids spread over 0.20-2.00 per click, every fourth ad under-13-safe.
pub fn demo_campaigns(campaigns: usize, ads_per: usize) -> Vec<NewCampaign> {
    const CATEGORIES: [&str; 5] = ["travel", "games", "finance", "food", "books"];
    (0..campaigns)
        .map(|c| NewCampaign {
            advertiser: format!("advertiser-{}", c % 7),
            advertiser_domain: format!("advertiser-{}.example", c % 7),
            name: format!("campaign-{c}"),
            bid_cpc_micros: 200_000 + ((c * 7919) % 19) as i64 * 100_000,
            daily_budget_micros: 1_000_000_000,
            placements: if c % 5 == 4 { vec!["sidebar".into()] } else { vec![] },
            devices: vec![],
            ads: (0..ads_per)
                .map(|a| NewAd {
                    title: format!("{} offer {c}.{a}", CATEGORIES[(c + a) % 5]),
                    landing_url: format!("https://ads.example/{c}/{a}"),
                    category: CATEGORIES[(c + a) % 5].into(),
                    under13_safe: (c * ads_per + a).is_multiple_of(4),
                    ..NewAd::default()
                })
                .collect(),
            ..NewCampaign::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog in a fresh schema of the test database. Fails (rather than
    /// passing vacuously) when none is configured: `make test` provides one.
    async fn fresh() -> Catalog {
        fresh_schema().await.0
    }

    /// [`fresh`], and the schema's name.
    pub(crate) async fn fresh_schema() -> (Catalog, String) {
        let url = std::env::var("ADSTACK_TEST_POSTGRES_URL")
            .expect("ADSTACK_TEST_POSTGRES_URL is unset: run the catalog tests through `make test`");
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let config = PostgresConfig { url, schema: schema.clone(), ..Default::default() };
        let catalog = Catalog::connect_lazy(&config).expect("config");
        catalog.migrate(&schema).await.expect("migrates");
        (catalog, schema)
    }

    pub(crate) fn campaign(name: &str, bid: i64, placements: &[&str], ads: &[(&str, bool)]) -> NewCampaign {
        NewCampaign {
            advertiser: "acme".into(),
            name: name.into(),
            bid_cpc_micros: bid,
            daily_budget_micros: 10_000_000,
            placements: placements.iter().map(|s| s.to_string()).collect(),
            ads: ads
                .iter()
                .map(|(t, safe)| NewAd {
                    title: t.to_string(),
                    landing_url: "https://x".into(),
                    category: "c".into(),
                    under13_safe: *safe,
                    ..NewAd::default()
                })
                .collect(),
            ..NewCampaign::default()
        }
    }

    const ALL: Retrieval = Retrieval { max_candidates: 100, per_campaign: 100, per_advertiser: 100 };

    fn feed() -> Targeting<'static> {
        Targeting { placement: "feed_top", device: "mobile", ..Targeting::default() }
    }

    async fn titles(catalog: &Catalog, t: &Targeting<'_>, r: &Retrieval) -> Vec<String> {
        catalog.eligible_ads(t, r).await.unwrap().into_iter().map(|a| a.title).collect()
    }

    #[tokio::test]
    async fn eligibility_respects_targeting_coppa_and_status() {
        let catalog = fresh().await;
        catalog.insert_campaign(&campaign("a", 500_000, &[], &[("kids", true), ("adults", false)])).await.unwrap();
        catalog.insert_campaign(&campaign("b", 900_000, &["sidebar"], &[("side", true)])).await.unwrap();
        let ids = catalog.insert_campaign(&campaign("c", 700_000, &[], &[("paused", false)])).await.unwrap();
        sqlx::query("UPDATE ads SET status = 'paused' WHERE id = $1")
            .bind(ids[0])
            .execute(catalog.pool())
            .await
            .unwrap();

        assert_eq!(titles(&catalog, &feed(), &ALL).await, vec!["kids", "adults"]);
        let side = Targeting { placement: "sidebar", ..feed() };
        assert_eq!(titles(&catalog, &side, &ALL).await, vec!["side", "kids", "adults"], "best estimate first");
        let kids = Targeting { coppa: true, ..feed() };
        assert_eq!(titles(&catalog, &kids, &ALL).await, vec!["kids"]);
    }

    #[tokio::test]
    async fn one_campaign_cannot_fill_the_candidate_set() {
        // A campaign with 300 creatives at the top bid, and two smaller ones.
        let catalog = fresh().await;
        let many: Vec<(String, bool)> = (0..300).map(|i| (format!("big-{i}"), false)).collect();
        let many: Vec<(&str, bool)> = many.iter().map(|(t, s)| (t.as_str(), *s)).collect();
        catalog.insert_campaign(&campaign("big", 2_000_000, &[], &many)).await.unwrap();
        catalog.insert_campaign(&campaign("small", 1_000_000, &[], &[("s1", false), ("s2", false)])).await.unwrap();
        let other = NewCampaign { advertiser: "globex".into(), ..campaign("other", 900_000, &[], &[("o1", false)]) };
        catalog.insert_campaign(&other).await.unwrap();

        let by_bid_only = Retrieval { max_candidates: 100, per_campaign: 1000, per_advertiser: 1000 };
        assert!(titles(&catalog, &feed(), &by_bid_only).await.iter().all(|t| t.starts_with("big-")));
        let quotas = Retrieval { max_candidates: 100, per_campaign: 20, per_advertiser: 21 };
        let got = titles(&catalog, &feed(), &quotas).await;
        assert_eq!(got.iter().filter(|t| t.starts_with("big-")).count(), 20);
        // acme's quota of 21: 20 from "big", 1 from "small"; globex is not acme.
        assert!(got.contains(&"s1".to_string()) && !got.contains(&"s2".to_string()), "{got:?}");
        assert!(got.contains(&"o1".to_string()));
        assert_eq!(got.len(), 22);
    }

    #[tokio::test]
    async fn retrieval_ranks_by_estimated_ecpm_not_raw_bid() {
        let catalog = fresh().await;
        let hi = catalog.insert_campaign(&campaign("hi", 2_000_000, &[], &[("rarely-clicked", false)])).await.unwrap();
        let lo = catalog.insert_campaign(&campaign("lo", 500_000, &[], &[("often-clicked", false)])).await.unwrap();
        assert_eq!(catalog.set_estimated_ctr(&[(hi[0], 0.001), (lo[0], 0.05)]).await.unwrap(), 2);
        let one = Retrieval { max_candidates: 1, ..ALL };
        assert_eq!(titles(&catalog, &feed(), &one).await, vec!["often-clicked"]);
        // A CPM bid is its own eCPM estimate.
        let cpm = NewCampaign {
            bid_cpc_micros: 0,
            bid_cpm_micros: 90_000_000,
            ..campaign("cpm", 0, &[], &[("cpm-ad", false)])
        };
        catalog.insert_campaign(&cpm).await.unwrap();
        let got = catalog.eligible_ads(&feed(), &one).await.unwrap();
        assert_eq!(
            (got[0].title.as_str(), got[0].bid_cpm_micros, got[0].bid_cpc_micros),
            ("cpm-ad", Some(90_000_000), None)
        );
    }

    #[tokio::test]
    async fn blocked_categories_and_advertisers_are_not_eligible() {
        let catalog = fresh().await;
        let mut a = campaign("a", 500_000, &[], &[("travel-ad", false), ("games-ad", false)]);
        a.ads[0].category = "travel".into();
        a.ads[1].category = "games".into();
        a.advertiser_domain = "Acme.example".into();
        catalog.insert_campaign(&a).await.unwrap();
        let b = NewCampaign {
            advertiser: "globex".into(),
            advertiser_domain: "globex.example".into(),
            ..campaign("b", 400_000, &[], &[("globex-ad", false)])
        };
        catalog.insert_campaign(&b).await.unwrap();
        let bcat = vec!["travel".to_string()];
        let t = Targeting { blocked_categories: &bcat, ..feed() };
        assert_eq!(titles(&catalog, &t, &ALL).await, vec!["games-ad", "globex-ad"]);
        let badv = vec!["acme.example".to_string()];
        let t = Targeting { blocked_advertisers: &badv, ..feed() };
        assert_eq!(titles(&catalog, &t, &ALL).await, vec!["globex-ad"]);
    }

    #[tokio::test]
    async fn each_candidate_carries_the_highest_matching_floor() {
        let catalog = fresh().await;
        let mut a = campaign("a", 500_000, &[], &[("travel-ad", false), ("games-ad", false)]);
        a.ads[0].category = "travel".into();
        a.ads[1].category = "games".into();
        catalog.insert_campaign(&a).await.unwrap();
        let floors =
            |ads: Vec<EligibleAd>| ads.into_iter().map(|a| (a.title, a.reserve_ecpm_micros)).collect::<Vec<_>>();
        assert_eq!(
            floors(catalog.eligible_ads(&feed(), &ALL).await.unwrap()),
            vec![("travel-ad".into(), 0), ("games-ad".into(), 0)]
        );
        catalog.set_floor("*", "*", 1_000).await.unwrap();
        catalog.set_floor("feed_top", "*", 5_000).await.unwrap();
        catalog.set_floor("*", "travel", 8_000).await.unwrap();
        catalog.set_floor("sidebar", "games", 99_000).await.unwrap();
        assert_eq!(
            floors(catalog.eligible_ads(&feed(), &ALL).await.unwrap()),
            vec![("travel-ad".into(), 8_000), ("games-ad".into(), 5_000)]
        );
        let side = Targeting { placement: "sidebar", ..feed() };
        assert_eq!(
            floors(catalog.eligible_ads(&side, &ALL).await.unwrap()),
            vec![("travel-ad".into(), 8_000), ("games-ad".into(), 99_000)]
        );
    }

    #[tokio::test]
    async fn a_campaign_bids_cpc_or_cpm_not_both() {
        let catalog = fresh().await;
        let both = NewCampaign { bid_cpm_micros: 1_000, ..campaign("both", 500_000, &[], &[("x", false)]) };
        assert!(catalog.insert_campaign(&both).await.is_err());
    }

    #[tokio::test]
    async fn migrations_are_not_bound_by_the_request_timeout_and_do_not_lift_it() {
        let url = std::env::var("ADSTACK_TEST_POSTGRES_URL")
            .expect("ADSTACK_TEST_POSTGRES_URL is unset: run the catalog tests through `make test`");
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        // One connection, a 1 ms statement timeout: far less than the DDL takes.
        let config = PostgresConfig {
            url,
            schema: schema.clone(),
            timeout: Duration::from_millis(1),
            max_connections: 1,
            ..Default::default()
        };
        let catalog = Catalog::connect_lazy(&config).expect("config");
        catalog.migrate(&schema).await.expect("migrations run under their own timeout");
        // The pool's connections keep the request-path timeout.
        let slow = sqlx::query("SELECT pg_sleep(0.2)").execute(catalog.pool()).await;
        assert!(slow.is_err(), "a 200 ms statement must still hit the 1 ms request timeout");
    }

    #[tokio::test]
    async fn empty_catalog_yields_no_candidates() {
        let catalog = fresh().await;
        assert!(catalog.eligible_ads(&feed(), &ALL).await.unwrap().is_empty());
    }

    #[test]
    fn demo_catalog_is_deterministic_and_has_coppa_safe_ads() {
        let a = demo_campaigns(10, 4);
        assert_eq!(a.len(), 10);
        assert!(a.iter().flat_map(|c| &c.ads).any(|ad| ad.under13_safe));
        assert_eq!(a[3].bid_cpc_micros, demo_campaigns(10, 4)[3].bid_cpc_micros);
    }
}
