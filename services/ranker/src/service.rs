//! gRPC face of the ranker.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use adserve_proto::v1::{
    GetModelRequest, GetModelResponse, ScoreRequest, ScoreResponse,
    ranker_service_server::{RankerService, RankerServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{batcher::ScoreError, follow::Serving};

/// Serves `adserve.v1.RankerService` with the production model of
/// [`Serving`] (swapped under it by the registry follower).
#[derive(Debug, Clone)]
pub struct RankerGrpc {
    serving: Arc<Serving>,
    max_rows: usize,
    request_timeout: Duration,
}

impl RankerGrpc {
    /// A service scoring with `serving`'s model, refusing matrices above
    /// `max_rows`; a call's work is dropped once it is older than the
    /// caller's `grpc-timeout` or `request_timeout`, whichever is shorter.
    pub fn new(serving: Arc<Serving>, max_rows: usize, request_timeout: Duration) -> Self {
        Self { serving, max_rows, request_timeout }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> RankerServiceServer<Self> {
        RankerServiceServer::new(self)
    }
}

/// The gRPC status for a call the queue did not score.
pub fn status(e: &ScoreError) -> Status {
    match e {
        ScoreError::DeadlineExceeded { .. } => Status::deadline_exceeded(e.to_string()),
        ScoreError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        ScoreError::Closed(_) => Status::unavailable(e.to_string()),
        ScoreError::Failed(_) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl RankerService for RankerGrpc {
    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        let start = Instant::now();
        let limit = adserve_core::grpc::caller_timeout(request.metadata())
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let request = request.into_inner();
        if request.routing_key.len() > 256 {
            return Err(Status::invalid_argument(format!(
                "routing_key: at most 256 bytes, got {}",
                request.routing_key.len()
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
        // This call's model (production, or the canary for its share of
        // routing keys): a swap during the call does not change it.
        let (model, role) = self.serving.route(&request.routing_key);
        metrics::counter!("adserve_ranker_calls_total", "role" => role.as_str()).increment(1);
        let input = model.gather(&matrix).map_err(Status::invalid_argument)?;
        let scores = model.batcher().score(input, rows, Some(start + limit)).await.map_err(|e| status(&e))?;
        metrics::histogram!("adserve_ranker_score_seconds").record(start.elapsed().as_secs_f64());
        metrics::histogram!("adserve_ranker_rows").record(rows as f64);
        Ok(Response::new(ScoreResponse {
            pctr: scores.pctr,
            model_version: model.manifest().model_version.clone(),
            raw_pctr: scores.raw,
        }))
    }

    async fn get_model(&self, _: Request<GetModelRequest>) -> Result<Response<GetModelResponse>, Status> {
        let model = self.serving.production();
        let canary = self.serving.canary();
        let m = model.manifest();
        Ok(Response::new(GetModelResponse {
            model_version: m.model_version.clone(),
            feature_order: m.feature_order.clone(),
            execution_provider: model.provider().as_str().into(),
            canary_model_version: canary.as_ref().map(|c| c.model.manifest().model_version.clone()).unwrap_or_default(),
            canary_share: canary.map_or(0.0, |c| c.share),
        }))
    }
}
