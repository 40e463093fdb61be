//! gRPC face of the ranker.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use adserve_events::{EventPublisher, SHADOW_SCORES_TOPIC};
use adserve_proto::v1::{
    FeatureMatrix, GetModelRequest, GetModelResponse, ScoreLevel, ScoreRequest, ScoreResponse, ShadowScoreEvent,
    ranker_service_server::{RankerService, RankerServiceServer},
};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use crate::{CtrModel, batcher::Scores, follow::Serving};

/// Where shadow scores go, and how many may be in flight.
#[derive(Debug, Clone)]
pub struct ShadowSink {
    publisher: EventPublisher,
    permits: Arc<Semaphore>,
    sample_share: f64,
}

impl ShadowSink {
    /// Publishes through `publisher`, at most `max_in_flight` at a time,
    /// for `sample_share` of calls by request id ([`Self::samples`]).
    pub fn new(publisher: EventPublisher, max_in_flight: usize, sample_share: f64) -> Self {
        Self { publisher, permits: Arc::new(Semaphore::new(max_in_flight)), sample_share }
    }

    /// Whether the call with `request_id` is shadowed: every call at share
    /// 1; below it, the request ids whose bucket is below the share, by the
    /// canary's hash ([`adserve_registry::in_canary`]: the one the gateway's
    /// `prediction_cache.shadow_share` samples with, so equal shares pick
    /// the same requests), and never a call without a request id.
    pub fn samples(&self, request_id: &str) -> bool {
        self.sample_share >= 1.0 || adserve_registry::in_canary(request_id, self.sample_share)
    }

    /// Scores `matrix` with `shadow` and publishes it next to production's
    /// scores. Never fails the call it shadows: every outcome is a metric.
    async fn run(&self, shadow: Arc<CtrModel>, matrix: FeatureMatrix, call: Shadowed) {
        let Shadowed { request_id, ad_ids, whole_request, production_model_version, production_pctr } = call;
        let outcome = async {
            let input = shadow.gather(&matrix).map_err(|e| format!("shadow cannot read the matrix: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            let scores = shadow.batcher().score(input, Some(deadline)).await.map_err(|e| e.to_string())?;
            let event = ShadowScoreEvent {
                request_id: request_id.clone(),
                production_model_version,
                production_pctr,
                shadow_model_version: shadow.manifest().model_version.clone(),
                shadow_pctr: scores.pctr,
                scored_at: Some(prost_types::Timestamp::from(SystemTime::now())),
                ad_ids,
                whole_request,
            };
            self.publisher
                .send(SHADOW_SCORES_TOPIC, &request_id, &event.encode_to_vec(), None)
                .await
                .map(|_| ())
                .map_err(|e| format!("publishing: {e}"))
        }
        .await;
        let result = match &outcome {
            Ok(()) => "published",
            Err(e) => {
                tracing::debug!(error = %e, "shadow scoring failed");
                "failed"
            }
        };
        metrics::counter!("adserve_ranker_shadow_total", "result" => result).increment(1);
    }
}

/// What a shadow event carries of the call it shadows.
struct Shadowed {
    request_id: String,
    ad_ids: Vec<i64>,
    whole_request: bool,
    production_model_version: String,
    production_pctr: Vec<f32>,
}

/// The fallback chain behind the model: a lightweight model with its own
/// session, then a prior per ad.
#[derive(Debug, Clone)]
pub struct Fallback {
    /// The fallback model (none: straight to the prior).
    pub model: Option<Arc<CtrModel>>,
    /// Time kept back from the model for the fallback.
    pub reserve: Duration,
    /// Feature read as the prior.
    pub prior_feature: String,
}

impl Fallback {
    /// The prior only, no time reserved.
    pub fn prior_only(prior_feature: &str) -> Self {
        Self { model: None, reserve: Duration::ZERO, prior_feature: prior_feature.into() }
    }

    /// Scores with the fallback model if it answers by `by`, else the
    /// prior; counts which level answered. `by` is the call's deadline less
    /// [`prior_reserve`]: a fallback model that answers too late must leave
    /// the prior time to answer, or the caller gets its own deadline's
    /// error instead of scores.
    async fn score(&self, matrix: &FeatureMatrix, by: Option<Instant>, why: &str) -> (Scores, String, ScoreLevel) {
        if let (Some(model), Some(by)) = (&self.model, by.filter(|by| *by > Instant::now()))
            && let Ok(input) = model.gather(matrix)
        {
            let call = model.batcher().score(input, Some(by));
            if let Ok(Ok(scores)) = tokio::time::timeout_at(by.into(), call).await {
                metrics::counter!("adserve_ranker_fallbacks_total", "level" => ScoreLevel::FallbackModel.label())
                    .increment(1);
                tracing::warn!(reason = why, "scored by the fallback model");
                return (scores, model.manifest().model_version.clone(), ScoreLevel::FallbackModel);
            }
        }
        metrics::counter!("adserve_ranker_fallbacks_total", "level" => ScoreLevel::Prior.label()).increment(1);
        tracing::warn!(reason = why, "scored by the prior");
        let prior = adserve_features::prior::prior_pctr(matrix, &self.prior_feature, crate::model::MIN_PCTR);
        let scores = Scores { raw: prior.clone(), pctr: prior };
        (scores, adserve_features::prior::PRIOR_MODEL_VERSION.into(), ScoreLevel::Prior)
    }
}

/// Time a call's fallback chain keeps back from the fallback model for the
/// prior and the answer's way out: a twentieth of the call's budget, at
/// least 2 ms, at most 10 ms (the prior itself takes microseconds).
pub fn prior_reserve(budget: Duration) -> Duration {
    (budget / 20).clamp(Duration::from_millis(2), Duration::from_millis(10))
}

/// Serves `adserve.v1.RankerService` with the production model of
/// [`Serving`] (swapped under it by the registry follower).
#[derive(Debug, Clone)]
pub struct RankerGrpc {
    serving: Arc<Serving>,
    max_rows: usize,
    request_timeout: Duration,
    shadow: Option<ShadowSink>,
    fallback: Fallback,
    /// The registry model name served; calls naming another are NOT_FOUND.
    model_name: String,
}

impl RankerGrpc {
    /// A service scoring with `serving`'s model, refusing matrices above
    /// `max_rows`; a call's work is dropped once it is older than the
    /// caller's `grpc-timeout` or `request_timeout`, whichever is shorter.
    pub fn new(serving: Arc<Serving>, max_rows: usize, request_timeout: Duration) -> Self {
        Self {
            serving,
            max_rows,
            request_timeout,
            shadow: None,
            fallback: Fallback::prior_only(adserve_features::prior::DEFAULT_PRIOR_FEATURE),
            model_name: adserve_registry::DEFAULT_MODEL_NAME.into(),
        }
    }

    /// Serves the registry model `name` (default
    /// [`adserve_registry::DEFAULT_MODEL_NAME`]).
    pub fn with_model_name(mut self, name: impl Into<String>) -> Self {
        self.model_name = name.into();
        self
    }

    /// A call naming a model this ranker does not serve is NOT_FOUND.
    fn check_model_name(&self, asked: &str) -> Result<(), Status> {
        if asked.is_empty() || asked == self.model_name {
            return Ok(());
        }
        let shown: String = asked.chars().take(64).collect();
        Err(Status::not_found(format!(
            "model_name: no model {shown:?} is served here; this ranker serves {:?}",
            self.model_name
        )))
    }

    /// Falls back to `fallback` when the model cannot answer in time.
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Scores with the registry's shadow model too, publishing to `sink`.
    pub fn with_shadow(mut self, sink: ShadowSink) -> Self {
        self.shadow = Some(sink);
        self
    }

    /// A shadow model and an in-flight permit, when shadow scoring applies.
    fn shadow_slot(&self, request_id: &str) -> Option<(ShadowSink, Arc<CtrModel>, OwnedSemaphorePermit)> {
        let sink = self.shadow.as_ref()?;
        let model = self.serving.shadow()?;
        if !sink.samples(request_id) {
            metrics::counter!("adserve_ranker_shadow_total", "result" => "unsampled").increment(1);
            return None;
        }
        match sink.permits.clone().try_acquire_owned() {
            Ok(permit) => Some((sink.clone(), model, permit)),
            Err(_) => {
                metrics::counter!("adserve_ranker_shadow_total", "result" => "skipped_busy").increment(1);
                None
            }
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> RankerServiceServer<Self> {
        RankerServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RankerService for RankerGrpc {
    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        let start = Instant::now();
        let limit = adserve_core::grpc::caller_timeout(request.metadata())
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let request = request.into_inner();
        self.check_model_name(&request.model_name)?;
        if request.routing_key.len() > 256 {
            return Err(Status::invalid_argument(format!(
                "routing_key: at most 256 bytes, got {}",
                request.routing_key.len()
            )));
        }
        if request.request_id.len() > 128 {
            return Err(Status::invalid_argument(format!(
                "request_id: at most 128 bytes, got {}",
                request.request_id.len()
            )));
        }
        let matrix = request.matrix.ok_or_else(|| Status::invalid_argument("matrix: required"))?;
        let rows = matrix.num_rows as usize;
        if rows == 0 || rows > self.max_rows {
            return Err(Status::invalid_argument(format!(
                "matrix.num_rows: must be in 1..={}, got {rows}",
                self.max_rows
            )));
        }
        if !request.ad_ids.is_empty() && request.ad_ids.len() != rows {
            return Err(Status::invalid_argument(format!(
                "ad_ids: must be empty or one per row ({rows}), got {}",
                request.ad_ids.len()
            )));
        }
        // This call's model (production, or the canary for its share of
        // routing keys): a swap during the call does not change it.
        let (model, role) = self.serving.route(&request.routing_key);
        metrics::counter!("adserve_ranker_calls_total", "role" => role.as_str()).increment(1);
        let input = model.gather(&matrix).map_err(Status::invalid_argument)?;
        let deadline = start + limit;
        // The model gets the deadline minus the fallback's reserve; if it
        // fails, is overloaded or would be late, the fallback chain answers.
        let primary = match deadline.checked_sub(self.fallback.reserve).filter(|d| *d > Instant::now()) {
            None => {
                Err(format!("no time for the model: {limit:?} left, {:?} kept for the fallback", self.fallback.reserve))
            }
            Some(by) => match tokio::time::timeout_at(by.into(), model.batcher().score(input, Some(by))).await {
                Ok(Ok(scores)) => Ok(scores),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "the model would miss the call's deadline ({:?} kept for the fallback)",
                    self.fallback.reserve
                )),
            },
        };
        let (scores, model_version, level, fallback_reason) = match primary {
            Ok(scores) => (scores, model.manifest().model_version.clone(), ScoreLevel::Model, String::new()),
            Err(reason) => {
                let by = deadline.checked_sub(prior_reserve(limit));
                let (scores, version, level) = self.fallback.score(&matrix, by, &reason).await;
                (scores, version, level, reason)
            }
        };
        metrics::histogram!("adserve_ranker_score_seconds").record(start.elapsed().as_secs_f64());
        metrics::histogram!("adserve_ranker_rows").record(rows as f64);
        // The shadow scores what the model served (not a fallback), after the
        // answer, with its own copy of the matrix (it may read other columns).
        if level == ScoreLevel::Model
            && let Some((sink, shadow, permit)) = self.shadow_slot(&request.request_id)
        {
            let call = Shadowed {
                request_id: request.request_id,
                ad_ids: request.ad_ids,
                whole_request: request.whole_request,
                production_model_version: model_version.clone(),
                production_pctr: scores.pctr.clone(),
            };
            tokio::spawn(async move {
                sink.run(shadow, matrix, call).await;
                drop(permit);
            });
        }
        Ok(Response::new(ScoreResponse {
            pctr: scores.pctr,
            model_version,
            raw_pctr: scores.raw,
            level: level as i32,
            fallback_reason,
        }))
    }

    async fn get_model(&self, request: Request<GetModelRequest>) -> Result<Response<GetModelResponse>, Status> {
        self.check_model_name(&request.get_ref().model_name)?;
        let model = self.serving.production();
        let canary = self.serving.canary();
        let m = model.manifest();
        Ok(Response::new(GetModelResponse {
            model_version: m.model_version.clone(),
            feature_order: m.feature_order.clone(),
            execution_provider: model.provider().as_str().into(),
            canary_model_version: canary.as_ref().map(|c| c.model.manifest().model_version.clone()).unwrap_or_default(),
            canary_share: canary.map_or(0.0, |c| c.share),
            model_name: self.model_name.clone(),
            // What shadow_slot() would score with.
            shadow_model_version: match &self.shadow {
                Some(_) => self.serving.shadow().map(|s| s.manifest().model_version.clone()).unwrap_or_default(),
                None => String::new(),
            },
            typed_inputs: m
                .typed_inputs
                .iter()
                .map(|t| adserve_proto::v1::ModelInput {
                    name: t.name.clone(),
                    dtype: t.dtype.as_str().into(),
                    features: t.features.clone(),
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prior_keeps_a_twentieth_of_the_budget_within_2_to_10_ms() {
        let ms = Duration::from_millis;
        assert_eq!(prior_reserve(ms(100)), ms(5));
        assert_eq!(prior_reserve(ms(250)), ms(10));
        assert_eq!(prior_reserve(Duration::from_secs(30)), ms(10));
        assert_eq!(prior_reserve(ms(10)), ms(2));
        assert_eq!(prior_reserve(Duration::ZERO), ms(2));
    }

    #[tokio::test]
    async fn the_shadow_samples_whole_requests_by_id_as_the_gateways_cache_does() {
        let config = adserve_events::KafkaConfig::default();
        let sink = |share| ShadowSink::new(EventPublisher::new(&config, "test").expect("lazy"), 1, share);
        let ids: Vec<String> = (0..2000).map(|i| format!("request-{i}")).collect();
        let all = sink(1.0);
        assert!(ids.iter().all(|id| all.samples(id)) && all.samples(""), "share 1: every call");
        let none = sink(0.0);
        assert!(!ids.iter().any(|id| none.samples(id)));
        let tenth = sink(0.1);
        let sampled: Vec<&String> = ids.iter().filter(|id| tenth.samples(id)).collect();
        assert!((140..=260).contains(&sampled.len()), "{} of 2000", sampled.len());
        // The same requests the gateway sends whole at the same share.
        assert!(ids.iter().all(|id| tenth.samples(id) == adserve_registry::in_canary(id, 0.1)));
        assert!(!tenth.samples(""), "no request id: not sampled below 1");
    }
}
