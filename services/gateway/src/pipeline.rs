//! One ad request, end to end: eligibility -> features -> scores -> auction ->
//! acknowledged impression events -> answer.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use adserve_catalog::{Catalog, CatalogIndex, EligibleAd, Targeting};
use adserve_counters::{Counters, day_of};
use adserve_events::EventPublisher;
use adserve_features::request::{FieldError, check_context, check_user_id};
use adserve_proto::{
    degraded, no_fill,
    v1::{
        AdWinner, AuctionCandidate, ClickEvent, Degradation, FeatureMatrix, FeatureRow, GetAdsRequest, GetAdsResponse,
        GetFeaturesRequest, ImpressionEvent, RecordClickRequest, RecordClickResponse, RequestContext, ScoreLevel,
        ScoreRequest, auction_service_client::AuctionServiceClient, feature_service_client::FeatureServiceClient,
        ranker_service_client::RankerServiceClient,
    },
};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::{
    ServeError,
    budget::{self, Budget},
    click_token::ClickTokens,
    config::GatewayConfig,
    pacing::{PacingState, Verdict, unix_now},
    prediction_cache::PredictionCache,
};

/// Model version reported when the ranker was unavailable.
pub const FALLBACK_MODEL_VERSION: &str = adserve_features::prior::PRIOR_MODEL_VERSION;

/// Everything one request needs; cheap to clone (channels and pools are shared).
#[derive(Clone, Debug)]
pub struct AdServer {
    catalog: Catalog,
    /// The catalog in memory (`catalog_index.enabled`).
    index: Option<CatalogIndex>,
    features: FeatureServiceClient<Channel>,
    ranker: RankerServiceClient<Channel>,
    auction: AuctionServiceClient<Channel>,
    events: EventPublisher,
    counters: Counters,
    pacing: Arc<PacingState>,
    click_tokens: ClickTokens,
    /// Decrypt encrypted clearing prices (`openrtb.price_keys`).
    price_keys: Option<crate::price_crypto::PriceKeys>,
    /// Click-redirect fetches that are not a person's click.
    click_filter: crate::click_filter::ClickFilter,
    publishers: crate::auth::Publishers,
    /// The ranker's scores, reused ([`crate::prediction_cache`]).
    prediction_cache: Arc<PredictionCache>,
    config: Arc<GatewayConfig>,
}

/// What a `Score` call tells the ranker's shadow about its rows.
struct Shadowed {
    /// Each row's ad.
    ad_ids: Vec<i64>,
    /// Every row of the request, whatever the prediction cache held.
    whole_request: bool,
}

fn lazy_channel(url: &str, name: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, ServeError> {
    let mut endpoint = adserve_core::net::grpc_endpoint(url)
        .map_err(|e| ServeError::InvalidArgument(format!("upstreams.{name}: {e}")))?;
    if let Some(tls) = tls {
        endpoint =
            endpoint.tls_config(tls.clone()).map_err(|e| ServeError::InvalidArgument(format!("upstreams.tls: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

impl AdServer {
    /// Wires the gateway to its dependencies. Nothing connects yet: a
    /// dependency that is down shows up as a degradation per request.
    /// Call from within a Tokio runtime: the counters' client starts
    /// connecting, and the budget pacer starts planning, in the background.
    pub fn new(config: GatewayConfig, catalog: Catalog, events: EventPublisher) -> Result<Self, ServeError> {
        // The same checks as at start-up, for gateways built in code.
        adserve_core::Validate::validate(&config).map_err(|e| ServeError::InvalidArgument(e.to_string()))?;
        let counters = Counters::new(
            adserve_counters::client(&config.counters)
                .map_err(|e| ServeError::InvalidArgument(format!("counters.url: {e}")))?,
        );
        let keys = config.click_tokens.decoded().map_err(|e| ServeError::InvalidArgument(e.to_string()))?;
        if config.click_tokens.keys.is_empty() {
            tracing::warn!(
                "click_tokens.keys is empty: signing clicks with a random key of this process; \
                 tokens will not verify after a restart or on another replica"
            );
        }
        // A click later than the label window is neither a label nor charged.
        let click_tokens = ClickTokens::new(keys, adserve_features::registry().label.window());
        let price_keys = config.openrtb.price_keys.decoded().map_err(|e| ServeError::InvalidArgument(e.to_string()))?;
        let publishers = crate::auth::Publishers::new(&config.auth.api_keys);
        if publishers.is_open() {
            tracing::warn!("auth.api_keys is empty: ad requests and clicks are served without an API key");
        }
        let index = config.catalog_index.enabled.then(|| {
            CatalogIndex::spawn(catalog.pool().clone(), &config.postgres.schema, config.catalog_index.clone())
        });
        let pacing = Arc::new(PacingState::default());
        crate::pacing::spawn(config.pacing.clone(), catalog.clone(), counters.clone(), Arc::downgrade(&pacing));
        // The upstreams' TLS files, read once for the three channels.
        let tls = match &config.upstreams.tls {
            Some(tls) => Some(tls.load("upstreams.tls").map_err(|e| ServeError::InvalidArgument(e.to_string()))?),
            None => None,
        };
        let channel = |url: &str, name: &str| lazy_channel(url, name, tls.as_ref());
        let ranker = RankerServiceClient::new(channel(&config.upstreams.ranker, "ranker")?);
        let prediction_cache = PredictionCache::new(config.prediction_cache.clone());
        if config.prediction_cache.enabled {
            crate::prediction_cache::follow(
                Arc::downgrade(&prediction_cache),
                ranker.clone(),
                config.prediction_cache.refresh,
            );
        }
        Ok(Self {
            features: FeatureServiceClient::new(channel(&config.upstreams.feature_service, "feature_service")?),
            ranker,
            auction: AuctionServiceClient::new(channel(&config.upstreams.auction, "auction")?),
            catalog,
            index,
            events,
            counters,
            pacing,
            click_tokens,
            price_keys,
            click_filter: crate::click_filter::ClickFilter::new(&config.click_filter),
            publishers,
            prediction_cache,
            config: Arc::new(config),
        })
    }

    /// The keys of encrypted clearing prices, when configured.
    pub(crate) fn price_keys(&self) -> Option<&crate::price_crypto::PriceKeys> {
        self.price_keys.as_ref()
    }

    /// The prediction cache (what it knows the ranker serves, for tests and
    /// diagnostics).
    pub fn prediction_cache(&self) -> &PredictionCache {
        &self.prediction_cache
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Admits a request presenting API key `key` ([`crate::auth`]), or
    /// refuses it (401 / 429), counted in `adserve_gateway_auth_refused_total`.
    pub fn admit(&self, key: Option<&str>) -> Result<(), ServeError> {
        use crate::auth::Refusal;
        let refused = |reason: &'static str, publisher: &str| {
            metrics::counter!("adserve_gateway_auth_refused_total", "reason" => reason, "publisher" => publisher.to_string())
                .increment(1);
        };
        match self.publishers.admit(key) {
            Ok(_) => Ok(()),
            Err(Refusal::Missing) => {
                refused("missing", "");
                Err(ServeError::Unauthenticated("api key: required (Authorization: Bearer <key>, or x-api-key)".into()))
            }
            Err(Refusal::Unknown) => {
                refused("unknown", "");
                Err(ServeError::Unauthenticated("api key: not recognised".into()))
            }
            Err(Refusal::Limited { publisher, retry_after }) => {
                refused("rate_limited", &publisher);
                Err(ServeError::RateLimited { publisher, retry_after })
            }
        }
    }

    /// Waits up to `limit` for the catalog index's first snapshot (with the
    /// index off, or PostgreSQL down, requests query PostgreSQL until it
    /// loads).
    pub async fn wait_for_catalog(&self, limit: Duration) {
        if let Some(index) = &self.index
            && !index.wait_loaded(limit).await
        {
            tracing::warn!("catalog index not loaded yet; querying PostgreSQL per request until it is");
        }
    }

    /// Waits up to `limit` for the counters' first connection, so the first
    /// requests after start do not all degrade while it is being made. Redis
    /// being down is not fatal: the client keeps connecting in the background.
    pub async fn wait_for_counters(&self, limit: Duration) {
        if !self.counters.wait_for_connect(limit).await {
            tracing::warn!(url = %self.config.counters.url, "counters (redis) not reachable yet; degrading until they are");
        }
    }

    /// Serves one ad request within its budget: `tmax_ms`, the caller's
    /// gRPC deadline (`caller_deadline`) or `deadlines.request`, whichever is
    /// shortest ([`budget`]).
    pub async fn serve(
        &self,
        req: GetAdsRequest,
        caller_deadline: Option<Duration>,
    ) -> Result<GetAdsResponse, ServeError> {
        Ok(self.serve_with(req, caller_deadline, ServeOptions::default()).await?.response)
    }

    /// [`serve`](Self::serve), with what a face other than the native API
    /// adds (the OpenRTB endpoint: anonymous users, a publisher's floor), and
    /// each winner's creative details beside the answer.
    pub async fn serve_with(
        &self,
        req: GetAdsRequest,
        caller_deadline: Option<Duration>,
        options: ServeOptions,
    ) -> Result<Served, ServeError> {
        let started = Instant::now();
        let checked = validate_with(&req, options.anonymous)?;
        let log_reserve = self.config.kafka.publish_timeout;
        let total = budget::requested(req.tmax_ms, caller_deadline, self.config.deadlines.request, log_reserve)?;
        let budget = Budget::new(started, total, log_reserve);
        let ctx = checked.context;
        let request_uuid = uuid::Uuid::now_v7();
        let request_id = request_uuid.to_string();
        // The auction's exploration and the pacer's draws: reproducible per request.
        let seed = seed_of(&request_uuid);
        let d = &self.config.deadlines;
        let mut degraded = Vec::new();
        // COPPA: the user id is neither used (features, caps) nor logged.
        let user_id = if ctx.coppa { String::new() } else { req.user_id.clone() };
        let day = day_of(unix_now());

        let targeting = Targeting {
            placement: &ctx.placement,
            device: &ctx.device,
            coppa: ctx.coppa,
            blocked_categories: &checked.blocked_categories,
            blocked_advertisers: &checked.blocked_advertisers,
        };
        // The first hops always have time: the budget is at least the log's
        // reserve plus MIN_PIPELINE.
        let catalog_limit = budget.for_hop(d.catalog).unwrap_or(budget::MIN_HOP);
        let (ads, seen) = tokio::join!(
            timed(Hop::Catalog, self.eligible(&targeting, catalog_limit)),
            self.frequency(day, &user_id, &budget),
        );
        let (ads, stale) = ads.map_err(|e| unavailable("catalog", e))?;
        degraded.extend(stale);
        if ads.is_empty() {
            return Ok(Served::nothing(no_fill(request_id, 0, degraded, no_fill::NO_ELIGIBLE_ADS, "")));
        }
        let seen = seen.unwrap_or_else(|e| {
            degraded.push(Degradation {
                component: degraded::REDIS.into(),
                reason: format!("frequency caps not applied: redis: {e}"),
            });
            HashMap::new()
        });
        let ads = self.apply_caps_and_pacing(ads, &seen, seed, &mut degraded);
        if ads.is_empty() {
            return Ok(Served::nothing(no_fill(request_id, 0, degraded, no_fill::CAPPED_OR_PACED, "")));
        }
        let ad_ids: Vec<i64> = ads.iter().map(|a| a.ad_id).collect();

        let matrix = timed(Hop::Features, self.features(&user_id, &ad_ids, &ctx, &budget, &mut degraded)).await;
        let scores =
            timed(Hop::Ranker, self.scores(&matrix, &ads, &user_id, &request_id, &budget, &mut degraded)).await;
        let candidates: Vec<AuctionCandidate> = ads
            .iter()
            .zip(&scores.pctr)
            .map(|(ad, &pctr)| AuctionCandidate {
                ad_id: ad.ad_id,
                campaign_id: ad.campaign_id,
                advertiser_id: ad.advertiser_id,
                bid_cpc_micros: ad.bid_cpc_micros.unwrap_or(0),
                bid_cpm_micros: ad.bid_cpm_micros.unwrap_or(0),
                pctr,
                pcvr: 0.0,
                quality: ad.quality,
                // The caller's floor raises every reserve; the catalog's may be higher.
                reserve_ecpm_micros: ad.reserve_ecpm_micros.max(options.floor_ecpm_micros),
            })
            .collect();
        let rules = self.config.auction.rules(req.slots as usize, seed);
        let mut winners = timed(Hop::Auction, self.auction(candidates, &rules, &budget, &mut degraded)).await?;
        // The auction's reserve is on quality-weighted eCPM; a caller's floor
        // is on the price actually paid per mille. A winner whose price falls
        // below it is dropped here, before anything is logged: an impression
        // that is not served must not become a training row.
        if options.floor_ecpm_micros > 0 {
            let before = winners.len();
            winners.retain(|w| price_per_mille_micros(w) >= options.floor_ecpm_micros);
            let dropped = (before - winners.len()) as u64;
            if dropped > 0 {
                metrics::counter!("adserve_gateway_candidates_dropped_total", "reason" => "below_floor")
                    .increment(dropped);
            }
        }
        if winners.is_empty() {
            return Ok(Served::nothing(no_fill(
                request_id,
                ads.len(),
                degraded,
                no_fill::BELOW_RESERVE,
                scores.headline(),
            )));
        }

        // The answer names the model that scored its best ad.
        let model_version = winners
            .first()
            .and_then(|w| ad_ids.iter().position(|id| *id == w.ad_id))
            .map_or(scores.headline(), |row| scores.version(row))
            .to_string();
        let now = std::time::SystemTime::now();
        let served_at = prost_types::Timestamp::from(now);
        let served_ms = unix_ms(now);
        let mut out = Vec::with_capacity(winners.len());
        let mut creatives = Vec::with_capacity(winners.len());
        let mut events = Vec::with_capacity(winners.len());
        let impression_ids = adserve_events::answer_impression_ids(winners.len());
        for (w, impression_id) in winners.into_iter().zip(impression_ids) {
            let row = ad_ids
                .iter()
                .position(|id| *id == w.ad_id)
                .ok_or_else(|| ServeError::Unavailable(format!("auction returned unknown ad {}", w.ad_id)))?;
            let ad: &EligibleAd = &ads[row];
            events.push(ImpressionEvent {
                impression_id: impression_id.clone(),
                request_id: request_id.clone(),
                user_id: user_id.clone(),
                ad_id: w.ad_id,
                campaign_id: w.campaign_id,
                slot: w.slot,
                placement: ctx.placement.clone(),
                device: ctx.device.clone(),
                surface: ctx.surface.clone(),
                coppa: ctx.coppa,
                served_at: Some(served_at),
                model_version: scores.version(row).to_string(),
                pctr: w.pctr,
                ecpm_micros: w.ecpm_micros,
                price_cpc_micros: w.price_cpc_micros,
                features: Some(FeatureRow {
                    names: matrix.feature_names.clone(),
                    values: matrix.row(row).map(<[f32]>::to_vec).unwrap_or_default(),
                    categorical_names: matrix.categorical_names.clone(),
                    categorical_ids: matrix.categorical_row(row).map(<[i64]>::to_vec).unwrap_or_default(),
                    embedding_names: matrix.embedding_names.clone(),
                    embedding_dims: matrix.embedding_dims.clone(),
                    embedding_values: matrix.embedding_row(row).map(<[f32]>::to_vec).unwrap_or_default(),
                }),
                advertiser_id: w.advertiser_id,
                price_cpm_micros: w.price_cpm_micros,
                propensity: w.propensity,
                explored: w.explored,
                billed_on_notice: options.billed_on_notice,
                score_level: scores.level(row) as i32,
            });
            let price_per_mille_micros = price_per_mille_micros(&w);
            creatives.push(Creative {
                advertiser_domain: ad.advertiser_domain.clone(),
                category: ad.category.clone(),
                price_per_mille_micros,
                model_version: scores.version(row).to_string(),
                billing_token: if options.billed_on_notice {
                    self.click_tokens.sign_billing(&impression_id, w.ad_id, served_ms, price_per_mille_micros)
                } else {
                    String::new()
                },
            });
            out.push(AdWinner {
                click_token: self.click_tokens.sign(&impression_id, w.ad_id, served_ms),
                impression_id,
                ad_id: w.ad_id,
                campaign_id: w.campaign_id,
                title: ad.title.clone(),
                landing_url: ad.landing_url.clone(),
                slot: w.slot,
                pctr: w.pctr,
                bid_cpc_micros: w.bid_cpc_micros,
                ecpm_micros: w.ecpm_micros,
                price_cpc_micros: w.price_cpc_micros,
                bid_cpm_micros: w.bid_cpm_micros,
                price_cpm_micros: w.price_cpm_micros,
            });
        }
        // No lost events: the ads are returned only after the broker has every
        // impression; and no phantom ones: the answer's impressions are one
        // message, logged whole or not at all.
        timed(Hop::ImpressionLog, self.events.impressions(&events))
            .await
            .map_err(|e| unavailable("impression log (kafka)", e))?;
        for d in &degraded {
            metrics::counter!("adserve_gateway_degraded_total", "component" => d.component.clone()).increment(1);
        }
        metrics::histogram!("adserve_gateway_request_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("adserve_gateway_impressions_total").increment(out.len() as u64);
        Ok(Served {
            response: GetAdsResponse {
                request_id,
                winners: out,
                model_version,
                candidates: ads.len() as u32,
                degraded,
                no_fill_reason: String::new(),
            },
            creatives,
        })
    }

    /// The eligible ads: from the catalog index when it has a snapshot (with
    /// a degradation when that is older than `catalog_index.max_staleness`),
    /// else from PostgreSQL within `limit`.
    async fn eligible(
        &self,
        targeting: &Targeting<'_>,
        limit: Duration,
    ) -> Result<(Vec<EligibleAd>, Option<Degradation>), CallError> {
        if let Some(snapshot) = self.index.as_ref().and_then(CatalogIndex::snapshot) {
            let age = snapshot.age();
            let stale = (age > self.config.catalog_index.max_staleness).then(|| Degradation {
                component: degraded::CATALOG.into(),
                reason: format!(
                    "serving the catalog as read {} s ago: PostgreSQL could not be read since",
                    age.as_secs()
                ),
            });
            return Ok((snapshot.eligible_ads(targeting, &self.config.retrieval), stale));
        }
        let ads = deadline(limit, self.catalog.eligible_ads(targeting, &self.config.retrieval)).await?;
        Ok((ads, None))
    }

    /// The user's impressions per campaign today; empty without a user.
    async fn frequency(&self, day: u64, user_id: &str, budget: &Budget) -> Result<HashMap<i64, i64>, CallError> {
        if user_id.is_empty() {
            return Ok(HashMap::new());
        }
        let limit = budget.for_hop(self.config.counters.timeout).unwrap_or(budget::MIN_HOP);
        deadline(limit, self.counters.frequency(day, user_id)).await
    }

    /// Drops ads whose campaign the user has seen its cap of times today,
    /// and ads whose campaign budget pacing holds back (or whose budget is
    /// spent); reports stale pacing rates.
    fn apply_caps_and_pacing(
        &self,
        ads: Vec<EligibleAd>,
        seen: &HashMap<i64, i64>,
        seed: u64,
        degraded: &mut Vec<Degradation>,
    ) -> Vec<EligibleAd> {
        let rates = self.pacing.rates();
        if let Some(age) = rates.planned_at.map(|t| t.elapsed())
            && age > self.config.pacing.max_staleness
        {
            degraded.push(Degradation {
                component: degraded::REDIS.into(),
                reason: format!("budget pacing rates are {} s old; spend could not be read", age.as_secs()),
            });
        }
        let default_cap = self.config.frequency_cap_per_day;
        let (mut capped, mut throttled, mut spent) = (0u64, 0u64, 0u64);
        let kept: Vec<EligibleAd> = ads
            .into_iter()
            .filter(|ad| {
                let cap = ad.frequency_cap_per_day.map_or(default_cap as i64, i64::from);
                if cap > 0 && seen.get(&ad.campaign_id).copied().unwrap_or(0) >= cap {
                    capped += 1;
                    return false;
                }
                match rates.verdict(ad.campaign_id, seed) {
                    Verdict::Admit => true,
                    Verdict::Throttled => {
                        throttled += 1;
                        false
                    }
                    Verdict::OutOfBudget => {
                        spent += 1;
                        false
                    }
                }
            })
            .collect();
        for (reason, n) in [("frequency_cap", capped), ("pacing", throttled), ("out_of_budget", spent)] {
            if n > 0 {
                metrics::counter!("adserve_gateway_candidates_dropped_total", "reason" => reason).increment(n);
            }
        }
        kept
    }

    /// Records a click once the broker has acknowledged it, if its token
    /// proves the impression was served here within the label window and it
    /// is the impression's first click. The stream aggregator charges a CPC
    /// impression's price to its campaign from the logged click (once per
    /// impression, within the label window).
    pub async fn click(&self, req: RecordClickRequest) -> Result<RecordClickResponse, ServeError> {
        let impression_id = click_fields(&req)?;
        let claims = self
            .click_tokens
            .verify(&req.click_token, impression_id, unix_ms(SystemTime::now()))
            .map_err(token_refused)?;
        // Replays: the first click marks the impression for the label window.
        // Without Redis the click is still logged: the joiner and the
        // aggregator count one click per impression whatever arrives.
        let ttl = adserve_features::registry().label.window();
        let limit = self.config.counters.timeout;
        let marked = match deadline(limit, self.counters.mark_clicked(impression_id, ttl)).await {
            Ok(true) => true,
            Ok(false) => {
                metrics::counter!("adserve_gateway_clicks_refused_total", "reason" => "replay").increment(1);
                return Err(ServeError::AlreadyRecorded(format!(
                    "impression_id: a click on {impression_id} is already recorded"
                )));
            }
            Err(e) => {
                tracing::warn!(error = %e, "click replay guard (redis) unavailable; logging the click unguarded");
                metrics::counter!("adserve_gateway_click_replay_unchecked_total").increment(1);
                false
            }
        };
        let event = ClickEvent {
            click_id: uuid::Uuid::now_v7().to_string(),
            impression_id: impression_id.to_string(),
            clicked_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            ..Default::default()
        };
        if let Err(e) = self.events.click(&event).await {
            if marked {
                // Not logged: a retry must be accepted, not taken for a replay.
                let _ = deadline(limit, self.counters.unmark_clicked(impression_id)).await;
            }
            return Err(unavailable("click log (kafka)", e));
        }
        tracing::debug!(ad_id = claims.ad_id, served_ms = claims.served_ms, "click recorded");
        metrics::counter!("adserve_gateway_clicks_total").increment(1);
        Ok(RecordClickResponse { click_id: event.click_id })
    }

    /// Logs an OpenRTB bid's billing notice (the exchange's `burl`: the bid
    /// won and the ad was shown) once the broker has acknowledged it, if its
    /// token proves the bid was made here within the label window and the
    /// clearing price (micro units per mille; an encrypted one decrypted
    /// and verified with `openrtb.price_keys`) is not above the bid. The
    /// label-joiner makes the bid a training row and the stream aggregator
    /// counts and charges it from the logged notice. A repeat (the exchange
    /// retrying, or a leaked `burl` replayed) is accepted and not logged
    /// again: the first logged notice marks the impression in Redis for the
    /// label window. Without Redis, or while the first is still being logged,
    /// it is logged again; consumers take one notice per impression.
    pub async fn billing_notice(
        &self,
        impression_id: &str,
        billing_token: &str,
        price: crate::openrtb::ClearingPrice<'_>,
    ) -> Result<(), ServeError> {
        let refuse = |reason: &'static str, e: ServeError| {
            metrics::counter!("adserve_gateway_billing_notices_refused_total", "reason" => reason).increment(1);
            e
        };
        let claims = self
            .click_tokens
            .verify_billing(billing_token, impression_id, unix_ms(SystemTime::now()))
            .map_err(|e| refuse(e.reason(), refused("billing_token", e)))?;
        // Only a notice whose token verified costs a decryption, or can
        // count against the price keys.
        let price_cpm_micros = price.micros(self.price_keys.as_ref())?;
        // An exchange may round the clearing price up to its own precision
        // (a cent per mille): within that it is the bid (never charged above
        // it); beyond it, it is not this bid's price.
        if price_cpm_micros > claims.bid_cpm_micros + PRICE_ROUNDING_MICROS {
            return Err(refuse(
                "price",
                ServeError::InvalidArgument(format!(
                    "price: the clearing price {} is above the bid {} (per mille)",
                    price_cpm_micros as f64 / 1e6,
                    claims.bid_cpm_micros as f64 / 1e6
                )),
            ));
        }
        let event = ClickEvent {
            click_id: uuid::Uuid::now_v7().to_string(),
            impression_id: impression_id.to_string(),
            clicked_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            billing_notice: true,
            price_cpm_micros: price_cpm_micros.min(claims.bid_cpm_micros),
        };
        let limit = self.config.counters.timeout;
        let ttl = adserve_features::registry().label.window();
        let marked = match deadline(limit, self.counters.mark_billed(impression_id, ttl)).await {
            Ok(adserve_counters::BillingMark::First) => true,
            Ok(adserve_counters::BillingMark::Logged) => {
                metrics::counter!("adserve_gateway_billing_notices_repeated_total").increment(1);
                return Ok(());
            }
            // A concurrent retry: log it too rather than answer before the first is durable.
            Ok(adserve_counters::BillingMark::InFlight) => false,
            Err(e) => {
                tracing::warn!(error = %e, "billing replay guard (redis) unavailable; logging the notice unguarded");
                metrics::counter!("adserve_gateway_billing_replay_unchecked_total").increment(1);
                false
            }
        };
        if let Err(e) = self.events.click(&event).await {
            if marked {
                let _ = deadline(limit, self.counters.unmark_billed(impression_id)).await;
            }
            return Err(unavailable("billing log (kafka)", e));
        }
        if marked && let Err(e) = deadline(limit, self.counters.billed_logged(impression_id)).await {
            // Left pending: a repeat is logged again until the mark expires, which consumers absorb.
            tracing::warn!(error = %e, "could not mark a billing notice logged");
        }
        tracing::debug!(ad_id = claims.ad_id, served_ms = claims.served_ms, "billing notice recorded");
        metrics::counter!("adserve_gateway_billing_notices_total").increment(1);
        Ok(())
    }

    /// A click through a creative's link (`GET /v1/clicks/redirect`):
    /// where to send the browser. A genuine token's click is recorded as
    /// [`click`](Self::click) records it (so an expired, early or repeated
    /// one is not), and the browser goes to the ad's landing page either
    /// way: a user who clicks late still lands. A token that is not this
    /// gateway's sends nobody anywhere (400 / 403), and neither does an ad
    /// the catalog no longer has (404).
    pub async fn click_through(
        &self,
        req: RecordClickRequest,
        fetch: crate::click_filter::Fetch<'_>,
    ) -> Result<String, ServeError> {
        let impression_id = click_fields(&req)?;
        let claims = self.click_tokens.genuine(&req.click_token, impression_id).map_err(token_refused)?;
        let landing = deadline(self.config.deadlines.catalog, self.catalog.landing_url(claims.ad_id))
            .await
            .map_err(|e| unavailable("catalog", e))?
            .ok_or_else(|| ServeError::NotFound(format!("click_token: ad {} is not in the catalog", claims.ad_id)))?;
        if !(landing.starts_with("https://") || landing.starts_with("http://")) {
            return Err(ServeError::NotFound(format!("ad {}: its landing URL is not http(s)", claims.ad_id)));
        }
        // A crawler, link preview or prefetch lands too (a preview shows the
        // right page) but is no click: not recorded, not marked, so the
        // person's own click afterwards is.
        if let Some(not) = self.click_filter.judge(fetch) {
            metrics::counter!("adserve_gateway_clicks_refused_total", "reason" => not.reason()).increment(1);
            tracing::debug!(reason = not.reason(), ad_id = claims.ad_id, "click-through not recorded");
            return Ok(landing);
        }
        match self.click(req).await {
            Ok(_) => {}
            // Refused and counted by click(): late, early or repeated. Not
            // a label, not a charge; the user still lands.
            Err(ServeError::Forbidden(_) | ServeError::AlreadyRecorded(_)) => {}
            // The click log is down: counted as unavailable; the user lands.
            Err(e) => tracing::warn!(error = %e, "click-through not logged"),
        }
        Ok(landing)
    }

    async fn features(
        &self,
        user_id: &str,
        ad_ids: &[i64],
        ctx: &RequestContext,
        budget: &Budget,
        degraded: &mut Vec<Degradation>,
    ) -> FeatureMatrix {
        let Some(limit) = budget.for_hop(self.config.deadlines.features) else {
            degraded.push(budget_spent(Hop::Features, degraded::FEATURE_SERVICE, budget, "serving registry defaults"));
            return default_matrix(ad_ids, ctx);
        };
        let request =
            GetFeaturesRequest { user_id: user_id.to_string(), ad_ids: ad_ids.to_vec(), context: Some(ctx.clone()) };
        let mut client = self.features.clone();
        match deadline(limit, client.get_features(with_deadline(request, limit))).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                degraded.extend(resp.degraded);
                match resp.matrix {
                    Some(m) if m.check_shape().is_ok() && m.num_rows as usize == ad_ids.len() => return m,
                    _ => degraded.push(Degradation {
                        component: degraded::FEATURE_SERVICE.into(),
                        reason: "returned a matrix of the wrong shape; serving registry defaults".into(),
                    }),
                }
            }
            Err(e) => degraded.push(Degradation {
                component: degraded::FEATURE_SERVICE.into(),
                reason: format!("{e}; serving registry defaults"),
            }),
        }
        default_matrix(ad_ids, ctx)
    }

    /// pCTRs for every row of `matrix` (row `i` is `ads[i]`): from the
    /// prediction cache where it holds the row's score for the model the
    /// ranker routes `user_id` to, from the ranker for the rest (a canary
    /// serves a fixed share of users; the empty COPPA/anonymous id stays on
    /// production), and from the prior for rows neither can score in time.
    /// `request_id` ties a shadow model's scores to this request.
    async fn scores(
        &self,
        matrix: &FeatureMatrix,
        ads: &[EligibleAd],
        user_id: &str,
        request_id: &str,
        budget: &Budget,
        degraded: &mut Vec<Degradation>,
    ) -> Scores {
        let rows = matrix.num_rows as usize;
        let lookup = self
            .prediction_cache
            .lookup_request(user_id, request_id, matrix, ads)
            // A matrix that does not match the ads (never expected) is not cached.
            .filter(|l| l.pctr.len() == rows);
        let mut scores = Scores::new(rows);
        let misses = match &lookup {
            Some(l) => {
                scores.fill(&l.pctr, &l.version);
                l.misses()
            }
            None => (0..rows).collect(),
        };
        if misses.is_empty() {
            return scores;
        }
        // The ranker scores only what the cache could not.
        let sub = if misses.len() == rows { None } else { Some(matrix.select_rows(&misses)) };
        let to_score = sub.as_ref().unwrap_or(matrix);
        // For the shadow's events: each scored row's ad (none if the rows do
        // not match the ads), and whether these are all of the request's rows
        // for a reason other than what the cache held.
        let shadowed = Shadowed {
            ad_ids: if ads.len() == rows { misses.iter().map(|&i| ads[i].ad_id).collect() } else { Vec::new() },
            whole_request: lookup.as_ref().is_none_or(|l| l.for_shadow),
        };
        match self.rank(to_score, shadowed, user_id, request_id, budget, degraded).await {
            Some((pctr, version, level)) => {
                if let Some(l) = &lookup {
                    self.prediction_cache.store(l, &misses, &pctr, &version, level);
                }
                scores.set(&misses, &pctr, &version, level);
            }
            None => {
                let prior = adserve_features::prior::prior_pctr(
                    to_score,
                    &self.config.fallback_pctr_feature,
                    adserve_auction::MIN_PCTR,
                );
                scores.set(&misses, &prior, FALLBACK_MODEL_VERSION, ScoreLevel::Prior);
            }
        }
        scores
    }

    /// The ranker's answer for `matrix`, or `None` (with the degradation
    /// recorded) when it has no time, fails, or answers nonsense.
    async fn rank(
        &self,
        matrix: &FeatureMatrix,
        shadowed: Shadowed,
        user_id: &str,
        request_id: &str,
        budget: &Budget,
        degraded: &mut Vec<Degradation>,
    ) -> Option<(Vec<f32>, String, ScoreLevel)> {
        let Some(limit) = budget.for_hop(self.config.deadlines.ranker) else {
            degraded.push(budget_spent(Hop::Ranker, degraded::RANKER, budget, "using prior pCTR"));
            return None;
        };
        let mut client = self.ranker.clone();
        let rows = matrix.num_rows as usize;
        let request = ScoreRequest {
            matrix: Some(matrix.clone()),
            routing_key: user_id.to_string(),
            request_id: request_id.to_string(),
            // Empty: whatever model name the ranker deployment serves.
            model_name: String::new(),
            ad_ids: shadowed.ad_ids,
            whole_request: shadowed.whole_request,
        };
        let request = with_deadline(request, limit);
        match deadline(limit, client.score(request)).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.pctr.len() == rows && resp.pctr.iter().copied().all(adserve_auction::is_valid_pctr) {
                    // The ranker's own fallback chain answered: serve it, and say so.
                    let level = ScoreLevel::try_from(resp.level).unwrap_or(ScoreLevel::Unspecified);
                    if matches!(level, ScoreLevel::FallbackModel | ScoreLevel::Prior) {
                        let by = if level == ScoreLevel::Prior { "the prior" } else { "the fallback model" };
                        degraded.push(Degradation {
                            component: degraded::RANKER.into(),
                            reason: format!("scored by {by} ({}): {}", resp.model_version, resp.fallback_reason),
                        });
                    }
                    return Some((resp.pctr, resp.model_version, level));
                }
                degraded.push(Degradation {
                    component: degraded::RANKER.into(),
                    reason: "returned invalid scores; using prior pCTR".into(),
                });
            }
            Err(e) => degraded
                .push(Degradation { component: degraded::RANKER.into(), reason: format!("{e}; using prior pCTR") }),
        }
        None
    }

    async fn auction(
        &self,
        candidates: Vec<AuctionCandidate>,
        rules: &adserve_auction::Rules,
        budget: &Budget,
        degraded: &mut Vec<Degradation>,
    ) -> Result<Vec<adserve_proto::v1::AuctionWinner>, ServeError> {
        use adserve_auction::wire;
        let request = wire::request_to_proto(candidates, rules);
        match budget.for_hop(self.config.deadlines.auction) {
            None => degraded.push(budget_spent(Hop::Auction, degraded::AUCTION, budget, "ran the auction in-process")),
            Some(limit) => {
                let mut client = self.auction.clone();
                match deadline(limit, client.run_auction(with_deadline(request.clone(), limit))).await {
                    Ok(resp) => return Ok(resp.into_inner().winners),
                    Err(e) if e.code() == Some(tonic::Code::InvalidArgument) => {
                        return Err(ServeError::Unavailable(format!("auction refused the candidates: {e}")));
                    }
                    Err(e) => degraded.push(Degradation {
                        component: degraded::AUCTION.into(),
                        reason: format!("{e}; ran the auction in-process"),
                    }),
                }
            }
        }
        // The auction is a pure function of the request: the gateway can run
        // it itself, with the same rules and seed, to the same answer.
        let outcome = wire::candidates_from_proto(&request.candidates)
            .and_then(|local| adserve_auction::run_auction(&local, rules))
            .map_err(|e| ServeError::Unavailable(format!("fallback auction: {e}")))?;
        Ok(outcome.winners.iter().map(wire::winner_to_proto).collect())
    }
}

/// Every candidate's pCTR, which model version scored it, and at which
/// level of the fallback chain: one request can mix cached scores (always
/// the model's), the ranker's (its model, fallback model or prior) and the
/// gateway's own prior (the ranker down, or answering with another version
/// than the cache expected, mid-swap).
#[derive(Debug)]
struct Scores {
    pctr: Vec<f32>,
    /// The distinct (version, level) pairs, in the order first used.
    versions: Vec<(String, ScoreLevel)>,
    /// Each row's index into `versions`.
    of_row: Vec<u8>,
}

impl Scores {
    fn new(rows: usize) -> Self {
        Self { pctr: vec![0.0; rows], versions: Vec::new(), of_row: vec![0; rows] }
    }

    fn version_index(&mut self, version: &str, level: ScoreLevel) -> u8 {
        match self.versions.iter().position(|(v, l)| v == version && *l == level) {
            Some(i) => i as u8,
            None => {
                self.versions.push((version.to_string(), level));
                (self.versions.len() - 1) as u8
            }
        }
    }

    /// The cache's hits (`None`: a miss, set later). The cache holds only
    /// scores the model gave.
    fn fill(&mut self, cached: &[Option<f32>], version: &str) {
        if cached.iter().any(Option::is_some) {
            let v = self.version_index(version, ScoreLevel::Model);
            for (i, p) in cached.iter().enumerate() {
                if let Some(p) = p {
                    self.pctr[i] = *p;
                    self.of_row[i] = v;
                }
            }
        }
    }

    /// `pctr[k]` for row `rows[k]`, scored by `version` at `level`.
    fn set(&mut self, rows: &[usize], pctr: &[f32], version: &str, level: ScoreLevel) {
        let v = self.version_index(version, level);
        for (&row, &p) in rows.iter().zip(pctr) {
            self.pctr[row] = p;
            self.of_row[row] = v;
        }
    }

    /// The version that scored `row`.
    fn version(&self, row: usize) -> &str {
        self.versions.get(self.of_row[row] as usize).map_or(FALLBACK_MODEL_VERSION, |(v, _)| v.as_str())
    }

    /// The level of the fallback chain that scored `row`.
    fn level(&self, row: usize) -> ScoreLevel {
        self.versions.get(self.of_row[row] as usize).map_or(ScoreLevel::Prior, |(_, l)| *l)
    }

    /// The version an answer without winners names: the last one used (the
    /// ranker's or the prior's when it was called, else the cache's).
    fn headline(&self) -> &str {
        self.versions.last().map_or(FALLBACK_MODEL_VERSION, |(v, _)| v.as_str())
    }
}

/// Milliseconds since the Unix epoch (0 before it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A 64-bit seed from a request id (its two halves folded).
pub fn seed_of(request_id: &uuid::Uuid) -> u64 {
    let v = request_id.as_u128();
    (v as u64) ^ ((v >> 64) as u64)
}

/// A step of the request path, timed by `adserve_gateway_hop_seconds{hop}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Catalog eligibility query (PostgreSQL).
    Catalog,
    /// feature-service GetFeatures, including its fallback.
    Features,
    /// ranker Score, including its fallback.
    Ranker,
    /// auction RunAuction, including the in-process fallback.
    Auction,
    /// Kafka acknowledgement of every impression of the answer.
    ImpressionLog,
}

impl Hop {
    /// Every hop, in path order.
    pub const ALL: [Hop; 5] = [Self::Catalog, Self::Features, Self::Ranker, Self::Auction, Self::ImpressionLog];

    /// The `hop` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Catalog => "catalog",
            Self::Features => "features",
            Self::Ranker => "ranker",
            Self::Auction => "auction",
            Self::ImpressionLog => "impression_log",
        }
    }
}

/// Runs `step` in a span of its own (the upstream call made inside it joins
/// the request's trace), recording how long it took under `hop`, whatever its
/// outcome.
async fn timed<T>(hop: Hop, step: impl Future<Output = T>) -> T {
    use tracing::Instrument as _;
    let started = Instant::now();
    let out = step.instrument(tracing::info_span!("hop", otel.name = hop.label())).await;
    metrics::histogram!("adserve_gateway_hop_seconds", "hop" => hop.label()).record(started.elapsed().as_secs_f64());
    out
}

/// An error from a call made under a deadline.
#[derive(Debug)]
pub enum CallError {
    /// The deadline passed.
    Timeout(Duration),
    /// The call failed.
    Failed(String, Option<tonic::Code>),
}

impl CallError {
    fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Failed(_, code) => *code,
            Self::Timeout(_) => None,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout(d) => write!(f, "no answer within {} ms", d.as_millis()),
            Self::Failed(m, _) => f.write_str(m),
        }
    }
}

trait CallFailure {
    fn describe(self) -> CallError;

    /// The call ran out of time on its own clock (the same deadline as ours).
    fn timed_out(&self) -> bool {
        false
    }
}

impl CallFailure for tonic::Status {
    fn describe(self) -> CallError {
        CallError::Failed(format!("{:?}: {}", self.code(), self.message()), Some(self.code()))
    }

    /// tonic's client enforces the `grpc-timeout` it sends (`Cancelled:
    /// Timeout expired`), and the upstream may answer `DeadlineExceeded`;
    /// both are the deadline we set, and are reported as such.
    fn timed_out(&self) -> bool {
        self.code() == tonic::Code::DeadlineExceeded
            || (self.code() == tonic::Code::Cancelled && self.message().contains("Timeout expired"))
    }
}

impl CallFailure for adserve_counters::RedisError {
    fn describe(self) -> CallError {
        CallError::Failed(self.to_string(), None)
    }
}

impl CallFailure for adserve_catalog::CatalogError {
    fn describe(self) -> CallError {
        CallError::Failed(self.to_string(), None)
    }
}

/// `message` as a gRPC request carrying `limit` as its `grpc-timeout`, so the
/// upstream stops working on it when the gateway stops waiting (tonic's
/// server drops the handler at the deadline).
fn with_deadline<T>(message: T, limit: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(limit);
    // The upstream's span joins this request's trace.
    adserve_core::trace_context::inject(&mut request);
    request
}

/// Runs `fut` under `limit` (the gateway-side bound, covering connecting too).
async fn deadline<T, E: CallFailure>(limit: Duration, fut: impl Future<Output = Result<T, E>>) -> Result<T, CallError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.timed_out() => Err(CallError::Timeout(limit)),
        Ok(Err(e)) => Err(e.describe()),
        Err(_) => Err(CallError::Timeout(limit)),
    }
}

/// The degradation of a hop skipped because the request's budget is spent
/// (counted in `adserve_gateway_budget_skips_total{hop}`).
fn budget_spent(hop: Hop, component: &str, budget: &Budget, fallback: &str) -> Degradation {
    metrics::counter!("adserve_gateway_budget_skips_total", "hop" => hop.label()).increment(1);
    Degradation {
        component: component.into(),
        reason: format!(
            "not called: {} ms of the request's {} ms budget used, the rest is the impression log's; {fallback}",
            budget.elapsed().as_millis(),
            budget.total().as_millis()
        ),
    }
}

fn unavailable(component: &str, e: impl std::fmt::Display) -> ServeError {
    metrics::counter!("adserve_gateway_unavailable_total", "component" => component.to_string()).increment(1);
    tracing::warn!(component, error = %e, "request failed: dependency unavailable");
    ServeError::Unavailable(format!("{component} unavailable: {e}"))
}

/// How far above a bid an exchange's clearing price may be and still be
/// taken as the bid (rounded up to a cent per mille), in micro units.
pub const PRICE_ROUNDING_MICROS: i64 = 10_000;

/// What a face other than the native API adds to a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// An empty `user_id` is an anonymous user (no user features, no
    /// frequency caps), not a missing field. COPPA requests are anonymous anyway.
    pub anonymous: bool,
    /// The caller's floor, micro units per mille (OpenRTB `bidfloor`): it
    /// raises every candidate's reserve, and a winner whose price per mille
    /// ([`price_per_mille_micros`]) is below it is dropped before it is
    /// logged. 0 = none.
    pub floor_ecpm_micros: i64,
    /// The winners are bids into another auction (OpenRTB with
    /// `openrtb.billing_url`): their impressions are logged
    /// `billed_on_notice`, and each gets a billing token for its `burl`.
    pub billed_on_notice: bool,
}

/// One answer, with the creative details of each winner.
#[derive(Debug, Clone)]
pub struct Served {
    /// The answer.
    pub response: GetAdsResponse,
    /// One per winner, in the same order.
    pub creatives: Vec<Creative>,
}

impl Served {
    fn nothing(response: GetAdsResponse) -> Self {
        Self { response, creatives: Vec::new() }
    }
}

/// What the native answer does not carry of a winner.
#[derive(Debug, Clone, PartialEq)]
pub struct Creative {
    /// The advertiser's domain (OpenRTB `adomain`); may be empty.
    pub advertiser_domain: String,
    /// The ad's content category.
    pub category: String,
    /// The winner's price per thousand impressions ([`price_per_mille_micros`]).
    pub price_per_mille_micros: i64,
    /// The model version that scored this winner (its impression's).
    pub model_version: String,
    /// The token of its billing notice (`burl`), when billed on notice.
    pub billing_token: String,
}

/// A winner's price per thousand impressions, micro units: a CPM winner's
/// price, or a CPC winner's price per click times its pCTR times 1000 (the
/// expected cost of a thousand such impressions), rounded down.
pub fn price_per_mille_micros(w: &adserve_proto::v1::AuctionWinner) -> i64 {
    if w.bid_cpm_micros > 0 {
        w.price_cpm_micros
    } else {
        (w.price_cpc_micros as f64 * f64::from(w.pctr) * 1000.0).floor() as i64
    }
}

fn no_fill(
    request_id: String,
    candidates: usize,
    degraded: Vec<Degradation>,
    reason: &str,
    model_version: &str,
) -> GetAdsResponse {
    metrics::counter!("adserve_gateway_no_fill_total", "reason" => reason.to_string()).increment(1);
    GetAdsResponse {
        request_id,
        winners: vec![],
        model_version: model_version.into(),
        candidates: candidates as u32,
        degraded,
        no_fill_reason: reason.into(),
    }
}

/// The matrix served when the feature-service is unavailable: the same
/// assembly the service runs, with every source missing (registry defaults,
/// context features from the request).
pub fn default_matrix(ad_ids: &[i64], ctx: &RequestContext) -> FeatureMatrix {
    adserve_features::assemble(adserve_features::registry(), ad_ids, ctx, &adserve_features::SourceValues::default())
        .matrix
}

/// A click's impression id (trimmed), once it is a UUID and a token came with it.
fn click_fields(req: &RecordClickRequest) -> Result<&str, ServeError> {
    let impression_id = req.impression_id.trim();
    if uuid::Uuid::parse_str(impression_id).is_err() {
        return Err(ServeError::InvalidArgument(format!(
            "impression_id: must be the UUID returned with the ad, got {:?}",
            truncate(impression_id)
        )));
    }
    if req.click_token.is_empty() {
        return Err(ServeError::InvalidArgument("click_token: required (returned with the ad)".into()));
    }
    Ok(impression_id)
}

/// A refused click token, counted in `adserve_gateway_clicks_refused_total`:
/// 400 when it is not a token at all, 403 otherwise.
fn token_refused(e: crate::click_token::TokenError) -> ServeError {
    metrics::counter!("adserve_gateway_clicks_refused_total", "reason" => e.reason()).increment(1);
    refused("click_token", e)
}

/// 400 when `field` is not a token at all, 403 otherwise.
fn refused(field: &str, e: crate::click_token::TokenError) -> ServeError {
    match e {
        crate::click_token::TokenError::Malformed => ServeError::InvalidArgument(format!("{field}: {e}")),
        e => ServeError::Forbidden(format!("{field}: {e}")),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Most entries in each of `blocked_categories` and `blocked_advertisers`.
pub const MAX_BLOCKED: usize = 256;
/// Longest entry in those lists.
pub const MAX_BLOCKED_LEN: usize = 128;

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The checked context.
    pub context: RequestContext,
    /// Blocked categories, trimmed.
    pub blocked_categories: Vec<String>,
    /// Blocked advertiser domains, trimmed and lower-cased.
    pub blocked_advertisers: Vec<String>,
}

/// Checks an ad request against the shared request contract
/// (adserve_features::request), the auction's slot limit and the block
/// lists' limits.
pub fn validate(req: &GetAdsRequest) -> Result<Checked, FieldError> {
    validate_with(req, false)
}

/// [`validate`]; with `anonymous`, an empty `user_id` is accepted without
/// COPPA (no user features, no frequency caps).
fn validate_with(req: &GetAdsRequest, anonymous: bool) -> Result<Checked, FieldError> {
    let ctx = check_context(req.context.as_ref(), adserve_features::registry())?;
    check_user_id(&req.user_id, ctx.coppa || (anonymous && req.user_id.is_empty()))?;
    if req.slots == 0 || req.slots as usize > adserve_auction::MAX_SLOTS {
        return Err(FieldError::new(
            "slots",
            format!("must be in 1..={}, got {}", adserve_auction::MAX_SLOTS, req.slots),
        ));
    }
    let list = |field: &'static str, values: &[String], lower: bool| -> Result<Vec<String>, FieldError> {
        if values.len() > MAX_BLOCKED {
            return Err(FieldError::new(field, format!("at most {MAX_BLOCKED} entries, got {}", values.len())));
        }
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v = v.trim();
                if v.is_empty() || v.len() > MAX_BLOCKED_LEN || v.chars().any(char::is_control) {
                    return Err(FieldError::new(
                        field,
                        format!("entry [{i}] must be 1..={MAX_BLOCKED_LEN} printable characters"),
                    ));
                }
                Ok(if lower { v.to_ascii_lowercase() } else { v.to_string() })
            })
            .collect()
    };
    Ok(Checked {
        context: ctx.clone(),
        blocked_categories: list("blocked_categories", &req.blocked_categories, false)?,
        blocked_advertisers: list("blocked_advertisers", &req.blocked_advertisers, true)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> GetAdsRequest {
        GetAdsRequest {
            user_id: "u1".into(),
            context: Some(RequestContext {
                placement: "feed_top".into(),
                device: "mobile".into(),
                surface: "home".into(),
                coppa: false,
            }),
            slots: 1,
            ..Default::default()
        }
    }

    fn err(r: GetAdsRequest) -> String {
        validate(&r).unwrap_err().to_string()
    }

    #[test]
    fn valid_request_passes() {
        assert!(validate(&req()).is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(err(GetAdsRequest { slots: 0, ..req() }).starts_with("slots"));
        assert!(err(GetAdsRequest { slots: 11, ..req() }).starts_with("slots"));
        assert!(err(GetAdsRequest { user_id: "".into(), ..req() }).starts_with("user_id"));
        assert!(err(GetAdsRequest { user_id: "x".repeat(200), ..req() }).starts_with("user_id"));
        assert!(err(GetAdsRequest { context: None, ..req() }).starts_with("context"));
        let mut r = req();
        r.context.as_mut().unwrap().device = "toaster".into();
        assert!(err(r).starts_with("context.device"));
        let mut r = req();
        r.context.as_mut().unwrap().placement = String::new();
        assert!(err(r).starts_with("context.placement"));
        let r = GetAdsRequest { blocked_categories: vec!["ok".into(), " ".into()], ..req() };
        let e = err(r);
        assert!(e.starts_with("blocked_categories: entry [1]"), "{e}");
        let r = GetAdsRequest { blocked_advertisers: vec!["x".into(); MAX_BLOCKED + 1], ..req() };
        assert!(err(r).starts_with("blocked_advertisers"));
        let r = GetAdsRequest { blocked_advertisers: vec!["a".repeat(MAX_BLOCKED_LEN + 1)], ..req() };
        assert!(err(r).starts_with("blocked_advertisers: entry [0]"));
    }

    #[test]
    fn block_lists_are_trimmed_and_domains_lower_cased() {
        let r = GetAdsRequest {
            blocked_categories: vec![" Travel ".into()],
            blocked_advertisers: vec!["Acme.Example".into()],
            ..req()
        };
        let c = validate(&r).unwrap();
        assert_eq!(c.blocked_categories, vec!["Travel"]);
        assert_eq!(c.blocked_advertisers, vec!["acme.example"]);
    }

    #[tokio::test]
    async fn an_upstream_that_times_out_on_its_own_clock_reads_as_our_deadline() {
        let limit = Duration::from_millis(7);
        for status in [tonic::Status::cancelled("Timeout expired"), tonic::Status::deadline_exceeded("late")] {
            let e = deadline(limit, async { Err::<(), _>(status) }).await.unwrap_err();
            assert_eq!(e.to_string(), "no answer within 7 ms");
        }
        let e = deadline(limit, async { Err::<(), _>(tonic::Status::unavailable("down")) }).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::Unavailable));
    }

    #[test]
    fn seeds_differ_per_request() {
        let a = seed_of(&uuid::Uuid::now_v7());
        let b = seed_of(&uuid::Uuid::now_v7());
        assert_ne!(a, b);
    }

    #[test]
    fn coppa_requests_may_omit_the_user() {
        let mut r = req();
        r.user_id = String::new();
        r.context.as_mut().unwrap().coppa = true;
        assert!(validate(&r).is_ok());
    }

    #[test]
    fn default_matrix_has_registry_shape_and_context() {
        let ctx = RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() };
        let m = default_matrix(&[1, 2, 3], &ctx);
        assert!(m.check_shape().is_ok());
        let c = m.feature_names.iter().position(|n| n == "ctx_device_mobile").unwrap();
        assert_eq!(m.row(2).unwrap()[c], 1.0);
    }

    #[test]
    fn scores_name_the_version_and_level_of_each_row_when_one_request_mixes_them() {
        let mut s = Scores::new(5);
        s.fill(&[Some(0.1), None, Some(0.3), None, None], "v1");
        assert_eq!(s.headline(), "v1");
        s.set(&[1], &[0.2], "v2", ScoreLevel::Model);
        // The ranker's fallback model, under the cache's version.
        s.set(&[4], &[0.5], "v1", ScoreLevel::FallbackModel);
        s.set(&[3], &[0.4], FALLBACK_MODEL_VERSION, ScoreLevel::Prior);
        assert_eq!(s.pctr, vec![0.1, 0.2, 0.3, 0.4, 0.5]);
        let versions: Vec<&str> = (0..5).map(|r| s.version(r)).collect();
        assert_eq!(versions, ["v1", "v2", "v1", FALLBACK_MODEL_VERSION, "v1"]);
        let levels: Vec<ScoreLevel> = (0..5).map(|r| s.level(r)).collect();
        use ScoreLevel::{FallbackModel, Model, Prior};
        assert_eq!(levels, [Model, Model, Model, Prior, FallbackModel], "cache hits are the model's");
        assert_eq!(s.headline(), FALLBACK_MODEL_VERSION, "the last one used");
        // No hits: the ranker's version alone.
        let mut s = Scores::new(2);
        s.fill(&[None, None], "v1");
        s.set(&[0, 1], &[0.5, 0.6], "v2", ScoreLevel::Model);
        assert_eq!((s.version(0), s.version(1), s.headline()), ("v2", "v2", "v2"));
    }
}
