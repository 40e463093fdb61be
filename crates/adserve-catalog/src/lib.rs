//! The ad catalog in PostgreSQL: schema migrations, the eligibility query
//! that turns a request context into candidate ads, and a deterministic demo
//! seed.

use std::time::Duration;

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

/// Targeting inputs of one request.
#[derive(Debug, Clone, Default)]
pub struct Targeting<'a> {
    /// Placement id.
    pub placement: &'a str,
    /// Device class.
    pub device: &'a str,
    /// Under-13 user: only `under13_safe` creatives.
    pub coppa: bool,
}

/// An ad that may run for a request, with its campaign's bid.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct EligibleAd {
    /// Ad id.
    pub ad_id: i64,
    /// Campaign id.
    pub campaign_id: i64,
    /// Creative headline.
    pub title: String,
    /// Where a click goes.
    pub landing_url: String,
    /// Content category.
    pub category: String,
    /// Campaign CPC bid, micro units.
    pub bid_cpc_micros: i64,
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
/// longer, so migrations run on one connection with
/// [`MIGRATION_STATEMENT_TIMEOUT`] instead.
pub async fn migrate(pool: &PgPool, schema: &str, migrator: &sqlx::migrate::Migrator) -> Result<(), CatalogError> {
    let mut conn = pool.acquire().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("SET statement_timeout = '{MIGRATION_STATEMENT_TIMEOUT}'")))
        .execute(&mut *conn)
        .await?;
    if schema != "public" {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
            .execute(&mut *conn)
            .await?;
    }
    // run_direct on the connection itself (not `run` over `Acquire`): the
    // generic form makes callers' futures fail the Send check when spawned.
    let migrated = migrator.run_direct(None, &mut *conn, false).await;
    // Back to the pool's request-path timeout before the connection is reused.
    let reset = sqlx::query("RESET statement_timeout").execute(&mut *conn).await;
    migrated?;
    if reset.is_err() {
        conn.close_on_drop();
    }
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
    /// [`MIGRATION_STATEMENT_TIMEOUT`] instead.
    pub async fn migrate(&self, schema: &str) -> Result<(), CatalogError> {
        migrate(&self.pool, schema, &MIGRATOR).await
    }

    /// The pool, for callers that write to the catalog.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Ads that may run for `targeting`: active ad and campaign, within its
    /// flight dates and daily budget, targeting matched, COPPA respected.
    /// Highest bids first, at most `limit`.
    pub async fn eligible_ads(&self, targeting: &Targeting<'_>, limit: usize) -> Result<Vec<EligibleAd>, CatalogError> {
        let rows = sqlx::query_as::<_, EligibleAd>(
            "SELECT a.id AS ad_id, a.campaign_id, a.title, a.landing_url, a.category, c.bid_cpc_micros
             FROM ads a JOIN campaigns c ON c.id = a.campaign_id
             WHERE a.status = 'active' AND c.status = 'active'
               AND c.spent_today_micros < c.daily_budget_micros
               AND (c.starts_at IS NULL OR c.starts_at <= now())
               AND (c.ends_at IS NULL OR c.ends_at > now())
               AND (cardinality(c.placements) = 0 OR $1 = ANY (c.placements))
               AND (cardinality(c.devices) = 0 OR $2 = ANY (c.devices))
               AND (NOT $3 OR a.under13_safe)
             ORDER BY c.bid_cpc_micros DESC, a.id
             LIMIT $4",
        )
        .bind(targeting.placement)
        .bind(targeting.device)
        .bind(targeting.coppa)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Inserts an advertiser, campaign and its ads; returns the ad ids.
    pub async fn insert_campaign(&self, campaign: &NewCampaign) -> Result<Vec<i64>, CatalogError> {
        let mut tx = self.pool.begin().await?;
        let (advertiser_id,): (i64,) = sqlx::query_as(
            "INSERT INTO advertisers (name) VALUES ($1)
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
        )
        .bind(&campaign.advertiser)
        .fetch_one(&mut *tx)
        .await?;
        let (campaign_id,): (i64,) = sqlx::query_as(
            "INSERT INTO campaigns (advertiser_id, name, bid_cpc_micros, daily_budget_micros, placements, devices)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (advertiser_id, name) DO UPDATE SET bid_cpc_micros = EXCLUDED.bid_cpc_micros
             RETURNING id",
        )
        .bind(advertiser_id)
        .bind(&campaign.name)
        .bind(campaign.bid_cpc_micros)
        .bind(campaign.daily_budget_micros)
        .bind(&campaign.placements)
        .bind(&campaign.devices)
        .fetch_one(&mut *tx)
        .await?;
        let mut ids = Vec::with_capacity(campaign.ads.len());
        for ad in &campaign.ads {
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO ads (campaign_id, title, landing_url, category, under13_safe)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(campaign_id)
            .bind(&ad.title)
            .bind(&ad.landing_url)
            .bind(&ad.category)
            .bind(ad.under13_safe)
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
    /// Campaign name (unique per advertiser).
    pub name: String,
    /// CPC bid, micro units.
    pub bid_cpc_micros: i64,
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
}

/// A deterministic demo catalog: `campaigns` campaigns with `ads_per` ads each,
/// bids spread over 0.20-2.00 per click, every fourth ad under-13-safe.
pub fn demo_campaigns(campaigns: usize, ads_per: usize) -> Vec<NewCampaign> {
    const CATEGORIES: [&str; 5] = ["travel", "games", "finance", "food", "books"];
    (0..campaigns)
        .map(|c| NewCampaign {
            advertiser: format!("advertiser-{}", c % 7),
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
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog in a fresh schema of the test database. Fails (rather than
    /// passing vacuously) when none is configured: `make test` provides one.
    async fn fresh() -> Catalog {
        let url = std::env::var("ADSTACK_TEST_POSTGRES_URL")
            .expect("ADSTACK_TEST_POSTGRES_URL is unset: run the catalog tests through `make test`");
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let config = PostgresConfig { url, schema: schema.clone(), ..Default::default() };
        let catalog = Catalog::connect_lazy(&config).expect("config");
        catalog.migrate(&schema).await.expect("migrates");
        catalog
    }

    fn campaign(name: &str, bid: i64, placements: &[&str], ads: &[(&str, bool)]) -> NewCampaign {
        NewCampaign {
            advertiser: "acme".into(),
            name: name.into(),
            bid_cpc_micros: bid,
            daily_budget_micros: 10_000_000,
            placements: placements.iter().map(|s| s.to_string()).collect(),
            devices: vec![],
            ads: ads
                .iter()
                .map(|(t, safe)| NewAd {
                    title: t.to_string(),
                    landing_url: "https://x".into(),
                    category: "c".into(),
                    under13_safe: *safe,
                })
                .collect(),
        }
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

        let feed = Targeting { placement: "feed_top", device: "mobile", coppa: false };
        let titles: Vec<String> =
            catalog.eligible_ads(&feed, 100).await.unwrap().into_iter().map(|a| a.title).collect();
        assert_eq!(titles, vec!["kids", "adults"]);

        let side = Targeting { placement: "sidebar", ..feed.clone() };
        let titles: Vec<String> =
            catalog.eligible_ads(&side, 100).await.unwrap().into_iter().map(|a| a.title).collect();
        assert_eq!(titles, vec!["side", "kids", "adults"], "highest bid first");

        let kids = Targeting { coppa: true, ..feed };
        let titles: Vec<String> =
            catalog.eligible_ads(&kids, 100).await.unwrap().into_iter().map(|a| a.title).collect();
        assert_eq!(titles, vec!["kids"]);
    }

    #[tokio::test]
    async fn exhausted_budgets_are_not_eligible() {
        let catalog = fresh().await;
        catalog.insert_campaign(&campaign("a", 500_000, &[], &[("x", false)])).await.unwrap();
        sqlx::query("UPDATE campaigns SET spent_today_micros = daily_budget_micros")
            .execute(catalog.pool())
            .await
            .unwrap();
        let t = Targeting { placement: "p", device: "d", coppa: false };
        assert!(catalog.eligible_ads(&t, 10).await.unwrap().is_empty());
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
        // The same connection is back on the request-path timeout.
        let slow = sqlx::query("SELECT pg_sleep(0.2)").execute(catalog.pool()).await;
        assert!(slow.is_err(), "a 200 ms statement must still hit the 1 ms request timeout");
    }

    #[tokio::test]
    async fn empty_catalog_yields_no_candidates() {
        let catalog = fresh().await;
        let t = Targeting { placement: "p", device: "d", coppa: false };
        assert!(catalog.eligible_ads(&t, 10).await.unwrap().is_empty());
    }

    #[test]
    fn demo_catalog_is_deterministic_and_has_coppa_safe_ads() {
        let a = demo_campaigns(10, 4);
        assert_eq!(a.len(), 10);
        assert!(a.iter().flat_map(|c| &c.ads).any(|ad| ad.under13_safe));
        assert_eq!(a[3].bid_cpc_micros, demo_campaigns(10, 4)[3].bid_cpc_micros);
    }
}
