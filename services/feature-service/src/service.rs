//! gRPC face of the feature-service: validation, per-source deadlines and
//! degradation.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
    time::Instant,
};

use adserve_features::{
    FeatureRegistry,
    request::{FieldError, check_context, check_user_id},
};
use adserve_proto::{
    degraded,
    v1::{
        Degradation, GetFeaturesRequest, GetFeaturesResponse, RequestContext,
        feature_service_server::{FeatureService, FeatureServiceServer},
    },
};
use tonic::{Request, Response, Status};

use crate::freshness::{BatchFreshness, RealtimeFreshness};

use crate::{
    AdTable, BatchStore, RealtimeStore, SourceValues, assemble,
    breaker::{Admit, Breaker, BreakerConfig},
};

/// Serves `adserve.v1.FeatureService`.
#[derive(Debug, Clone)]
pub struct FeatureGrpc {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: &'static FeatureRegistry,
    batch: BatchStore,
    realtime: RealtimeStore,
    batch_deadline: Duration,
    realtime_deadline: Duration,
    max_ads: usize,
    /// In-process ad rows of the batch tier (None: every request reads DynamoDB).
    ad_table: Option<AdTable>,
    /// Users' batch items read in the last TTL (None: every request reads DynamoDB).
    user_cache: Option<crate::UserCache>,
    /// One breaker per tier: a dead tier stops costing its deadline.
    batch_breaker: Breaker,
    realtime_breaker: Breaker,
    /// The real-time tier's lag against the registry's freshness SLAs
    /// (None: not followed).
    freshness: Option<Arc<RealtimeFreshness>>,
    /// The batch tier's item times against the registry's freshness SLAs.
    batch_freshness: BatchFreshness,
}

impl FeatureGrpc {
    /// A service over the two tiers with their deadlines.
    pub fn new(
        registry: &'static FeatureRegistry,
        batch: BatchStore,
        realtime: RealtimeStore,
        batch_deadline: Duration,
        realtime_deadline: Duration,
        max_ads: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                batch,
                realtime,
                batch_deadline,
                realtime_deadline,
                max_ads,
                ad_table: None,
                user_cache: None,
                batch_breaker: Breaker::new(degraded::DYNAMODB, BreakerConfig::default()),
                realtime_breaker: Breaker::new(degraded::REDIS, BreakerConfig::default()),
                freshness: None,
                batch_freshness: BatchFreshness::new(registry),
            }),
        }
    }

    /// Serves ad batch features from `table`; only the ads it does not hold
    /// are read from DynamoDB.
    pub fn with_ad_table(mut self, table: AdTable) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ad_table = Some(table);
        }
        self
    }

    /// Serves users' batch items read within `cache`'s TTL from memory.
    pub fn with_user_cache(mut self, cache: Option<crate::UserCache>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.user_cache = cache;
        }
        self
    }

    /// Says, in every answer while it is so, that the real-time tier is
    /// behind the event logs by more than a feature's `freshness_sla`.
    pub fn with_freshness(mut self, freshness: Arc<RealtimeFreshness>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.freshness = Some(freshness);
        }
        self
    }

    /// Opens a tier's breaker after `config.failures` consecutive failures
    /// (default: [`BreakerConfig::default`]).
    pub fn with_breakers(mut self, config: BreakerConfig) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.batch_breaker = Breaker::new(degraded::DYNAMODB, config);
            inner.realtime_breaker = Breaker::new(degraded::REDIS, config);
        }
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> FeatureServiceServer<Self> {
        FeatureServiceServer::new(self)
    }
}

/// Checks a request against the shared request contract
/// (adserve_features::request) and the service's `max_ads`.
pub fn validate(req: &GetFeaturesRequest, registry: &FeatureRegistry, max_ads: usize) -> Result<(), FieldError> {
    let ctx = check_context(req.context.as_ref(), registry)?;
    // Empty: an anonymous user (the gateway's OpenRTB face serves requests
    // that identify nobody); no user feature is read. Blank is still refused.
    check_user_id(&req.user_id, ctx.coppa || req.user_id.is_empty())?;
    if req.ad_ids.is_empty() || req.ad_ids.len() > max_ads {
        return Err(FieldError::new("ad_ids", format!("must hold 1..={max_ads} ids, got {}", req.ad_ids.len())));
    }
    let mut seen = HashSet::with_capacity(req.ad_ids.len());
    for id in &req.ad_ids {
        if !seen.insert(id) {
            return Err(FieldError::new("ad_ids", format!("{id} is repeated")));
        }
    }
    Ok(())
}

/// Runs `fut` under `deadline` unless `breaker` is open; on error, timeout or
/// an open breaker records the degradation and returns `T::default()`.
async fn within<T: Default, E: std::fmt::Display>(
    component: &'static str,
    deadline: Duration,
    breaker: &Breaker,
    fut: impl Future<Output = Result<T, E>>,
    degraded: &std::sync::Mutex<Vec<Degradation>>,
) -> T {
    let start = Instant::now();
    if let Admit::Skip { next_probe_in } = breaker.admit(start) {
        let reason = format!(
            "circuit open after {} consecutive failures (next probe in {} ms); serving registry defaults",
            breaker.threshold(),
            next_probe_in.as_millis()
        );
        report_degraded(component, reason, degraded);
        return T::default();
    }
    let reason = match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => {
            breaker.record(true, Instant::now());
            metrics::histogram!("adserve_feature_source_seconds", "source" => component)
                .record(start.elapsed().as_secs_f64());
            return v;
        }
        Ok(Err(e)) => format!("{e}; serving registry defaults"),
        Err(_) => format!("no answer within {} ms; serving registry defaults", deadline.as_millis()),
    };
    breaker.record(false, Instant::now());
    report_degraded(component, reason, degraded);
    T::default()
}

/// A tier's stored values past their `freshness_sla`: counted per feature
/// and named in the response as the tier's degradation, unless a failure of
/// that tier already is (its defaults are what was served then). Not a
/// source failure: nothing failed, and it lasts as long as the pipeline is
/// behind, so it is not logged per request either (the lag gauge and the
/// breach counter say it).
fn report_stale(
    component: &'static str,
    (features, reason): (Vec<&str>, String),
    degraded: &std::sync::Mutex<Vec<Degradation>>,
) {
    for f in features {
        metrics::counter!("adserve_feature_freshness_breaches_total", "feature" => f.to_string()).increment(1);
    }
    name_degraded(component, reason, degraded);
}

/// Counts and logs a source failure and names it in the response: one entry
/// per source, however many of its lookups failed.
fn report_degraded(component: &'static str, reason: String, degraded: &std::sync::Mutex<Vec<Degradation>>) {
    metrics::counter!("adserve_feature_source_failures_total", "source" => component).increment(1);
    tracing::warn!(component, %reason, "feature source degraded");
    name_degraded(component, reason, degraded);
}

/// Names `component` in the response with `reason`, unless it already is.
fn name_degraded(component: &'static str, reason: String, degraded: &std::sync::Mutex<Vec<Degradation>>) {
    if let Ok(mut d) = degraded.lock()
        && !d.iter().any(|x| x.component == component)
    {
        d.push(Degradation { component: component.into(), reason });
    }
}

#[tonic::async_trait]
impl FeatureService for FeatureGrpc {
    async fn get_features(
        &self,
        request: Request<GetFeaturesRequest>,
    ) -> Result<Response<GetFeaturesResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        validate(&req, self.inner.registry, self.inner.max_ads).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ctx: RequestContext = req.context.clone().unwrap_or_default();
        // COPPA: personal features are never read, let alone used.
        let user_id = if ctx.coppa { "" } else { req.user_id.as_str() };
        let s = &self.inner;
        let degraded = std::sync::Mutex::new(Vec::new());
        // A tier is only asked (and its breaker only told) when there is
        // something to ask it.
        let user_batch = async {
            if user_id.is_empty() {
                return Default::default();
            }
            let cache = s.user_cache.as_ref();
            if let Some(item) = cache.and_then(|c| c.get(user_id, Instant::now())) {
                return item;
            }
            // Only what DynamoDB answered is cached, never a failure's defaults.
            let read = async {
                let item = s.batch.user(user_id).await?;
                if let Some(c) = cache {
                    c.put(user_id, &item, Instant::now());
                }
                Ok::<_, crate::batch::BatchError>(item)
            };
            within(degraded::DYNAMODB, s.batch_deadline, &s.batch_breaker, read, &degraded).await
        };
        let asked = req.ad_ids.len();
        // Ad rows from the in-process table; DynamoDB only for the ads it
        // does not hold (all of them without a table).
        let table = s.ad_table.as_ref().map(|t| t.lookup(&req.ad_ids));
        let misses: &[i64] = table.as_ref().map_or(&req.ad_ids, |l| &l.misses);
        if table.is_some() {
            metrics::counter!("adserve_feature_ad_table_misses_total").increment(misses.len() as u64);
        }
        let ad_batch = async {
            if misses.is_empty() {
                return crate::AdLookup::default();
            }
            let fetch = async {
                let lookup = s.batch.ads(misses).await;
                if lookup.error.is_none()
                    && let Some(t) = &s.ad_table
                {
                    t.remember_absent(misses, &lookup.items);
                }
                lookup.into_result(misses.len())
            };
            within(degraded::DYNAMODB, s.batch_deadline, &s.batch_breaker, fetch, &degraded).await
        };
        let realtime = s.realtime.counters(user_id, &req.ad_ids);
        let (user_batch, ad_lookup, (user_realtime, ad_realtime)) = tokio::join!(
            user_batch,
            ad_batch,
            within(degraded::REDIS, s.realtime_deadline, &s.realtime_breaker, realtime, &degraded),
        );
        let now_ms = crate::aggregates::unix_now_ms();
        if let Some(breach) = s.freshness.as_ref().and_then(|f| f.breach(now_ms)) {
            report_stale(degraded::REDIS, breach, &degraded);
        }
        if let Some(e) = &ad_lookup.error {
            // Some chunks answered: only the failed chunks' ads take defaults.
            let reason = format!(
                "{e}; {} of {asked} ads served with registry defaults for their batch features",
                ad_lookup.failed
            );
            report_degraded(degraded::DYNAMODB, reason, &degraded);
        }
        // Each ad's batch row, borrowed from the table's copy or, for the
        // ads it lacked, from what DynamoDB answered (laid out the same way).
        let plan = s.registry.plan();
        let fetched: HashMap<i64, Vec<Option<f32>>> =
            ad_lookup.items.iter().map(|(id, item)| (*id, plan.ad_row(&item.values))).collect();
        let ad_batch = req
            .ad_ids
            .iter()
            .enumerate()
            .map(|(i, id)| table.as_ref().and_then(|t| t.row(i)).or_else(|| fetched.get(id).map(Vec::as_slice)))
            .collect();
        // Stored values past their SLA are still served, and the answer says so.
        let ad_as_of = req.ad_ids.iter().enumerate().map(|(i, id)| {
            table.as_ref().and_then(|t| t.as_of(i)).or_else(|| ad_lookup.items.get(id).and_then(|item| item.as_of_ms))
        });
        let stale: Vec<_> =
            [s.batch_freshness.user(user_batch.as_of_ms, now_ms), s.batch_freshness.ads(ad_as_of, now_ms)]
                .into_iter()
                .flatten()
                .collect();
        if !stale.is_empty() {
            let names = stale.iter().flat_map(|(n, _)| n.iter().copied()).collect();
            let reason = stale.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>().join("; ");
            report_stale(degraded::DYNAMODB, (names, reason), &degraded);
        }
        // Typed ad values (categoricals, embeddings), laid out the same way.
        let fetched_typed: HashMap<i64, adserve_features::AdTypedRow> = if plan.has_typed_ad_features() {
            ad_lookup.items.iter().map(|(id, item)| (*id, plan.ad_typed_row(&item.text, &item.vectors))).collect()
        } else {
            HashMap::new()
        };
        let ad_typed = if plan.has_typed_ad_features() {
            req.ad_ids
                .iter()
                .enumerate()
                .map(|(i, id)| table.as_ref().and_then(|t| t.typed(i)).or_else(|| fetched_typed.get(id)))
                .collect()
        } else {
            Vec::new()
        };
        let values = SourceValues {
            user_batch: user_batch.values,
            user_text: user_batch.text,
            user_vectors: user_batch.vectors,
            ad_batch,
            ad_typed,
            user_realtime,
            ad_realtime,
        };
        let assembled = assemble(s.registry, &req.ad_ids, &ctx, &values);
        let columns = s.registry.features.iter().chain(&s.registry.categorical).chain(&s.registry.embeddings);
        for (f, n) in columns.zip(&assembled.invalid) {
            if *n > 0 {
                // A store holds values the registry does not allow (a stored
                // "nan", a counter gone wild): served as defaults, and loud.
                metrics::counter!("adserve_feature_invalid_values_total", "feature" => f.name.clone())
                    .increment(u64::from(*n));
                tracing::debug!(feature = %f.name, cells = n, "stored values refused by the registry's range");
            }
        }
        let degraded = degraded.into_inner().unwrap_or_default();
        metrics::histogram!("adserve_feature_request_seconds").record(start.elapsed().as_secs_f64());
        Ok(Response::new(GetFeaturesResponse {
            matrix: Some(assembled.matrix),
            degraded,
            missing: assembled.missing,
            invalid: assembled.invalid,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: &str, ads: Vec<i64>, coppa: bool) -> GetFeaturesRequest {
        GetFeaturesRequest {
            user_id: user.into(),
            ad_ids: ads,
            context: Some(RequestContext {
                placement: "feed_top".into(),
                device: "mobile".into(),
                coppa,
                ..Default::default()
            }),
        }
    }

    fn field(r: &GetFeaturesRequest) -> &'static str {
        validate(r, adserve_features::registry(), 10).unwrap_err().field
    }

    #[test]
    fn validation_names_the_field() {
        let registry = adserve_features::registry();
        assert!(validate(&req("u", vec![1], false), registry, 10).is_ok());
        assert!(validate(&req("", vec![1], true), registry, 10).is_ok());
        // Anonymous: no user features are read.
        assert!(validate(&req("", vec![1], false), registry, 10).is_ok());
        assert_eq!(field(&req(" ", vec![1], false)), "user_id");
        assert_eq!(field(&req("u", vec![], false)), "ad_ids");
        assert_eq!(field(&req("u", (0..11).collect(), false)), "ad_ids");
        assert!(validate(&req("u", vec![3, 3], false), registry, 10).unwrap_err().why.contains("repeated"));
        assert_eq!(field(&req(&"x".repeat(129), vec![1], false)), "user_id");
        let mut r = req("u", vec![1], false);
        r.context.as_mut().unwrap().device = "toaster".into();
        assert_eq!(field(&r), "context.device");
        r.context = None;
        assert_eq!(field(&r), "context");
    }
}
