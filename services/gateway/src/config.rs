//! Gateway configuration.

use std::{net::SocketAddr, time::Duration};

use adserve_auction::{Objective, Rules, pacing::PacingConfig};
use adserve_catalog::{CatalogIndexConfig, PostgresConfig, Retrieval};
use adserve_core::{Invalid, ServerConfig, TelemetryConfig, Validate, check_duration, check_range, ports};
use adserve_counters::RedisConfig;
use adserve_events::KafkaConfig;
use serde::{Deserialize, Serialize};

use crate::prediction_cache::PredictionCacheConfig;

/// Everything the gateway reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// gRPC (50051) and metrics (9101) listen addresses.
    pub server: ServerConfig,
    /// HTTP/JSON listen address.
    pub http_addr: SocketAddr,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Ad catalog.
    pub postgres: PostgresConfig,
    /// The catalog in memory ([`adserve_catalog::index`]): eligibility
    /// without a database round trip, and through a PostgreSQL outage.
    pub catalog_index: CatalogIndexConfig,
    /// Impression and click log.
    pub kafka: KafkaConfig,
    /// Where the other services listen.
    pub upstreams: Upstreams,
    /// Per-dependency deadlines.
    pub deadlines: Deadlines,
    /// How many eligible ads are scored per request, and how they are chosen.
    pub retrieval: Retrieval,
    /// The auction's rules, sent with every auction request and used by the
    /// in-process fallback auction.
    pub auction: AuctionRules,
    /// Real-time counters (Redis) the gateway reads: spend (pacing) and
    /// frequency (caps). The stream aggregator writes them.
    pub counters: RedisConfig,
    /// Budget pacing.
    pub pacing: Pacing,
    /// Impressions per user per campaign per UTC day when the campaign sets
    /// no cap of its own; 0 = uncapped.
    pub frequency_cap_per_day: u32,
    /// Feature whose value is the fallback pCTR when the ranker is down.
    pub fallback_pctr_feature: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a client may take to send a request body once its headers
    /// arrived; a slower (trickling or stalled) client gets 408.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Keys of the click tokens ([`crate::click_token`]).
    pub click_tokens: ClickTokenConfig,
    /// Fetches of the click redirect that are not a person's click
    /// ([`crate::click_filter`]).
    pub click_filter: crate::click_filter::ClickFilterConfig,
    /// Publisher API keys and their rate limits ([`crate::auth`]).
    pub auth: AuthConfig,
    /// The OpenRTB 2.5/2.6 endpoint ([`crate::openrtb`]).
    pub openrtb: OpenRtbConfig,
    /// The ranker's scores reused for the same row, ad and model version
    /// ([`crate::prediction_cache`]).
    pub prediction_cache: PredictionCacheConfig,
}

/// How the OpenRTB endpoint bids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpenRtbConfig {
    /// The seat the bids are made from (`seatbid.seat`; a request's `wseat`
    /// and `bseat` are matched against it).
    pub seat: String,
    /// The one currency bids are made in (ISO 4217); budgets and bids in the
    /// catalog are in it. A request that allows only other currencies, or an
    /// imp whose `bidfloorcur` is another one, gets no bid.
    pub currency: String,
    /// `imp.tagid` -> catalog placement (what campaigns target).
    pub placements: std::collections::BTreeMap<String, String>,
    /// The placement of an imp whose `tagid` is absent or not in `placements`.
    pub default_placement: String,
    /// Taken off a request's `tmax` for the network between the exchange and
    /// the gateway: the answer must arrive within `tmax`, not just leave.
    #[serde(with = "humantime_serde")]
    pub network_allowance: Duration,
    /// The public URL of this gateway's `GET /v1/clicks/redirect`, e.g.
    /// `https://ads.example.com/v1/clicks/redirect`. Set: creatives link
    /// through it (the click is recorded, then the browser goes to the
    /// landing page). Empty: creatives link to the landing page, and the
    /// integrator reports clicks with `POST /v1/clicks`.
    pub click_url: String,
    /// The public URL of this gateway's `GET /openrtb2/billing`, e.g.
    /// `https://ads.example.com/openrtb2/billing`. Set: every bid carries a
    /// signed `burl` through it, and its impression is logged billed on
    /// notice: a training row only once the exchange fires the billing
    /// notice (the bid won and the ad was shown) or the ad is clicked, and a
    /// frequency-cap count and a charge only on the notice. Empty: a bid is
    /// taken as shown when it
    /// is made, so bids that lose at the exchange become label-0 rows and
    /// count toward caps and CPM spend.
    pub billing_url: String,
    /// Largest accepted bid request body (exchanges' requests, with `eids`,
    /// `schain` and extensions, run larger than native ones); more is 413.
    pub max_body_bytes: usize,
    /// The keys an exchange encrypts `${AUCTION_PRICE}` with
    /// ([`crate::price_crypto`]). Set: a billing notice's `price` must be
    /// encrypted with them (a decimal one is refused: anyone who saw the
    /// `burl` could log the bid at a price of their choosing first); empty:
    /// only decimal prices are accepted.
    pub price_keys: PriceKeysConfig,
}

/// An exchange's price encryption and integrity keys, as it issues them
/// (web-safe base64 of 32 bytes, or hex). Both or neither.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PriceKeysConfig {
    /// Decrypts the price.
    pub encryption_key: String,
    /// Verifies its signature.
    pub integrity_key: String,
}

impl std::fmt::Debug for PriceKeysConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        let set = |k: &str| if k.is_empty() { "unset" } else { "[redacted]" };
        f.debug_struct("PriceKeysConfig")
            .field("encryption_key", &set(&self.encryption_key))
            .field("integrity_key", &set(&self.integrity_key))
            .finish()
    }
}

impl PriceKeysConfig {
    /// The decoded keys, or `None` when none are configured.
    pub fn decoded(&self) -> Result<Option<crate::price_crypto::PriceKeys>, Invalid> {
        match (self.encryption_key.is_empty(), self.integrity_key.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => {
                let key = |name: &str, text: &str| {
                    crate::price_crypto::decode_key(text)
                        .map_err(|why| Invalid::new(format!("openrtb.price_keys.{name}"), why))
                };
                let encryption = key("encryption_key", &self.encryption_key)?;
                let integrity = key("integrity_key", &self.integrity_key)?;
                if encryption == integrity {
                    return Err(Invalid::new(
                        "openrtb.price_keys.integrity_key",
                        "must differ from encryption_key (exchanges issue two keys)",
                    ));
                }
                Ok(Some(crate::price_crypto::PriceKeys::new(&encryption, &integrity)))
            }
            (true, false) => Err(Invalid::new("openrtb.price_keys.encryption_key", "required with integrity_key")),
            (false, true) => Err(Invalid::new("openrtb.price_keys.integrity_key", "required with encryption_key")),
        }
    }
}

impl Default for OpenRtbConfig {
    fn default() -> Self {
        Self {
            seat: "adserve".into(),
            currency: "USD".into(),
            placements: Default::default(),
            default_placement: "openrtb".into(),
            network_allowance: Duration::from_millis(10),
            click_url: String::new(),
            billing_url: String::new(),
            max_body_bytes: 64 * 1024,
            price_keys: PriceKeysConfig::default(),
        }
    }
}

impl OpenRtbConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let printable = |key: String, v: &str, max: usize| {
            if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
                return Err(Invalid::new(key, format!("must be 1..={max} printable bytes, got {v:?}")));
            }
            Ok(())
        };
        printable("openrtb.seat".into(), &self.seat, 64)?;
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Invalid::new(
                "openrtb.currency",
                format!("must be an ISO 4217 code (3 capitals), got {:?}", self.currency),
            ));
        }
        // The same limit as the request contract's context.placement.
        printable("openrtb.default_placement".into(), &self.default_placement, 64)?;
        for (tag, placement) in &self.placements {
            printable(format!("openrtb.placements.{tag:?}"), placement, 64)?;
        }
        check_duration("openrtb.network_allowance", self.network_allowance, Duration::ZERO, Duration::from_secs(1))?;
        check_range("openrtb.max_body_bytes", self.max_body_bytes, 256..=64 * 1024 * 1024)?;
        for (key, url) in [("openrtb.click_url", &self.click_url), ("openrtb.billing_url", &self.billing_url)] {
            if !url.is_empty()
                && (!(url.starts_with("https://") || url.starts_with("http://"))
                    || url.contains(['?', '#'])
                    || url.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(Invalid::new(
                    key,
                    format!("must be empty or an http(s) URL without query or fragment, got {url:?}"),
                ));
            }
        }
        self.price_keys.decoded()?;
        Ok(())
    }
}

/// Publisher API keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Empty: no authentication (the local stack; the gateway warns at start).
    pub api_keys: Vec<ApiKey>,
}

/// One publisher's key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds the key: the `publisher` label of its metrics.
    pub publisher: String,
    /// SHA-256 of the key, 64 hex digits (`printf %s "$KEY" | sha256sum`);
    /// the key itself is never configured.
    pub sha256: String,
    /// Sustained requests per second, ads and clicks together.
    pub requests_per_second: u32,
    /// Requests allowed at once above the sustained rate (the bucket size).
    pub burst: u32,
}

impl AuthConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let key = |field: &str| format!("auth.api_keys[{i}].{field}");
            if k.publisher.is_empty() || k.publisher.len() > 64 || k.publisher.chars().any(char::is_control) {
                return Err(Invalid::new(key("publisher"), "must be 1..=64 printable characters"));
            }
            if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Invalid::new(key("sha256"), "must be the key's SHA-256, 64 hex digits"));
            }
            if !seen.insert(k.sha256.to_ascii_lowercase()) {
                return Err(Invalid::new(key("sha256"), "the same key is configured twice"));
            }
            check_range(&key("requests_per_second"), k.requests_per_second, 1..=1_000_000)?;
            check_range(&key("burst"), k.burst, 1..=1_000_000)?;
        }
        Ok(())
    }
}

/// Keys that sign and verify click tokens.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClickTokenConfig {
    /// Hex or base64, at least 32 bytes each. The first signs, all verify
    /// (rotation: prepend the new key; drop the old one a label window
    /// later). Every replica needs the same keys. Empty: a random key per
    /// process, for a single local gateway only (tokens then die with the
    /// process); the gateway warns at start.
    pub keys: Vec<String>,
}

impl std::fmt::Debug for ClickTokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("ClickTokenConfig").field("keys", &format_args!("[{} redacted]", self.keys.len())).finish()
    }
}

impl ClickTokenConfig {
    /// The decoded keys; a fresh random one when none is configured.
    pub fn decoded(&self) -> Result<Vec<Vec<u8>>, Invalid> {
        if self.keys.is_empty() {
            let mut key = vec![0u8; crate::click_token::MIN_KEY_BYTES];
            getrandom::fill(&mut key).map_err(|e| Invalid::new("click_tokens.keys", format!("no randomness: {e}")))?;
            return Ok(vec![key]);
        }
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                crate::click_token::decode_key(k).map_err(|why| Invalid::new(format!("click_tokens.keys[{i}]"), why))
            })
            .collect()
    }
}

/// The auction's rules (adserve_auction::Rules, less the per-request slots and seed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuctionRules {
    /// Request-wide reserve eCPM, micro units; 0 is none. Each candidate's
    /// own floor (from the catalog's floors) applies where higher.
    pub reserve_ecpm_micros: i64,
    /// Exponent alpha of ad quality in the eCPM, `[0, 4]`.
    pub quality_exponent: f64,
    /// Most slots one advertiser may take per response; 0 = no cap.
    pub max_per_advertiser: usize,
    /// Share of slots filled by exploration (epsilon-greedy), `[0, 1)`.
    pub exploration_share: f64,
    /// Rank by `pctr_weight x pCTR + pcvr_weight x pCVR + ecpm_weight x
    /// eCPM` instead of eCPM (absent: eCPM).
    pub objective: Option<ObjectiveWeights>,
}

/// Weights of a multi-objective ranking.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveWeights {
    /// Weight of pCTR.
    pub pctr_weight: f64,
    /// Weight of pCVR.
    pub pcvr_weight: f64,
    /// Weight of eCPM in currency units per mille (> 0).
    pub ecpm_weight: f64,
}

impl Default for AuctionRules {
    fn default() -> Self {
        Self {
            reserve_ecpm_micros: adserve_auction::DEFAULT_RESERVE_ECPM_MICROS,
            quality_exponent: 1.0,
            max_per_advertiser: 2,
            exploration_share: 0.0,
            objective: None,
        }
    }
}

impl AuctionRules {
    /// The auction's rules for one request.
    pub fn rules(&self, slots: usize, seed: u64) -> Rules {
        Rules {
            slots,
            reserve_ecpm_micros: self.reserve_ecpm_micros,
            quality_exponent: self.quality_exponent,
            max_per_advertiser: self.max_per_advertiser,
            objective: match self.objective {
                None => Objective::Ecpm,
                Some(w) => Objective::Weighted { pctr: w.pctr_weight, pcvr: w.pcvr_weight, ecpm: w.ecpm_weight },
            },
            exploration: self.exploration_share,
            seed,
        }
    }
}

/// Budget pacing settings (adserve_auction::pacing::PacingConfig, plus how
/// often it runs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Pacing {
    /// Off: campaigns bid on every request until their budget is spent (the
    /// hard stop still applies).
    pub enabled: bool,
    /// How often spend is read and rates re-planned.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rates older than this (Redis unreachable) are reported as degraded.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// Rate of a campaign not yet planned today.
    pub initial_rate: f64,
    /// Lowest rate of a campaign with budget left.
    pub min_rate: f64,
    /// Largest factor a rate changes by per interval.
    pub max_step: f64,
    /// Memory of the spend estimate, as a share of a day's traffic.
    pub memory: f64,
    /// How late spend reaches the counters (CPC charges land with clicks).
    #[serde(with = "humantime_serde")]
    pub spend_lag: Duration,
    /// Expected share of traffic per UTC hour (24 weights).
    pub hourly_traffic: Vec<f64>,
}

impl Default for Pacing {
    fn default() -> Self {
        let c = PacingConfig::default();
        Self {
            enabled: true,
            interval: Duration::from_secs(5),
            max_staleness: Duration::from_secs(60),
            initial_rate: c.initial_rate,
            min_rate: c.min_rate,
            max_step: c.max_step,
            memory: c.memory,
            spend_lag: Duration::from_secs(c.spend_lag_seconds),
            hourly_traffic: c.hourly_traffic.to_vec(),
        }
    }
}

impl Pacing {
    /// The controller's settings.
    pub fn controller(&self) -> PacingConfig {
        let mut hourly = [0.0; 24];
        for (h, w) in hourly.iter_mut().zip(&self.hourly_traffic) {
            *h = *w;
        }
        PacingConfig {
            initial_rate: self.initial_rate,
            min_rate: self.min_rate,
            max_step: self.max_step,
            memory: self.memory,
            spend_lag_seconds: self.spend_lag.as_secs(),
            hourly_traffic: hourly,
        }
    }
}

/// gRPC endpoints of the other services.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Upstreams {
    /// feature-service URL.
    pub feature_service: String,
    /// ranker URL.
    pub ranker: String,
    /// auction URL.
    pub auction: String,
    /// TLS to every upstream (the URLs are then `https://`): the CA their
    /// certificates chain to, and this gateway's own certificate when they
    /// require mutual TLS. Absent: plaintext `http://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<adserve_core::tls::ClientTls>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            feature_service: ports::local_url(ports::FEATURE_SERVICE_GRPC),
            ranker: ports::local_url(ports::RANKER_GRPC),
            auction: ports::local_url(ports::AUCTION_GRPC),
            tls: None,
        }
    }
}

/// How long a request, and each dependency within it, may take.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Deadlines {
    /// The whole answer, impression log included, when the request names no
    /// shorter `tmax_ms` or gRPC deadline. Each hop below gets the smaller of
    /// its own deadline and what is left of this, less `kafka.publish_timeout`
    /// (set aside for the impression log).
    #[serde(with = "humantime_serde")]
    pub request: Duration,
    /// Catalog eligibility query.
    #[serde(with = "humantime_serde")]
    pub catalog: Duration,
    /// Feature-service call.
    #[serde(with = "humantime_serde")]
    pub features: Duration,
    /// Ranker call.
    #[serde(with = "humantime_serde")]
    pub ranker: Duration,
    /// Auction call.
    #[serde(with = "humantime_serde")]
    pub auction: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            request: Duration::from_millis(500),
            catalog: Duration::from_millis(200),
            features: Duration::from_millis(150),
            ranker: Duration::from_millis(250),
            auction: Duration::from_millis(50),
        }
    }
}

/// The gateway's default `kafka.publish_timeout`: the impression log's share
/// of a request's budget (`deadlines.request`).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_millis(150);

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_ports(ports::GATEWAY_GRPC, ports::GATEWAY_METRICS),
            http_addr: SocketAddr::from(([127, 0, 0, 1], ports::GATEWAY_HTTP)),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            catalog_index: CatalogIndexConfig::default(),
            // The impression log's timeout is part of every request's budget:
            // shorter than the other services' default.
            kafka: KafkaConfig { publish_timeout: DEFAULT_PUBLISH_TIMEOUT, ..KafkaConfig::default() },
            upstreams: Upstreams::default(),
            deadlines: Deadlines::default(),
            retrieval: Retrieval::default(),
            auction: AuctionRules::default(),
            counters: RedisConfig::default(),
            pacing: Pacing::default(),
            frequency_cap_per_day: 0,
            fallback_pctr_feature: adserve_features::prior::DEFAULT_PRIOR_FEATURE.into(),
            max_body_bytes: 16 * 1024,
            body_timeout: Duration::from_secs(2),
            click_tokens: ClickTokenConfig::default(),
            auth: AuthConfig::default(),
            openrtb: OpenRtbConfig::default(),
            prediction_cache: PredictionCacheConfig::default(),
            click_filter: crate::click_filter::ClickFilterConfig::default(),
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        self.postgres.validate()?;
        self.catalog_index.validate("catalog_index")?;
        self.prediction_cache.validate("prediction_cache")?;
        self.click_filter.validate("click_filter")?;
        self.kafka.validate()?;
        for (key, url) in [
            ("upstreams.feature_service", &self.upstreams.feature_service),
            ("upstreams.ranker", &self.upstreams.ranker),
            ("upstreams.auction", &self.upstreams.auction),
        ] {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(Invalid::new(key, format!("must be an http(s) URL, got {url:?}")));
            }
            adserve_core::tls::check_scheme(key, url, self.upstreams.tls.is_some())?;
        }
        if let Some(tls) = &self.upstreams.tls {
            tls.load("upstreams.tls")?;
        }
        let d = &self.deadlines;
        let (min, max) = (Duration::from_millis(1), Duration::from_secs(60));
        check_duration("deadlines.request", d.request, min, max)?;
        let least = self.kafka.publish_timeout + crate::budget::MIN_PIPELINE;
        if d.request < least {
            return Err(Invalid::new(
                "deadlines.request",
                format!(
                    "must be at least kafka.publish_timeout + {} ms = {} ms (the impression log's reserve), got {} ms",
                    crate::budget::MIN_PIPELINE.as_millis(),
                    least.as_millis(),
                    d.request.as_millis()
                ),
            ));
        }
        check_duration("deadlines.catalog", d.catalog, min, max)?;
        check_duration("deadlines.features", d.features, min, max)?;
        check_duration("deadlines.ranker", d.ranker, min, max)?;
        check_duration("deadlines.auction", d.auction, min, max)?;
        self.retrieval.validate("retrieval", adserve_auction::MAX_CANDIDATES)?;
        // The auction's own checks, on a one-slot request: one definition of the limits.
        match self.auction.rules(1, 0).check() {
            // The rule names are the config keys: auction.quality_exponent, ...
            Err(adserve_auction::AuctionError::Rule { field, reason }) => {
                return Err(Invalid::new(format!("auction.{field}"), reason));
            }
            Err(e) => return Err(Invalid::new("auction", e.to_string())),
            Ok(()) => {}
        }
        self.counters.validate("counters")?;
        let p = &self.pacing;
        check_duration("pacing.interval", p.interval, Duration::from_millis(100), Duration::from_secs(3600))?;
        check_duration("pacing.max_staleness", p.max_staleness, p.interval, Duration::from_secs(86_400))?;
        check_duration("pacing.spend_lag", p.spend_lag, Duration::ZERO, Duration::from_secs(86_400))?;
        if p.hourly_traffic.len() != 24 {
            return Err(Invalid::new(
                "pacing.hourly_traffic",
                format!("must have 24 weights, got {}", p.hourly_traffic.len()),
            ));
        }
        if let Err((field, why)) = p.controller().validate() {
            return Err(Invalid::new(format!("pacing.{field}"), why));
        }
        if adserve_features::registry().index_of(&self.fallback_pctr_feature).is_none() {
            return Err(Invalid::new(
                "fallback_pctr_feature",
                format!("{:?} is not in the feature registry", self.fallback_pctr_feature),
            ));
        }
        check_range("max_body_bytes", self.max_body_bytes, 256..=64 * 1024 * 1024)?;
        check_duration("body_timeout", self.body_timeout, Duration::from_millis(10), Duration::from_secs(300))?;
        self.click_tokens.decoded()?;
        self.auth.validate()?;
        self.openrtb.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_the_log_fits_the_budget() {
        let c = GatewayConfig::default();
        c.validate().unwrap();
        assert!(c.kafka.publish_timeout + crate::budget::MIN_PIPELINE <= c.deadlines.request);
    }

    #[test]
    fn click_token_keys_must_decode_and_be_long_enough() {
        let mut c = GatewayConfig::default();
        c.click_tokens.keys = vec!["ab".repeat(32), "abcd".into()];
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "click_tokens.keys[1]", "{e}");
        c.click_tokens.keys.pop();
        c.validate().unwrap();
        assert_eq!(c.click_tokens.decoded().unwrap(), vec![vec![0xab; 32]]);
        // Debug output never shows a key.
        assert!(!format!("{c:?}").contains("abab"));
        // Without keys: one random key per process.
        let random = GatewayConfig::default().click_tokens.decoded().unwrap();
        assert_eq!(random.len(), 1);
        assert_ne!(random, GatewayConfig::default().click_tokens.decoded().unwrap());
    }

    #[test]
    fn a_request_budget_without_room_for_the_impression_log_is_refused() {
        let mut c = GatewayConfig::default();
        c.deadlines.request = c.kafka.publish_timeout;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "deadlines.request", "{e}");
        assert!(e.to_string().contains("kafka.publish_timeout"), "{e}");
    }
}
